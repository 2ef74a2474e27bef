"""Build the tutorial notebooks from their sources in ``notebooks/src/``, then execute them in place.

    python notebooks/build.py                  # write + execute every notebook
    python notebooks/build.py --no-exec        # write only
    python notebooks/build.py 03_rl            # one notebook (name, stem, number prefix or src path)
    python notebooks/build.py 03 --no-exec

Each notebook's source is ``src/<name>.py`` in the jupytext "percent" format: ``# %%`` starts a code
cell, ``# %% [markdown]`` a markdown cell whose lines are commented ``# ``. The sources are plain
Python, so they can be linted; the small parser below reads them (no jupytext needed).

Notebooks are committed executed, so nbval (``--nbval-lax``) re-runs them top to bottom
and compares the cells marked ``# NBVAL_CHECK_OUTPUT``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent
SRC = HERE / "src"

CELL_MARKER = "# %%"
MARKDOWN_TAGS = ("[markdown]", "[md]")


def parse_percent(text: str) -> list[tuple[str, str]]:
    """Cells ``[(kind, source)]`` (kind ``"code"`` or ``"md"``) of a percent-format script.

    Blank lines before a cell marker separate cells and are not part of either cell. Only blank
    lines may precede the first marker (no jupytext header is used).
    """
    cells: list[tuple[str, str]] = []
    kind: str | None = None
    lines: list[str] = []

    def flush() -> None:
        while lines and not lines[-1].strip():
            lines.pop()
        if kind == "md":
            body = []
            for line in lines:
                if line == "#":
                    body.append("")
                elif line.startswith("# "):
                    body.append(line[2:])
                else:
                    raise ValueError(f"markdown cell {len(cells)}: line not commented with '# ': {line!r}")
            cells.append((kind, "\n".join(body)))
        elif kind == "code":
            cells.append((kind, "\n".join(lines)))

    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith(CELL_MARKER):
            flush()
            rest = line[len(CELL_MARKER) :].strip()
            kind = "md" if rest.startswith(MARKDOWN_TAGS) else "code"
            lines = []
        elif kind is None:
            if line.strip():
                raise ValueError(f"line {n}: text before the first '{CELL_MARKER}' cell marker")
        else:
            lines.append(line)
    flush()
    return cells


def to_percent(cells: list[tuple[str, str]]) -> str:
    """The inverse of `parse_percent` (for sources without trailing blank lines)."""
    parts = []
    for kind, src in cells:
        if kind == "md":
            parts.append(CELL_MARKER + " [markdown]\n" + "\n".join("# " + ln if ln else "#" for ln in src.split("\n")))
        else:
            parts.append(CELL_MARKER + "\n" + src)
    return "\n\n".join(parts) + "\n"


def sources() -> dict[str, Path]:
    """``{"01_quickstart.ipynb": src/01_quickstart.py, ...}`` in build order."""
    return {p.stem + ".ipynb": p for p in sorted(SRC.glob("*.py"))}


def notebook_cells(name: str) -> list[tuple[str, str]]:
    return parse_percent(sources()[name].read_text(encoding="utf-8"))


def make_notebook(cells: list[tuple[str, str]]):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src) for kind, src in cells
    ]
    return nb


def resolve(names: list[str]) -> list[str]:
    """Notebook names from ``03_rl.ipynb``, ``03_rl``, ``03`` or ``notebooks/src/03_rl.py``."""
    known = list(sources())
    out = []
    for arg in names:
        stem = Path(arg).name.removesuffix(".ipynb").removesuffix(".py")
        hits = [n for n in known if n.removesuffix(".ipynb") == stem] or [n for n in known if n.startswith(stem)]
        if len(hits) != 1:
            raise SystemExit(f"build.py: {arg!r} matches {hits or 'no notebook'}; known: {', '.join(known)}")
        out.append(hits[0])
    return out


def build(execute: bool = True, only: list[str] | None = None) -> None:
    import nbformat

    for name, src in sources().items():
        if only and name not in only:
            continue
        path = HERE / name
        nbformat.write(make_notebook(parse_percent(src.read_text(encoding="utf-8"))), path)
        if execute:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "jupyter",
                    "nbconvert",
                    "--to",
                    "notebook",
                    "--execute",
                    "--inplace",
                    "--ExecutePreprocessor.timeout=600",
                    str(path),
                ],
                check=True,
                env=_kernel_env(),
            )
        print("built", path)


def _kernel_env() -> dict[str, str]:
    """The environment with this checkout first on ``PYTHONPATH``, so the kernel imports its ``eetools``.

    (An editable install elsewhere, e.g. of another worktree, would otherwise win.)
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT.resolve()), env.get("PYTHONPATH")) if p)
    return env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build (and execute) the tutorial notebooks from notebooks/src/*.py.")
    parser.add_argument("names", nargs="*", help="notebooks to build (default: all), e.g. 03_rl or 03")
    parser.add_argument("--no-exec", action="store_true", help="write the .ipynb without executing them")
    args = parser.parse_args(argv)
    build(execute=not args.no_exec, only=resolve(args.names) or None)


if __name__ == "__main__":
    main()

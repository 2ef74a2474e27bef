"""The notebook sources (notebooks/src/*.py, percent format) match the committed, executed notebooks.

Nothing is executed: build.py's parser reads each source, and its cell kinds and texts are compared
with those of the committed .ipynb (what nbval runs in CI). Edit a notebook in src/ and rebuild it
with ``python notebooks/build.py <name>``; this test fails when the two drift apart.
"""

from __future__ import annotations

import importlib.util
import json
import py_compile
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def _load_build():
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOKS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_build()
NAMES = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))


def committed_cells(path: Path) -> list[tuple[str, str]]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    kinds = {"markdown": "md", "code": "code"}
    return [
        (kinds[c["cell_type"]], "".join(c["source"]) if isinstance(c["source"], list) else c["source"])
        for c in nb["cells"]
    ]


def test_every_notebook_has_a_source():
    assert NAMES and list(build.sources()) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_source_matches_committed_notebook(name):
    built, committed = build.notebook_cells(name), committed_cells(NOTEBOOKS / name)
    assert [k for k, _ in built] == [k for k, _ in committed], f"{name}: cell kinds differ"
    for i, (b, c) in enumerate(zip(built, committed)):
        assert b == c, f"{name} cell {i}: src/{name[:-6]}.py differs from the committed notebook"


@pytest.mark.parametrize("name", NAMES)
def test_source_is_canonical_python(name, tmp_path):
    path = build.sources()[name]
    text = path.read_text(encoding="utf-8")
    assert build.to_percent(build.parse_percent(text)) == text  # writes back byte for byte
    py_compile.compile(str(path), cfile=str(tmp_path / "x.pyc"), doraise=True)


def test_parse_percent():
    text = "# %% [markdown]\n# # Title\n#\n# text\n\n# %%\nx = 1\n\n\ny = 2\n\n# %%\n# NBVAL_CHECK_OUTPUT\nprint(x)\n"
    cells = build.parse_percent(text)
    assert cells == [
        ("md", "# Title\n\ntext"),
        ("code", "x = 1\n\n\ny = 2"),
        ("code", "# NBVAL_CHECK_OUTPUT\nprint(x)"),
    ]
    assert build.to_percent(cells) == text
    with pytest.raises(ValueError):
        build.parse_percent("# %% [markdown]\nnot a comment\n")
    with pytest.raises(ValueError):
        build.parse_percent("x = 1\n# %%\n")


def test_resolve_names():
    assert build.resolve(["03"]) == ["03_rl.ipynb"]
    assert build.resolve(["03_rl", "notebooks/src/01_quickstart.py", "05_bring_your_own_model.ipynb"]) == [
        "03_rl.ipynb",
        "01_quickstart.ipynb",
        "05_bring_your_own_model.ipynb",
    ]
    with pytest.raises(SystemExit):
        build.resolve(["0"])

"""The package's import graph: one direction through the layers, no cycles, a shallow stack.

Layers, lowest first: ``core`` (the mechanism), ``io`` (files), ``tasks`` (data and
verifiers), ``train``, ``views``, ``analysis``, then ``pipeline`` and ``cli``. A module may
import its own layer and those below it; views never import training code. Imports under
``if TYPE_CHECKING:`` never run and are not counted. Every import inside a function counts.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "eetools"
LAYERS = ["core", "io", "tasks", "train", "views", "analysis", "pipeline", "real_pipeline", "cli"]
# real_pipeline: the paper's pipeline on a real model, built on the tiny pipeline's pieces
FORBIDDEN = {("views", "train")}  # also below views, but a view draws data, it never trains
# import hops on the longest chain (the flat layout of 2026-12-04 had 13; 9 since the real_pipeline layer)
MAX_LEVELS = 9


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


@lru_cache(maxsize=1)
def import_graph() -> dict[str, set[str]]:
    mods = all_modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_nodes(tree)
        deps = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("eetools."))
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("eetools"):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    deps.add(sub if sub in mods else node.module)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the top-level package (lazy names only)


def test_every_module_is_in_a_layer():
    strays = [m for m in all_modules() if layer(m) is not None and layer(m) not in LAYERS]
    assert not strays, f"modules outside the layers {LAYERS}: {strays}; put them in a layer's folder"


def test_no_upward_or_forbidden_imports():
    bad = []
    for mod, deps in import_graph().items():
        if layer(mod) is None:
            continue
        for dep in deps:
            if layer(dep) is None:
                bad.append(f"{mod} -> {dep} (the top-level package: import the defining module)")
            elif LAYERS.index(layer(dep)) > LAYERS.index(layer(mod)):
                bad.append(f"{mod} -> {dep} (upward: {layer(mod)} is below {layer(dep)})")
            elif (layer(mod), layer(dep)) in FORBIDDEN:
                bad.append(f"{mod} -> {dep} ({layer(mod)} must not import {layer(dep)})")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    cycles = _cycles(import_graph())
    assert not cycles, f"import cycles: {cycles}"


def levels(graph: dict[str, set[str]]) -> dict[str, int]:
    """Levels of imports under each module: 0 for one importing nothing of eetools, else 1 + the deepest it imports."""
    depth: dict[str, int] = {}

    def visit(v):
        if v not in depth:
            depth[v] = 0  # guard; cycles are reported by their own test
            depth[v] = max((1 + visit(w) for w in graph[v]), default=0)
        return depth[v]

    for v in graph:
        visit(v)
    return depth


def test_import_stack_is_shallow():
    depth = levels(import_graph())
    deepest = max(depth, key=depth.get)
    chain = [deepest]
    while import_graph()[chain[-1]]:
        chain.append(max(import_graph()[chain[-1]], key=depth.get))
    assert depth[deepest] <= MAX_LEVELS, f"{depth[deepest]} levels of imports (at most {MAX_LEVELS}): " + " -> ".join(
        chain
    )


def test_the_checker_finds_cycles_and_upward_imports():
    """The checks above can fail: a planted cycle and a planted upward import are caught."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert levels({"a": {"b"}, "b": {"c"}, "c": set()})["a"] == 2
    assert LAYERS.index(layer("eetools.train.rl")) < LAYERS.index(layer("eetools.views.figures"))

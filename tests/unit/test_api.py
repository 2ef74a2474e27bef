"""The public API: every exported name resolves, and `import eetools` stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import eetools

INIT = Path(eetools.__file__)


def test_all_lists_every_export_and_each_resolves():
    assert sorted(eetools.__all__, key=str.lower) == eetools.__all__, "keep __all__ sorted"
    assert set(eetools.__all__) == set(eetools._EXPORTS)
    for name in eetools.__all__:
        assert getattr(eetools, name) is not None, name


def test_type_checkers_see_every_export():
    """The TYPE_CHECKING block imports every name of __all__ from the module that defines it."""
    tree = ast.parse(INIT.read_text())
    seen = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                seen.update(a.asname or a.name for a in stmt.names)
    assert seen == set(eetools.__all__), f"missing from TYPE_CHECKING: {set(eetools.__all__) - seen}"


def test_unknown_name_is_a_clear_attribute_error():
    try:
        eetools.no_such_thing  # noqa: B018
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("expected AttributeError")


def test_import_is_light():
    """`import eetools` imports neither torch nor TransformerLens (they take seconds)."""
    code = "import sys, eetools; print(sorted(m for m in ('torch', 'transformer_lens') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"

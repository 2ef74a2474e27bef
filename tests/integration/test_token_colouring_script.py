"""`scripts/token_colouring.py`, the command behind `docs/token_colouring.png`, renders the shipped calibrated model."""

import importlib.util
import sys
from pathlib import Path

import pytest

from eetools.io.models import shipped_model_dir

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_token_colouring_script_writes_three_sequences(tmp_path):
    if not (shipped_model_dir() / "config.json").exists():
        pytest.skip("shipped tiny reasoner missing")
    spec = importlib.util.spec_from_file_location("token_colouring", ROOT / "scripts" / "token_colouring.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["token_colouring"] = mod
    spec.loader.exec_module(mod)
    out = mod.main(["--out", str(tmp_path / "tokens.html")])
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert all(f"sequence {i}" in text for i in range(3)) and "sequence 3" not in text
    assert text.count("tokens: ") == 3 and "no generated tokens" not in text

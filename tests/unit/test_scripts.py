"""The analysis scripts under scripts/ run and count what they say they count."""

import importlib.util
from pathlib import Path

from eetools.pretrain import PretrainConfig, pretrain

ROOT = Path(__file__).resolve().parents[2]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tom_bracket_errors_counts_every_move_line(tmp_path):
    from eetools import tasks
    from eetools.tasks.tom import _presence

    model = pretrain(PretrainConfig(out=str(tmp_path / "m"), steps=1, n_layers=2, d_model=32, n_heads=2, n_kv_heads=1,
                                    d_mlp=64, batch_sizes={"addition": 2, "tom": 2}, threads=1), progress=False)
    stats = _script("tom_bracket_errors").bracket_errors(str(model), n=12)
    exs = tasks.get("tom").test_split()[:12]
    moves = sum(ev[0] == "move" for e in exs for ev, _ in _presence(e.meta))
    lines, wrong = stats[("all",)]
    assert lines == moves and 0 <= wrong <= lines
    assert sum(v[0] for k, v in stats.items() if k != ("all",)) == lines
    assert wrong > 0  # an untrained model cannot know where the object is

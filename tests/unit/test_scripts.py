"""The analysis scripts under scripts/ run and count what they say they count."""

import importlib.util
import sys
from pathlib import Path

from eetools.train.pretrain import PretrainConfig, pretrain

ROOT = Path(__file__).resolve().parents[2]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the script is being executed
    spec.loader.exec_module(mod)
    return mod


def test_tom_bracket_errors_counts_every_move_line(tmp_path):
    from eetools import tasks
    from eetools.tasks.tom import _presence

    model = pretrain(
        PretrainConfig(
            out=str(tmp_path / "m"),
            steps=1,
            n_layers=2,
            d_model=32,
            n_heads=2,
            n_kv_heads=1,
            d_mlp=64,
            batch_sizes={"addition": 2, "tom": 2},
            threads=1,
        ),
        progress=False,
    )
    stats = _script("tom_bracket_errors").bracket_errors(str(model), n=12)
    exs = tasks.get("tom").test_split()[:12]
    moves = sum(ev[0] == "move" for e in exs for ev, _ in _presence(e.meta))
    lines, wrong = stats[("all",)]
    assert lines == moves and 0 <= wrong <= lines
    assert sum(v[0] for k, v in stats.items() if k != ("all",)) == lines
    assert wrong > 0  # an untrained model cannot know where the object is


def test_exit_token_errors_simulates_thresholds_token_by_token(tmp_path):
    import numpy as np
    import torch

    import eetools

    model = pretrain(
        PretrainConfig(
            out=str(tmp_path / "m"),
            steps=1,
            n_layers=3,
            d_model=32,
            n_heads=2,
            n_kv_heads=1,
            d_mlp=64,
            batch_sizes={"addition": 2, "tom": 2},
            threads=1,
        ),
        progress=False,
    )
    torch.manual_seed(0)
    ee_model = eetools.attach_exit_heads(eetools.load_model(str(model)), layers=[1, 2])
    mod = _script("exit_token_errors")
    te = mod.token_exits(ee_model, "addition", n=6, batch=4)
    assert len(te.c) == 6 and all(
        c.shape == (len(f), 2) and lens.shape == (len(f), 3) for c, lens, f in zip(te.c, te.lens, te.final)
    )
    curve = mod.frontier(te, thresholds=[1.01, 0.0]).set_index("threshold")
    # never exiting keeps every prediction; exiting everything at layer 1 saves 2 of 3 layers per token and
    # keeps exactly the sequences whose layer-1 lens already agrees with full depth on every token
    assert curve.loc[1.01, "kept"] == 1.0 and curve.loc[1.01, "layers_saved"] == 0.0
    assert np.isclose(curve.loc[0.0, "layers_saved"], 2 / 3)
    agree = np.mean([(lens[:, 1] == f).all() for lens, f in zip(te.lens, te.final)])
    assert curve.loc[0.0, "kept"] == agree
    wrong = mod.wrong_exits(te, 0.0)
    assert wrong["count"].sum() == sum(int((lens[:, 1] != f).sum()) for lens, f in zip(te.lens, te.final))
    assert set(wrong["layer"]) <= {1}
    # patience only ever holds a token back
    held = mod.frontier(te, thresholds=[0.0], patience=1)["layers_saved"].item()
    assert held <= curve.loc[0.0, "layers_saved"] + 1e-12


def test_exit_divergence_finds_where_exits_part_from_full_depth(tmp_path):
    import torch

    import eetools
    from eetools import tasks

    model = pretrain(
        PretrainConfig(
            out=str(tmp_path / "m"),
            steps=1,
            n_layers=3,
            d_model=32,
            n_heads=2,
            n_kv_heads=1,
            d_mlp=64,
            batch_sizes={"addition": 2, "tom": 2},
            threads=1,
        ),
        progress=False,
    )
    torch.manual_seed(0)
    bridge = eetools.load_model(str(model))
    with torch.no_grad():  # random weights of some size: later blocks change the prediction
        for w in bridge.parameters():
            w.add_(torch.randn_like(w) * 0.5)
    ee = eetools.attach_exit_heads(bridge, layers=[1, 2])
    addition = tasks.get("addition")
    examples = addition.test_split()[:6]
    reference = ee.generate([e.prompt for e in examples], addition.max_new_tokens, mode="off", temperature=0.0)

    class FullDepthIsRight:  # an untrained model solves nothing: call its own full-depth answers right
        max_new_tokens = addition.max_new_tokens

        def test_split(self):
            return examples

        def score(self, example, completion):
            return float(completion == reference.text[examples.index(example)])

    mod = _script("exit_divergence")
    d = mod.partings(ee, FullDepthIsRight(), threshold=1e-6, n=6, batch=4)  # every token exits at layer 1
    found = d.partings
    assert d.n == 6
    ex = ee.generate(
        [e.prompt for e in examples], addition.max_new_tokens, mode="threshold", threshold=1e-6, temperature=0.0, seed=0
    )
    broken = [i for i in range(6) if ex.text[i] != reference.text[i]]
    assert [p.prompt for p in found] == [examples[i].prompt for i in broken] and found
    tok = ee.model.tokenizer
    for p in found:
        i = next(i for i in broken if examples[i].prompt == p.prompt)
        k = p.position
        assert torch.equal(ex.tokens[i, :k], reference.tokens[i, :k]) and ex.tokens[i, k] != reference.tokens[i, k]
        assert (p.exit_layer, p.earlier_exits) == (int(ex.exit_layers[i, k]), int((ex.exit_layers[i, :k] < 3).sum()))
        assert p.cause == ("exit" if p.replayed == p.full_depth else "context")
        prompt_ids = ex.prompt_tokens[i][ex.prompt_mask[i].bool()]
        # the replay with every exit prescribed reproduces the exited token: positions line up
        assert mod.replay_top(ee, prompt_ids, ex.tokens[i], ex.exit_layers[i], k, full_depth_at_k=False) == int(
            ex.tokens[i, k]
        )
        assert 0 < p.lens_p <= 1
        if p.earlier_exits == 0:  # nothing frozen before it: at full depth it is the full-depth rollout
            assert p.cause == "exit" and p.replayed == tok.decode([int(reference.tokens[i, k])])
    # the lens's confidence at every exit: one value per exited token, the wrong exits' among them
    exited = int(((ex.exit_layers < 3) & ex.mask).sum())
    assert d.exit_confidence.shape == (exited,) and ((d.exit_confidence > 0) & (d.exit_confidence <= 1)).all()
    for p in found:
        assert abs(d.exit_confidence - p.lens_p).min() < 1e-4

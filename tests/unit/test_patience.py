"""Thresholded exits with patience: a token exits only where the logit lens's top token has held for
`patience` exitable layers (the heads' threshold still has to be reached)."""

import math

import pytest
import torch

import eetools
import eetools.evaluation
from eetools.cli import main


def _constant_heads(ee, p):
    """Every head gives ``c = p`` whatever it reads."""
    with torch.no_grad():
        for h in ee.heads:
            h.net[-1].weight.zero_()
            h.net[-1].bias.fill_(math.log(p / (1 - p)))


def _replayed_lens(ee, rollout):
    """Top lens token at each exitable layer for every generated token, by a teacher-forced replay of the
    rollout with its exits prescribed ``[new, n_exit]`` (one unpadded prompt)."""
    L, n_new = ee.n_layers, rollout.tokens.shape[1]
    tokens = torch.cat([rollout.prompt_tokens, rollout.tokens], 1)
    exit_at = torch.full_like(tokens, L)
    start = rollout.prompt_tokens.shape[1] - 1  # the position that predicts the first generated token
    exit_at[0, start:start + n_new] = rollout.exit_layers[0]
    resid = {}
    hooks = [(f"blocks.{l}.hook_resid_pre", lambda x, hook, l=l: resid.__setitem__(l, x)) for l in ee.exit_layers]
    with torch.no_grad(), ee.model.hooks(fwd_hooks=hooks):
        ee(tokens, exit_layers=exit_at)
    return torch.stack([ee.readout(resid[l][0, start:start + n_new]).argmax(-1) for l in ee.exit_layers], -1)


@pytest.mark.parametrize("skip", ["mask", "compute"])
def test_a_token_exits_at_the_first_layer_where_the_lens_has_held(tiny_ee, skip):
    _constant_heads(tiny_ee, 0.9)  # the threshold always holds: only patience decides
    r = tiny_ee.generate("Q: 12+34\n", 12, mode="threshold", threshold=0.5, patience=1, temperature=0, seed=0,
                         skip=skip)
    lens = _replayed_lens(tiny_ee, r)
    L, layers = tiny_ee.n_layers, tiny_ee.exit_layers
    for k in range(1, int(r.mask[0].sum())):  # the first token comes from the prompt, which never exits
        held = [i for i in range(1, len(layers)) if lens[k, i] == lens[k, i - 1]]
        assert r.exit_layers[0, k] == (layers[held[0]] if held else L)
    without = tiny_ee.generate("Q: 12+34\n", 12, mode="threshold", threshold=0.5, temperature=0, seed=0, skip=skip)
    assert set(without.exit_layers[0, 1:int(without.mask[0].sum())].tolist()) == {layers[0]}


def test_patience_never_exits_earlier_and_the_threshold_still_applies(tiny_ee):
    kw = dict(mode="threshold", temperature=0, seed=0, skip="compute")
    _constant_heads(tiny_ee, 0.3)
    assert (tiny_ee.generate("Q: 7+8\n", 8, threshold=0.5, patience=1, **kw).exit_layers == tiny_ee.n_layers).all()
    _constant_heads(tiny_ee, 0.9)
    one = tiny_ee.generate(["Q: 7+8\n", "Q: 41+9\n"], 8, threshold=0.5, patience=1, **kw)
    two = tiny_ee.generate(["Q: 7+8\n", "Q: 41+9\n"], 8, threshold=0.5, patience=2, **kw)
    assert (one.exit_layers[one.mask] >= tiny_ee.exit_layers[1]).all()
    assert (two.exit_layers[two.mask] >= tiny_ee.exit_layers[2]).all()


@pytest.mark.parametrize("kw, error, match", [(dict(mode="sample", patience=1), ValueError, "mode='threshold'"),
                                              (dict(mode="threshold", patience=3), ValueError, r"0 \.\. 2"),
                                              (dict(mode="threshold", patience=-1), ValueError, r"0 \.\. 2"),
                                              (dict(mode="threshold", patience=1.0), TypeError, "must be an int")])
def test_bad_patience_is_refused(tiny_ee, kw, error, match):
    with pytest.raises(error, match=match):
        tiny_ee.generate("Q: 1+2\n", 4, **kw)
    with pytest.raises(error, match=match):
        eetools.evaluation.evaluate(tiny_ee, "addition", n=2, progress=False, **kw)


def test_tradeoff_and_the_command_line_take_patience(tiny_folders, tmp_path, capsys):
    ee = eetools.attach_exit_heads(eetools.load_model(tiny_folders["qwen3"]), layers=[1, 2, 3])
    _constant_heads(ee, 0.9)
    res = eetools.tradeoff(ee, "addition", thresholds=[0.5], n=2, sample=False, patience=1, progress=False)
    plain = eetools.tradeoff(ee, "addition", thresholds=[0.5], n=2, sample=False, progress=False)
    saved = {name: r.df.set_index("system").loc["threshold", "layers_saved"] for name, r in [("p", res), ("0", plain)]}
    assert saved["p"] <= saved["0"]
    folder = tmp_path / "ee"
    ee.save(folder)
    assert main(["evaluate", "--exit-model", str(folder), "--n", "2", "--mode", "sample", "--patience", "1",
                 "--out", str(tmp_path / "ev"), "--no-progress"]) == 2
    assert "mode='threshold'" in capsys.readouterr().err

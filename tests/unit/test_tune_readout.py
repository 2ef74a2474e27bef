"""Tuning a readout (eetools.train.tune_readout) and saving it beside an exit model (eetools.io.exit_checkpoint)."""

from __future__ import annotations

import pytest
import torch

from eetools.core.lenses import LogitLens, TunedLens
from eetools.io.checkpoints import CheckpointError

TEXTS = ["Q: 12+34\nA: 46", "Q: 5+6\nA: 11", "hello world, this is text", "Q: 7+8\nA: 15 done"]


def _mean_kl(ee, lens):
    from eetools.core.encoding import encode_sequences
    from eetools.train.tune_readout import lens_batch, lens_kl

    ids, attn, _ = encode_sequences(ee, TEXTS, [""] * len(TEXTS))
    rows = attn.bool().nonzero(as_tuple=True)
    resid, final = lens_batch(ee, ids, attn, rows, lens.layers)
    with torch.no_grad():
        return sum(float(lens_kl(ee, lens, resid[l], l, final).mean()) for l in lens.layers) / len(lens.layers)


def test_tuning_lowers_the_kl_to_the_final_distribution_and_leaves_the_model_alone(tiny_ee):
    from eetools.train import tune_readout

    before = {n: p.detach().clone() for n, p in tiny_ee.model.named_parameters()}
    grads = [p.requires_grad for p in tiny_ee.model.parameters()]
    start = _mean_kl(tiny_ee, TunedLens(int(tiny_ee.model.cfg.d_model), tiny_ee.exit_layers))
    res = tune_readout(tiny_ee, TEXTS, steps=30, batch_size=4, lr=3e-3, progress=False)
    assert tiny_ee.exit_readout is res.readout
    assert _mean_kl(tiny_ee, res.readout) < 0.7 * start
    assert res.history["loss"].iloc[-1] < res.history["loss"].iloc[0]
    assert {f"kl_{l}" for l in tiny_ee.exit_layers} <= set(res.history.columns)
    for n, p in tiny_ee.model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert [p.requires_grad for p in tiny_ee.model.parameters()] == grads


def test_a_killed_tuning_resumes_to_the_same_lens(tiny_ee, tmp_path, monkeypatch):
    import sys

    tr = sys.modules["eetools.train.tune_readout"]  # the package exports the function under the same name
    from eetools.train import tune_readout

    kw = dict(steps=6, batch_size=2, progress=False, attach=False)  # the linear schedule runs over all 6 steps
    full = tune_readout(tiny_ee, TEXTS, **kw).readout
    ck = tmp_path / "run"
    step = tr.tune_step

    def killed(model, lens, pairs, cfg, i):
        if i == 4:
            raise KeyboardInterrupt  # killed during step 5, after the checkpoint of step 3
        return step(model, lens, pairs, cfg, i)

    monkeypatch.setattr(tr, "tune_step", killed)
    with pytest.raises(KeyboardInterrupt):
        tune_readout(tiny_ee, TEXTS, checkpoint_dir=ck, checkpoint_every=3, **kw)
    monkeypatch.setattr(tr, "tune_step", step)
    resumed = tune_readout(tiny_ee, TEXTS, checkpoint_dir=ck, checkpoint_every=3, **kw)
    assert len(resumed.history) == 6
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.readout.state_dict()[k], v)


def test_a_tuned_readout_is_saved_and_loaded_with_its_exit_model(tiny_ee, tmp_path):
    from eetools.io.exit_checkpoint import load_readout, load_weights_into, save_exit_model, save_readout

    lens = TunedLens(int(tiny_ee.model.cfg.d_model), tiny_ee.exit_layers)
    with torch.no_grad():
        for p in lens.parameters():
            p.normal_(0, 0.1)
    tiny_ee.set_readout(lens)
    save_exit_model(tiny_ee, tmp_path / "ee")
    assert (tmp_path / "ee" / "readout.safetensors").is_file()
    tiny_ee.set_readout(LogitLens())
    load_weights_into(tiny_ee, tmp_path / "ee")
    assert isinstance(tiny_ee.exit_readout, TunedLens)
    for k, v in lens.state_dict().items():
        assert torch.equal(tiny_ee.exit_readout.state_dict()[k], v)
    # on its own, and from the exit model's folder
    save_readout(tiny_ee, lens, tmp_path / "alone")
    for folder in (tmp_path / "alone", tmp_path / "ee"):
        got = load_readout(folder, tiny_ee)
        assert torch.equal(
            got.translators[str(tiny_ee.exit_layers[0])].weight, lens.translators[str(tiny_ee.exit_layers[0])].weight
        )


def test_another_models_readout_is_refused_naming_both(tiny_ee, tmp_path, build_tiny):
    import eetools
    from eetools.io.exit_checkpoint import load_readout, save_readout

    save_readout(tiny_ee, TunedLens(int(tiny_ee.model.cfg.d_model), tiny_ee.exit_layers), tmp_path / "r")
    other = eetools.load_model(build_tiny(tmp_path / "other", "qwen3", seed=5))
    with pytest.raises(CheckpointError, match="belongs to"):
        load_readout(tmp_path / "r", other)


def test_bad_tuning_inputs_get_one_line_errors(tiny_ee):
    from eetools.train import tune_readout

    with pytest.raises(ValueError, match="needs data"):
        tune_readout(tiny_ee, [], steps=1, progress=False)
    with pytest.raises(TypeError, match="data item 0"):
        tune_readout(tiny_ee, [3], steps=1, progress=False)
    with pytest.raises(ValueError, match="layers must be within"):
        tune_readout(tiny_ee, TEXTS, layers=[9], steps=1, progress=False)
    with pytest.raises(ValueError, match="positions"):
        tune_readout(tiny_ee, TEXTS, steps=1, positions="some", progress=False)


def test_cli_tune_lens_from_an_exit_model_saves_it_with_the_lens(tiny_ee, tmp_path):
    import json

    from eetools.cli import main
    from eetools.io.exit_checkpoint import save_exit_model
    from eetools.io.models import load_exit_model

    save_exit_model(tiny_ee, tmp_path / "ee")
    data = tmp_path / "answers.jsonl"
    data.write_text("".join(json.dumps({"prompt": t[:6], "answer": t[6:]}) + "\n" for t in TEXTS))
    out = tmp_path / "out"
    argv = ["tune-lens", "--from", str(tmp_path / "ee"), "--data", str(data), "--steps", "2", "--batch-size", "2"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    assert (out / "readout" / "readout.json").is_file() and (out / "tune_history.csv").is_file()
    ee = load_exit_model(out / "model", model=tiny_ee.model)
    assert isinstance(ee.exit_readout, TunedLens) and ee.exit_readout.layers == tiny_ee.exit_layers
    assert main(["tune-lens", "--data", str(data), "--task", "addition", "--out", str(tmp_path / "x")]) == 2
    assert main(["tune-lens", "--task", "addition", "--n-examples", "0", "--out", str(tmp_path / "y")]) == 2


def test_a_bare_bridge_tunes_the_layers_it_is_given(tiny_ee):
    from eetools.train import tune_readout

    res = tune_readout(tiny_ee.model, TEXTS, layers=[1, 3], steps=2, batch_size=2, progress=False)
    assert res.readout.layers == [1, 3] and len(res.history) == 2
    with pytest.raises(ValueError, match="needs layers"):
        tune_readout(tiny_ee.model, TEXTS, steps=1, progress=False)

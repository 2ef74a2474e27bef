"""Calibration: targets by hand, learning direction, frozen base, resume, bad arguments."""

import functools
import math

import pytest
import torch

from eetools import tasks
from eetools.io.exit_checkpoint import save_exit_model
from eetools.train.calibration import calibrate, exit_targets


def test_targets_match_a_hand_computation():
    # batch 1, 2 positions, 2 exitable layers, vocab 3 ("2x3")
    q = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]]).log()
    p1 = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.2, 0.2]]).log()
    p2 = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]]).log()
    early = torch.stack([p1, p2])[None]
    k = 2.0
    got = exit_targets(q, early, k)
    for t in range(2):
        kls = [
            sum(qi * math.log(qi / pi) for qi, pi in zip(q[0, t].exp().tolist(), p[t].exp().tolist())) for p in (p1, p2)
        ]
        c = [2 - 2 / (1 + math.exp(-k * d)) for d in kls]
        want = [c[0], (1 - c[0]) * c[1], (1 - c[0]) * (1 - c[1])]
        torch.testing.assert_close(got[0, t], torch.tensor(want))
    torch.testing.assert_close(got[0, 0], torch.tensor([1.0, 0.0, 0.0]))  # KL = 0 at the first layer: certain exit


def test_targets_sum_to_one_and_limits():
    q = torch.randn(3, 5, 7).log_softmax(-1)
    early = torch.randn(3, 4, 5, 7).log_softmax(-1)
    t = exit_targets(q, early, 1.0)
    assert t.shape == (3, 5, 5)
    torch.testing.assert_close(t.sum(-1), torch.ones(3, 5))
    assert bool((t >= 0).all())
    same = exit_targets(q, q.unsqueeze(1).expand(3, 4, 5, 7), 1.0)
    torch.testing.assert_close(same[..., 0], torch.ones(3, 5))
    far = torch.full((3, 4, 5, 7), -1e4)
    far[..., 0] = 0.0
    q2 = torch.full((3, 5, 7), -1e4)
    q2[..., 1] = 0.0
    torch.testing.assert_close(exit_targets(q2, far, 1.0)[..., -1], torch.ones(3, 5))  # huge KL: no exit
    with pytest.raises(ValueError, match="kl_factor"):
        exit_targets(q, early, 0.0)


def _snapshot(model):
    """Parameter object -> its value (names change when peft wraps a layer; objects do not)."""
    return {p: p.detach().clone() for p in model.parameters()}


def test_a_few_steps_lower_the_loss_and_change_only_trainable_parameters(tiny_ee):
    base = _snapshot(tiny_ee.model)
    res = calibrate(tiny_ee, "addition", steps=12, batch_size=4, lr=1e-2, seed=0, progress=False, lora_r=2)
    h = res.history
    assert len(h) == 12 and {"loss", "kl", "exit_nll", "student_compute", "target_compute"} <= set(h.columns)
    assert h["loss"].iloc[-4:].mean() < h["loss"].iloc[:4].mean()
    for p, v in base.items():
        assert torch.equal(p, v), "a base weight changed"
    assert any("lora_" in n for n, _ in tiny_ee.model.named_parameters()), "LoRA adapters were added"
    # adapters off = the base model exactly
    toks = tiny_ee.model.to_tokens(["Q: 1+2\n"], prepend_bos=True)
    with tiny_ee.adapters_disabled():
        off = tiny_ee.model(toks)
    from eetools.core.adapters import lora_layers

    for m in lora_layers(tiny_ee):
        m.enable_adapters(False)
    torch.testing.assert_close(off, tiny_ee.model(toks))


def test_length_chunked_student_equals_one_pass(tiny_ee):
    """Sequences of different lengths, student run in chunks cut to their own length: same sums and gradients."""
    from eetools.core.encoding import encode_sequences
    from eetools.train.calibration import calibration_sums

    with torch.no_grad():
        for h in tiny_ee.heads:
            h.net[-1].bias.fill_(0.0)
    ids, attn, predict = encode_sequences(
        tiny_ee, ["Q: 1+2\n", "Q: 12345+678\n", "Q: 9+9\n"], ["3", "1+8=9\n4+7=11\nA: 13023", "18\nA: 18"]
    )
    assert len(set(attn.sum(1).tolist())) == 3
    params = tiny_ee.trainable_parameters()
    results = []
    for chunk_rows in (None, 2, 5):
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        kl, nll, sums = calibration_sums(
            tiny_ee, ids, attn, predict, 4.0, 3, torch.Generator().manual_seed(0), chunk_rows=chunk_rows
        )
        (kl + nll).backward()
        results.append((sums, [p.grad.clone() for p in params]))
    (sums, grads), others = results[0], results[1:]
    for s, g in others:
        for key in sums:
            torch.testing.assert_close(s[key], sums[key], rtol=1e-5, atol=1e-5)
        for a, b in zip(g, grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


RESUME_KW = dict(batch_size=3, lr=1e-2, seed=1, progress=False, lora_r=2, checkpoint_every=3)


def _fresh_exit_model(tiny_folders):
    """The same untrained exit model every call (tiny Qwen3 bridge, seed 0): runs to compare bit for bit."""
    import eetools

    b = eetools.load_model(tiny_folders["qwen3"])
    b.cfg.default_prepend_bos = True
    torch.manual_seed(0)
    return eetools.attach_exit_heads(b, layers=[1, 2, 3])


def test_resume_equals_an_uninterrupted_run(tiny_folders, tmp_path):
    fresh = functools.partial(_fresh_exit_model, tiny_folders)
    kw = RESUME_KW
    full = calibrate(fresh(), "addition", steps=6, **kw)
    part = fresh()
    calibrate(part, "addition", steps=3, checkpoint_dir=tmp_path / "ck", **kw)
    resumed = calibrate(fresh(), "addition", steps=6, checkpoint_dir=tmp_path / "ck", **kw)
    for a, b in zip(full.ee_model.trainable_parameters(), resumed.ee_model.trainable_parameters()):
        assert torch.equal(a, b)
    assert list(full.history["loss"]) == list(resumed.history["loss"])
    with pytest.raises(ValueError, match="kl_factor"):
        calibrate(fresh(), "addition", steps=6, checkpoint_dir=tmp_path / "ck", **{**kw, "seed": 1}, kl_factor=2.0)


def test_a_crash_while_saving_leaves_a_whole_checkpoint_to_resume(tiny_folders, tmp_path, monkeypatch):
    """A run killed while writing a checkpoint (weights written, optimizer state not) resumes as if uninterrupted."""
    import eetools.train.state as ts
    from eetools.io.checkpoints import load_json

    fresh = functools.partial(_fresh_exit_model, tiny_folders)
    kw = RESUME_KW
    full = calibrate(fresh(), "addition", steps=6, **kw)
    ck = tmp_path / "ck"
    calibrate(fresh(), "addition", steps=3, checkpoint_dir=ck, **kw)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ts, "save_state", killed)  # the step-6 save dies after writing the weights
    with pytest.raises(KeyboardInterrupt):
        calibrate(fresh(), "addition", steps=6, checkpoint_dir=ck, **kw)
    monkeypatch.undo()
    assert load_json(ck / "trainer.json")["step"] == 3
    resumed = calibrate(fresh(), "addition", steps=6, checkpoint_dir=ck, **kw)
    for a, b in zip(full.ee_model.trainable_parameters(), resumed.ee_model.trainable_parameters()):
        assert torch.equal(a, b), "resumed from step-6 weights with the step-3 optimizer and step"
    assert list(full.history["loss"]) == list(resumed.history["loss"])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kl_factor": 0}, "kl_factor"),
        ({"kl_factor": -1}, "kl_factor"),
        ({"exit_samples": 0}, "exit_samples"),
        ({"bogus": 1}, "unknown"),
    ],
)
def test_bad_arguments(tiny_ee, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        calibrate(tiny_ee, "addition", steps=1, progress=False, **kwargs)


def test_a_training_sequence_longer_than_the_context_is_named(tiny_ee):
    from eetools.core.encoding import encode_sequences

    with pytest.raises(ValueError, match=r"sequence 1 \(prompt 'Q: 2\+2.*context of 256; shorten it"):
        encode_sequences(tiny_ee, ["Q: 1+1\n", "Q: 2+2\n"], ["2", "4" * 300])


def test_empty_dataset_is_an_error(tiny_ee):
    with pytest.raises(ValueError, match="empty"):
        calibrate(tiny_ee, [], steps=1, progress=False)


def test_examples_and_prompt_lists_are_accepted(tiny_ee):
    exs = tasks.get("addition").sample(4, seed=0)
    res = calibrate(tiny_ee, exs, steps=1, batch_size=2, progress=False, lora=False)
    assert len(res.history) == 1
    res = calibrate(
        tiny_ee, [e.prompt for e in exs], steps=1, batch_size=2, progress=False, lora=False, max_new_tokens=8
    )
    assert len(res.history) == 1


def test_non_finite_loss_stops_after_saving_a_checkpoint(tiny_ee, tmp_path):
    with torch.no_grad():
        tiny_ee.heads[0].net[-1].bias.fill_(float("nan"))
    before = [p.detach().clone() for p in tiny_ee.heads[1:].parameters()]
    with pytest.raises(FloatingPointError, match="step 0"):
        calibrate(
            tiny_ee, "addition", steps=3, batch_size=2, progress=False, lora=False, checkpoint_dir=tmp_path / "ck"
        )
    assert (tmp_path / "ck" / "trainer.json").exists(), "checkpoint saved before stopping"
    after = [p.detach() for p in tiny_ee.heads[1:].parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "no optimizer step may be applied"


def test_a_base_model_that_outputs_nan_is_named_not_sampled(tiny_ee):
    with torch.no_grad():
        next(tiny_ee.model.parameters()).fill_(float("nan"))  # the embedding: every forward is NaN
    with pytest.raises(FloatingPointError, match="base model's log-probs are not finite"):
        calibrate(tiny_ee, "addition", steps=1, batch_size=2, max_new_tokens=4, lora=False, progress=False)


def test_calibration_record_is_saved_with_the_heads_and_drives_fig4(tiny_ee, tmp_path):
    from eetools import load_exit_model
    from eetools.analysis.figures import exit_distribution_vs_target

    exs = tasks.get("addition").sample(2, seed=0)
    with pytest.raises(ValueError, match="no calibration record"):  # fresh heads: k must be given
        exit_distribution_vs_target(tiny_ee, examples=exs)
    calibrate(tiny_ee, "addition", kl_factor=8.0, steps=1, batch_size=2, progress=False, lora=False)
    assert tiny_ee.calibration == {"kl_factor": 8.0, "steps": 1, "data": "addition"}
    save_exit_model(tiny_ee, tmp_path / "m")
    loaded = load_exit_model(tmp_path / "m", model=tiny_ee.model)
    assert loaded.calibration == tiny_ee.calibration
    assert exit_distribution_vs_target(loaded, examples=exs).kl_factor == 8.0


def test_adapter_lr_trains_adapters_at_their_own_rate(tiny_ee):
    """A real model's text drifts under adapters trained at the heads' rate; `adapter_lr` slows only them."""
    from eetools.core.adapters import adapter_parameters

    heads0 = [p.detach().clone() for p in tiny_ee.heads.parameters()]
    calibrate(tiny_ee, "addition", steps=2, batch_size=2, lr=1e-2, adapter_lr=1e-9, seed=0, progress=False)
    moved = max((p - q).abs().max().item() for p, q in zip(tiny_ee.heads.parameters(), heads0))
    lora_b = [p for n, p in tiny_ee.model.named_parameters() if "lora_B" in n]
    assert lora_b and moved > 1e-3  # the heads learn at lr
    assert max(p.abs().max().item() for p in lora_b) < 1e-7  # the adapters (B starts at 0) at adapter_lr
    assert adapter_parameters(tiny_ee)

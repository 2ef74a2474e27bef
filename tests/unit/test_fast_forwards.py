"""`eetools.core.fast.bypass.hooked`: training forwards on the HF modules with fused attention, the bridge's numbers.

`final_residual` (the calibration and RL forwards) is compared with its bridge path
(``fast_forwards=False``) on tiny random bridges with LoRA adapters and right-padded batches:
residuals, exit logits, captures and every trainable gradient equal up to float32 rounding.
"""

import contextlib

import pytest
import torch

from eetools.core.adapters import add_lora
from eetools.core.fast import bypass
from eetools.core.hooks import count_hooks

ATOL = 1e-4  # residuals of a tiny random model reach ~10: float32 rounding of a different attention kernel


def _batch(ee):
    """Right-padded rows of different lengths, as training encodes them, with exits at every layer."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, int(ee.model.cfg.d_vocab), (3, 11), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 7:] = 0
    attn[2, 4:] = 0
    exits = torch.randint(1, ee.n_layers + 1, ids.shape, generator=g)
    return ids, attn, exits


def _run(ee, fast: bool, ids, attn, exits, **kw):
    ee.fast_forwards = fast
    for p in ee.trainable_parameters():  # the heads and the adapters (the bridge's, not the module's own)
        p.grad = None
    resid, z, cap = ee.final_residual(ids, attn, exit_at=exits, capture=[1, 3], **kw)
    m = attn.bool()
    ((resid[m] ** 2).mean() + z[m].sum()).backward()
    grads = [p.grad.clone() for p in ee.trainable_parameters()]
    return resid[m], z[m], {l: c[m] for l, c in cap.items()}, grads


def _spy(monkeypatch):
    """Record what each `hooked` call yielded (True: on the HF modules)."""
    seen, real = [], bypass.hooked

    @contextlib.contextmanager
    def spy(*a, **k):
        with real(*a, **k) as bypassed:
            seen.append(bypassed)
            yield bypassed

    monkeypatch.setattr("eetools.core.model.hooked", spy)
    return seen


def test_training_forwards_on_the_hf_modules_equal_the_bridge_path(tiny_ee, arch, monkeypatch):
    torch.manual_seed(1)
    add_lora(tiny_ee, r=2, alpha=4)
    batch = _batch(tiny_ee)
    seen = _spy(monkeypatch)
    ref = _run(tiny_ee, False, *batch)
    fast = _run(tiny_ee, True, *batch)
    assert seen == [False, True]  # the reference ran on the bridge, the other on the HF modules
    torch.testing.assert_close(fast[0], ref[0], rtol=0, atol=ATOL)
    torch.testing.assert_close(fast[1], ref[1], rtol=0, atol=ATOL)
    for l in (1, 3):
        torch.testing.assert_close(fast[2][l], ref[2][l], rtol=0, atol=ATOL)
    assert len(fast[3]) == len(ref[3]) > 0
    for a, b in zip(fast[3], ref[3]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    assert count_hooks(tiny_ee.model) == 0
    assert tiny_ee.model.original_model.config._attn_implementation == "eager"  # put back


def test_a_hook_on_the_bridge_keeps_training_forwards_on_the_bridge(tiny_ee, monkeypatch):
    """A user's hook must see the forward, so the bridge runs it: the same numbers bit for bit as the bridge path."""
    batch = _batch(tiny_ee)
    ref = _run(tiny_ee, False, *batch)
    seen = _spy(monkeypatch)
    calls = []
    with tiny_ee.model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda r, hook: calls.append(1))]):
        out = _run(tiny_ee, True, *batch)
    assert seen == [False] and calls == [1]
    for a, b in zip(out[:2], ref[:2]):
        assert torch.equal(a, b)


def test_activation_checkpointing_stays_on_the_bridge(tiny_ee, monkeypatch):
    seen = _spy(monkeypatch)
    _run(tiny_ee, True, *_batch(tiny_ee), checkpoint_blocks=True)
    assert seen == [False]


def test_an_error_in_a_training_forward_puts_the_bridge_back(tiny_ee):
    ids, attn, exits = _batch(tiny_ee)
    tree = [(n, id(m)) for n, m in tiny_ee.model.original_model.named_modules()]
    head = tiny_ee.heads[0]
    boom = head.register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    try:
        with pytest.raises(RuntimeError, match="boom"):
            tiny_ee.final_residual(ids, attn, exit_at=exits)
    finally:
        boom.remove()
    assert [(n, id(m)) for n, m in tiny_ee.model.original_model.named_modules()] == tree
    assert tiny_ee.model.original_model.config._attn_implementation == "eager"
    assert count_hooks(tiny_ee.model) == 0

"""`norm_shortcut`: the bridge's norms call the HF norm directly, with bit-identical outputs and gradients."""

import pytest
import torch

from eetools.core.fast.norm_shortcut import _METHOD, _shortcut_norms, norm_shortcut


def _toks(bridge):
    return torch.randint(4, bridge.cfg.d_vocab, (2, 12), generator=torch.Generator().manual_seed(0)).to(
        next(bridge.parameters()).device
    )


def _loss_and_grads(bridge, toks):
    bridge.zero_grad(set_to_none=True)
    logits = bridge(toks, return_type="logits")
    logits.float().logsumexp(-1).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in bridge.named_parameters() if p.grad is not None}


def test_outputs_and_gradients_are_bit_identical(tiny_bridge):
    toks = _toks(tiny_bridge)
    ref, ref_grads = _loss_and_grads(tiny_bridge, toks)
    with norm_shortcut(tiny_bridge):
        out, grads = _loss_and_grads(tiny_bridge, toks)
    assert torch.equal(out, ref)
    assert grads.keys() == ref_grads.keys() and all(torch.equal(grads[n], ref_grads[n]) for n in grads)


def test_norms_take_the_shortcut_inside_the_context_only(tiny_bridge, arch):
    norms = _shortcut_norms(tiny_bridge)
    if arch == "qwen3":  # HF RMSNorms on the bridge's native-autograd path: 2 per block, q/k norms, final
        assert len(norms) == 4 * tiny_bridge.cfg.n_layers + 1
    with norm_shortcut(tiny_bridge):
        assert all(_METHOD in m.__dict__ for m in norms)
        with norm_shortcut(tiny_bridge):  # reentrant: the inner context leaves them to the outer one
            pass
        assert all(_METHOD in m.__dict__ for m in norms)
    assert not any(_METHOD in m.__dict__ for m in norms)
    with pytest.raises(RuntimeError, match="boom"):
        with norm_shortcut(tiny_bridge):
            raise RuntimeError("boom")
    assert not any(_METHOD in m.__dict__ for m in norms)


def test_a_hook_on_a_norms_internals_is_honoured(tiny_bridge, arch):
    """A hook that edits ``hook_normalized`` changes the output as it does without the shortcut."""
    if arch != "qwen3":
        pytest.skip("the GPT-2 bridge's LayerNorms do not use the native-autograd path")
    toks = _toks(tiny_bridge)
    seen = []

    def halve(x, hook):
        seen.append(hook.name)
        return x * 0.5

    hooks = [("blocks.1.ln2.hook_normalized", halve)]
    edited = "edited hook_scale/hook_normalized"  # the bridge's own warning, on its own path
    with torch.no_grad():
        plain = tiny_bridge(toks, return_type="logits")
        with tiny_bridge.hooks(fwd_hooks=hooks), pytest.warns(UserWarning, match=edited):
            ref = tiny_bridge(toks, return_type="logits")
        with norm_shortcut(tiny_bridge), tiny_bridge.hooks(fwd_hooks=hooks), pytest.warns(UserWarning, match=edited):
            out = tiny_bridge(toks, return_type="logits")
    assert not torch.equal(ref, plain), "the hook did nothing"
    assert torch.equal(out, ref) and seen == ["blocks.1.ln2.hook_normalized"] * 2

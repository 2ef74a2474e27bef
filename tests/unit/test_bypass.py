"""`eetools.core.fast.bypass`: the fast decode runs the HF modules the bridge wraps, with the same results.

Rollouts with the bypass are compared with ``torch.equal`` to the bridge's own path (forced by
a hook that changes nothing), on tiny random bridges with LoRA adapters; GPT-2, whose query is
split from the fused ``c_attn`` by the bridge, must fall back to the bridge.
"""

import contextlib
import functools

import pytest
import torch

from eetools.core.adapters import adapter_parameters, add_lora
from eetools.core.fast import bypass
from eetools.core.hooks import count_hooks

FIELDS = ("tokens", "mask", "exit_layers", "token_logprobs", "exit_logprobs", "exit_probs")
PROMPTS = ["Q: 12+34\n", "Q: 1+2\nab c", "hello", "Q: 12+34\n"]  # left padding, a repeated prompt


def eager_attention(monkeypatch):
    """Keep the fast path on eager attention (`fused_attention` a no-op), to compare the bypass bit for bit."""

    @contextlib.contextmanager
    def unchanged(hf_model):
        yield False

    monkeypatch.setattr("eetools.core.fast.bypass.fused_attention", unchanged)


def _busy_heads(ee):
    with torch.no_grad():
        for h, b in zip(ee.heads, [-1.0, -0.5, 0.0]):
            h.net[-1].bias.fill_(b)  # exits at every layer


def _tree(bridge):
    return [(name, id(m)) for name, m in bridge.original_model.named_modules()]


def _generate(ee, noop_hook: bool, **kw):
    """Generate with skip="compute"; also returns how often block 2's bridge component ran."""
    calls = []
    handle = ee.model.blocks[2].register_forward_hook(lambda *a: calls.append(1))  # a torch hook: not a hook point
    noop = [("blocks.0.hook_resid_pre", lambda resid, hook: None)] if noop_hook else []
    try:
        with ee.model.hooks(fwd_hooks=noop):
            r = ee.generate(PROMPTS, 16, skip="compute", seed=5, **kw)
    finally:
        handle.remove()
    return r, len(calls)


@pytest.mark.parametrize(
    "kw",
    [dict(mode="sample", temperature=1.0), dict(mode="threshold", threshold=0.4, temperature=0.0)],
    ids=["sample", "threshold"],
)
def test_bypassed_decode_equals_the_bridge_path(tiny_ee, arch, kw, monkeypatch):
    eager_attention(monkeypatch)  # the bypass itself, bit for bit (fused attention: its own test below)
    add_lora(tiny_ee, r=2)
    with torch.no_grad():  # adapters that change the function, so merging them matters
        for p in adapter_parameters(tiny_ee):
            p.normal_(0, 0.05)
    _busy_heads(tiny_ee)
    before = _tree(tiny_ee.model)
    fast, fast_calls = _generate(tiny_ee, noop_hook=False, **kw)
    ref, ref_calls = _generate(tiny_ee, noop_hook=True, **kw)
    for f in FIELDS:
        assert torch.equal(getattr(fast, f), getattr(ref, f)), f"the bypass changed {f}"
    exits = set(ref.exit_layers[ref.mask].tolist())
    assert len(exits) >= (3 if kw["mode"] == "sample" else 2), f"the test needs exits, at several layers: {exits}"
    assert ref_calls > 0, "with a hook attached the decode must run the bridge's components"
    if arch == "qwen3":
        assert fast_calls == 0, "without hooks the decode should bypass the bridge's components"
    else:  # the bridge splits GPT-2's query from c_attn: no HF module to skip rows of, so no bypass
        assert fast_calls > 0
    assert _tree(tiny_ee.model) == before, "the HF module tree was not restored"
    assert count_hooks(tiny_ee.model) == 0


def test_a_hook_on_the_bridge_is_honoured_by_the_fast_path(tiny_ee):
    """A hook that edits the residual turns the bypass off: skip="compute" gives what the masked path gives."""
    _busy_heads(tiny_ee)

    def damp(resid, hook):
        return resid * 0.5

    with tiny_ee.model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", damp)]):
        masked = tiny_ee.generate(PROMPTS, 12, seed=1)
        fast = tiny_ee.generate(PROMPTS, 12, seed=1, skip="compute")
    plain = tiny_ee.generate(PROMPTS, 12, seed=1)
    assert torch.equal(masked.tokens, fast.tokens) and torch.equal(masked.exit_layers, fast.exit_layers)
    torch.testing.assert_close(masked.token_logprobs, fast.token_logprobs, atol=1e-4, rtol=0)
    assert not torch.allclose(plain.token_logprobs, masked.token_logprobs), "the hook should change the model"


def test_the_tree_and_hooks_are_restored_on_errors(tiny_ee, arch):
    before = _tree(tiny_ee.model)
    layers = [b.original_component for b in tiny_ee.model.blocks]
    tiny_ee.generate(PROMPTS, 2, seed=0, skip="compute")  # transformers hooks its layers at a first forward
    hooks_before = [(len(l._forward_hooks), len(l._forward_pre_hooks)) for l in layers]  # transformers' own
    orig = tiny_ee.heads[1].forward

    def boom(*a, **k):
        raise RuntimeError("injected")

    tiny_ee.heads[1].forward = boom
    with pytest.raises(RuntimeError, match="injected"):
        tiny_ee.generate(PROMPTS, 4, seed=0, skip="compute")
    tiny_ee.heads[1].forward = orig
    assert _tree(tiny_ee.model) == before
    assert [(len(l._forward_hooks), len(l._forward_pre_hooks)) for l in layers] == hooks_before, (
        "an exit hook stayed on an HF layer"
    )
    assert not any("forward" in m.__dict__ for m in tiny_ee.model.original_model.modules())
    assert count_hooks(tiny_ee.model) == 0


def test_what_blocks_the_bypass_is_said(tiny_ee):
    bridge = tiny_ee.model
    assert bypass.bypass_blocker(bridge) is None
    with bridge.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda r, hook: None)]):
        assert "hooks are attached" in bypass.bypass_blocker(bridge)
    bridge.cfg.use_attn_result = True
    try:
        assert "use_attn_result" in bypass.bypass_blocker(bridge)
    finally:
        bridge.cfg.use_attn_result = False
    bridge._weights_processed = True
    try:
        assert "processed its weights" in bypass.bypass_blocker(bridge)
    finally:
        bridge._weights_processed = False


@pytest.mark.parametrize(
    "kw",
    [
        dict(mode="sample"),
        dict(mode="threshold", threshold=0.4, temperature=0.0),
        dict(mode="off"),
        dict(mode="off", skip="compute"),
        dict(mode="off", temperature=0.0),
    ],
    ids=["sample-mask", "threshold-mask", "off", "off-compute", "off-greedy"],
)
def test_every_mode_decodes_without_the_bridge_wrappers_and_the_reference_results(tiny_ee, arch, kw, monkeypatch):
    """The masked path and exits off take the bypass too, with the bridge path's rollouts bit for bit."""
    eager_attention(monkeypatch)
    add_lora(tiny_ee, r=2)
    with torch.no_grad():
        for p in adapter_parameters(tiny_ee):
            p.normal_(0, 0.05)
    _busy_heads(tiny_ee)
    kw = {"skip": "mask", **kw}

    def run(noop_hook: bool):
        calls = []
        handle = tiny_ee.model.blocks[2].register_forward_hook(lambda *a: calls.append(1))
        noop = [("blocks.0.hook_resid_pre", lambda resid, hook: None)] if noop_hook else []
        try:
            with tiny_ee.model.hooks(fwd_hooks=noop):
                return tiny_ee.generate(PROMPTS, 12, seed=3, **kw), len(calls)
        finally:
            handle.remove()

    before = _tree(tiny_ee.model)
    fast, fast_calls = run(False)
    ref, ref_calls = run(True)
    for f in FIELDS:
        assert torch.equal(getattr(fast, f), getattr(ref, f)), f"the fast path changed {f} ({kw})"
    assert ref_calls > 0
    # GPT-2's fused c_attn: no bypass (the bridge's split query is not the HF computation bit for bit)
    assert (fast_calls == 0) == (arch == "qwen3"), "only the reference should run the bridge's components"
    if kw["mode"] == "off":
        assert (ref.exit_layers[ref.mask] == tiny_ee.n_layers).all()
        assert (ref.exit_probs[ref.mask] > 0).all(), "exits off still records the heads' probabilities"
    else:
        assert (ref.exit_layers[ref.mask] < tiny_ee.n_layers).any(), "the test needs exits"
    assert _tree(tiny_ee.model) == before and count_hooks(tiny_ee.model) == 0


def test_the_prefill_unembeds_only_the_last_position(tiny_ee):
    """`last_logits_only`: the decode asks the HF model for one position's logits, the uncached reference for all."""
    hf = tiny_ee.model.original_model
    seen = []
    head = tiny_ee.model.unembed.original_component
    handle = head.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    try:
        cached = tiny_ee.generate(PROMPTS[:3], 6, seed=2, mode="off")
        assert seen and set(seen) == {1}, f"positions unembedded per step: {seen}"
        seen.clear()
        uncached = tiny_ee.generate(PROMPTS[:3], 6, seed=2, mode="off", use_cache=False)
        assert max(seen) > 1
    finally:
        handle.remove()
    assert "forward" not in hf.__dict__, "the HF model's forward was not restored"
    assert torch.equal(cached.tokens, uncached.tokens)
    torch.testing.assert_close(cached.token_logprobs, uncached.token_logprobs, atol=1e-4, rtol=0)


def test_the_fast_path_runs_fused_attention_and_puts_eager_back(tiny_ee, arch):
    """``skip="compute"`` on the HF modules runs HF's "sdpa" attention (nobody reads the patterns there), the
    masked path and the bridge's own path stay eager, the model is eager again after the call (errors
    included), and the rollout is the eager one's up to float rounding."""
    from tests.unit.test_skipping import _assert_same

    _busy_heads(tiny_ee)
    hf = tiny_ee.model.original_model
    seen = []
    # an exit head runs mid-forward on every path: what it sees is what the blocks around it ran
    handle = tiny_ee.heads[1].register_forward_pre_hook(lambda m, a: seen.append(hf.config._attn_implementation))
    try:
        masked = tiny_ee.generate(PROMPTS, 12, seed=5)
        assert set(seen) == {"eager"}
        seen.clear()
        fused = tiny_ee.generate(PROMPTS, 12, seed=5, skip="compute")
        assert set(seen) == ({"sdpa"} if arch == "qwen3" else {"eager"}), seen  # GPT-2 stays on the bridge
        assert hf.config._attn_implementation == "eager"
        _assert_same(masked, fused)
        with pytest.raises(RuntimeError, match="boom"):  # put back on errors too
            with tiny_ee.model.hooks(fwd_hooks=[]):
                tiny_ee.heads[0].register_forward_hook(_boom)
                tiny_ee.generate(PROMPTS, 4, seed=5, skip="compute")
        assert hf.config._attn_implementation == "eager"
    finally:
        handle.remove()
        tiny_ee.heads[0]._forward_hooks.clear()


def _boom(*args):
    raise RuntimeError("boom")


def test_the_bypassed_decode_collects_no_attention_weights_and_puts_the_capture_back(tiny_ee, arch):
    """The bridge asks its HF model for every layer's attention weights (``output_attentions``), collected by
    HF's forward hooks; the bypassed decode reads none: the flag is off and the hooks do not run during it,
    and both are as they were afterwards (the bridge's own path still gets its patterns)."""
    if arch != "qwen3":
        pytest.skip("GPT-2 is not bypassed")
    from eetools.core.fast.bypass import CAPTURE_MODULE

    hf = tiny_ee.model.original_model
    tiny_ee.model.run_with_cache("Q: 1+2\n")  # the bridge's path: HF installs its capturing hooks
    capture = {
        (id(m), k): fn
        for m in hf.modules()
        for k, fn in m._forward_hooks.items()
        if getattr(fn, "__module__", None) == CAPTURE_MODULE
    }
    assert capture and hf.config.output_attentions, "the bridge no longer asks for attention weights"
    before = {id(m): list(m._forward_hooks) for m in hf.modules()}
    fired, flags = [], []
    for (mid, key), fn in capture.items():
        module = next(m for m in hf.modules() if id(m) == mid)

        @functools.wraps(fn)  # still HF's hook by its module, as the bypass recognises it; counted
        def counted(*a, fn=fn):
            fired.append(1)
            return fn(*a)

        module._forward_hooks[key] = counted
    handle = tiny_ee.heads[0].register_forward_pre_hook(lambda m, a: flags.append(hf.config.output_attentions))
    try:
        r = tiny_ee.generate(PROMPTS, 6, seed=5, mode="off")
    finally:
        handle.remove()
    assert fired == [] and set(flags) == {False}, "the decode collected attention weights"
    assert r.mask.any() and hf.config.output_attentions
    assert {id(m): list(m._forward_hooks) for m in hf.modules()} == before, "the hooks' order changed"
    _, cache = tiny_ee.model.run_with_cache("Q: 1+2\n")  # the bridge's own path is unchanged
    assert fired and "blocks.0.attn.hook_pattern" in cache

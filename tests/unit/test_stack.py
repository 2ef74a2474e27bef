"""Regression tests for facts about the stack that eetools relies on (shared/STACK-NOTES.md)."""

import pytest
import torch


def test_transformers_version_is_in_the_pinned_range():
    import transformers
    from packaging.version import Version

    v = Version(transformers.__version__)
    assert Version("5.9") <= v < Version("5.24"), f"transformers {v}: 5.24.0 breaks the bridge's KV cache"


def test_hooked_transformer_is_gone_in_tl4():
    with pytest.raises(ImportError):
        from transformer_lens import HookedTransformer  # noqa: F401


def test_bridge_kv_cache_equals_uncached(tiny_bridge):
    toks = tiny_bridge.to_tokens(["Q: 12+34\n1+4+0=5\n"], prepend_bos=True)
    full = tiny_bridge(toks)
    first, cache = tiny_bridge(toks[:, :-2], return_type="logits_and_cache")
    nxt, cache = tiny_bridge(toks[:, -2:-1], past_key_values=cache, return_type="logits_and_cache")
    last, _ = tiny_bridge(toks[:, -1:], past_key_values=cache, return_type="logits_and_cache")
    torch.testing.assert_close(torch.cat([first, nxt, last], 1), full, atol=1e-4, rtol=0)


def test_resid_pre_is_the_previous_resid_post(tiny_bridge):
    _, cache = tiny_bridge.run_with_cache(tiny_bridge.to_tokens(["ab c"], prepend_bos=True))
    for l in range(1, tiny_bridge.cfg.n_layers):
        assert torch.equal(cache[f"blocks.{l}.hook_resid_pre"], cache[f"blocks.{l - 1}.hook_resid_post"])

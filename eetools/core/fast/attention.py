"""Fused attention for the fast decode path: PyTorch's ``scaled_dot_product_attention`` instead of eager.

A `TransformerBridge` loads its HF model with eager attention, so that its hook points see every
attention score and pattern. Where the decode runs the HF modules directly (`eetools.core.fast.bypass`,
no hook on the bridge), nobody reads those, and HF's "sdpa" implementation computes the same attention
in one fused kernel: at SmolLM2-135M's size on 2 CPU cores, exits off decode 8-10 % faster at batch 1
(docs/speed.md, 2026-12-07). Its results equal eager's up to float rounding (log-probs within ~1e-5 on
SmolLM2-135M), which is the contract of ``generate(skip="compute")``, the fast path that uses it; the
default ``skip="mask"`` stays on eager attention, bit for bit the bridge's.
"""

from __future__ import annotations

import contextlib

FUSED = "sdpa"


@contextlib.contextmanager
def fused_attention(hf_model):
    """Within this context `hf_model` runs "sdpa" attention if it ran eager; put back on exit, errors included.

    Yields True if the implementation was switched, False if nothing changed (another implementation
    already, or a model that cannot switch: `set_attn_implementation` missing or refusing).
    """
    config = getattr(hf_model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    switch = getattr(hf_model, "set_attn_implementation", None)
    if before != "eager" or switch is None:
        yield False
        return
    try:
        switch(FUSED)
    except (ValueError, ImportError, NotImplementedError):  # an architecture without sdpa support
        yield False
        return
    if config._attn_implementation != FUSED:  # the model declined (HF logs why)
        yield False
        return
    try:
        yield True
    finally:
        switch(before)

"""The bridge's norms without the work nobody reads: a faster forward, the same numbers.

A TransformerLens `NormalizationBridge` on its native-autograd path (the one the bridge uses for
HF norms such as `Qwen3RMSNorm`) computes the norm's statistics itself, to fire its
``hook_scale`` and ``hook_normalized`` hook points, and then, unless a hook edited them, returns
the wrapped HF norm's own output. When those two hook points carry no hooks, the statistics are
about six tensor operations per norm call spent on values nobody reads. The shipped 8-block
model has 33 norms (two per block, the query and key norms, the final norm): sampling with
exits at batch 1 took 1,207 tensor operations per decoded token without the shortcut and
1,012 with it (`bridge.generate`: 1,148).

Within `norm_shortcut(bridge)`, each such norm calls the HF norm directly, checking at every
call that its two hook points still carry no forward or backward hooks; if one does (a hook
added inside the context), the bridge's own path runs. The result is the tensor the bridge
would return (the HF norm's output, in the input's dtype), with the same autograd graph, so
outputs and gradients are bit-identical. Norms of other kinds, or of a TransformerLens
without that method, are left alone. The module-tree walk that finds the norms is done once
per bridge.
"""

from __future__ import annotations

import contextlib
import weakref

from torch import nn

_METHOD = "_hf_autograd_forward_with_hooks"  # NormalizationBridge's native-autograd forward, TL 4
_NORMS: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()


def _shortcut_norms(bridge: nn.Module) -> list[nn.Module]:
    """The bridge's norm components that can take the shortcut (found once per bridge)."""
    norms = _NORMS.get(bridge)
    if norms is None:
        norms = [
            m
            for m in bridge.modules()
            if callable(getattr(type(m), _METHOD, None))
            and isinstance(getattr(m, "original_component", None), nn.Module)
            and not isinstance(m.original_component, nn.Identity)
            and all(
                hasattr(getattr(m, h, None), "fwd_hooks") and hasattr(getattr(m, h), "bwd_hooks")
                for h in ("hook_scale", "hook_normalized")
            )
        ]
        _NORMS[bridge] = norms
    return norms


def _direct(norm: nn.Module):
    """`norm`'s native-autograd forward, calling the HF norm directly while nothing hooks its internals."""
    own = getattr(type(norm), _METHOD).__get__(norm)
    scale, normalized, hf = norm.hook_scale, norm.hook_normalized, norm.original_component

    def forward(x):
        if scale.fwd_hooks or normalized.fwd_hooks or scale.bwd_hooks or normalized.bwd_hooks:
            return own(x)
        out = hf(x)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    return forward


@contextlib.contextmanager
def norm_shortcut(bridge: nn.Module):
    """Within this context, `bridge`'s norms skip their observation-only statistics (see the module doc).

    Reentrant: an inner context leaves the norms to the outer one. Restored on exit, errors included.
    """
    norms = _shortcut_norms(bridge)
    # all or none are installed (by one context); an inner context, as each decode step's forward
    # inside `generate`, finds them installed and leaves them to the outer one
    mine = [] if not norms or _METHOD in norms[0].__dict__ else norms
    for m in mine:
        setattr(m, _METHOD, _direct(m))
    try:
        yield
    finally:
        for m in mine:
            m.__dict__.pop(_METHOD, None)

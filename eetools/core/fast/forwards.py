"""Teacher-forced forwards (training and the teacher) on the HF modules, with fused attention.

Calibration, RL and the teacher run whole sequences through the model with a few residual hooks:
captures at the exitable layers, the exit heads and freezes, a stop after the last block. Through
the bridge every block, attention, MLP, norm and linear is a component that fires its hook points,
and attention is re-implemented step by step (eager: the ``[batch, heads, pos, pos]`` scores and
pattern exist, with their backward). On the shipped tiny reasoner that was about a third of a
calibration step (batched matrix products, softmax and its backward, the masking around them).

`hooked(ee_model, hooks)` runs forwards inside it with `hooks` (``(hook name, fn)`` pairs on
``hook_resid_pre`` / ``hook_resid_post`` points) as PyTorch hooks on the HF decoder layers
(`eetools.core.fast.bypass`) and HF's "sdpa" attention (`eetools.core.fast.attention`) wherever
nothing else observes the bridge; the numbers equal the bridge's up to float rounding, as the fast
decode path's do. Where the bridge cannot be bypassed (a user's hook on it, processed weights, an
architecture whose components are not HF modules on the forward's path), or with ``fast=False``,
the hooks go on the bridge and its own path runs, bit for bit as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from eetools.core.fast.attention import fused_attention
from eetools.core.fast.bypass import bridge_bypassed


@contextlib.contextmanager
def hooked(ee_model, hooks: list[tuple[str, Callable]], *, fast: bool = True) -> Iterator[bool]:
    """Forwards of ``ee_model.model`` inside run with `hooks`; yields True if on the HF modules (see the module doc)."""
    with contextlib.ExitStack() as stack:
        bypassed = fast and stack.enter_context(bridge_bypassed(ee_model, None, hooks=hooks))
        if bypassed:
            stack.enter_context(fused_attention(ee_model.model.original_model))
        else:
            stack.enter_context(ee_model.model.hooks(fwd_hooks=hooks))
        yield bypassed

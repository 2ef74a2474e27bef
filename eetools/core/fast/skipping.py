"""Real compute skipping at decode: exited tokens only compute what later tokens need.

The masked path (the default and the reference) runs every block on every token and lets
the freeze hooks throw away what an exited token computed. Here, for a token that exited
at layer `l`, blocks ``>= l`` still compute its keys and values from the frozen residual
(later tokens attend to them), but not the rest: its query (and the query norm, where a
block has one), the attention output projection, the MLP and the MLP's input norm. These
are row-wise functions whose output for an exited row reaches only that row's own
residual, which the freeze hook overwrites, so skipping them changes nothing that anyone
reads.

It goes through the bridge's components, not a per-model forward: for every block from
the first exitable layer on, the ``attn.q``, ``attn.o``, ``mlp`` (and ``attn.q_norm``,
``ln2``) components get their `forward` wrapped (on the instance, inside a context
manager, restored even on errors) so that at a one-position decode step they run only on
the rows (dim 0) still running at that block and return zeros for the rest. Gathering the
running rows costs a few tensor operations, so a component skips rows only when that saves
at least `MIN_SAVED_MACS` multiply-adds (rows skipped times its weights); otherwise it runs
on every row, as the masked path does (the freeze hook discards exited rows' results
either way). A row nobody needs (every row exited) is always skipped. An
architecture whose blocks lack these components (or whose components return something
other than a tensor) is reported by `skip_support` and generation falls back to masking
with a warning.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from collections.abc import Callable

from torch import Tensor, nn

SKIPPABLE = ("attn.q", "attn.o", "mlp")  # row-wise; their output for a row reaches only that row
# where a block has them: the query's norm (skipped with the query) and the MLP's input norm (with the MLP)
OPTIONAL = ("attn.q_norm", "ln2")
# the least work (rows skipped x the component's weights) worth gathering the running rows for. On
# one CPU core the gather, the zeros and the scatter around a component cost 10-50 us, the time of
# 0.4-1.8 M multiply-adds (measured on the shipped model's q projection and MLP at batch 32), so on
# a small model a component whose rows are mostly running runs on all of them; on a
# Qwen3-0.6B-shaped one every skipped row (2 M multiply-adds in the query alone) is worth it
MIN_SAVED_MACS = 2**20


def _component(block: nn.Module, path: str) -> nn.Module | None:
    m = block
    for part in path.split("."):
        m = getattr(m, part, None) if m is not None else None
    return m if isinstance(m, nn.Module) else None


def skip_support(model) -> str | None:
    """None if `model`'s blocks can skip compute, else why not (in words)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        return "the model has no `blocks` components"
    missing = sorted({p for b in blocks for p in SKIPPABLE if _component(b, p) is None})
    if missing:
        return (
            f"its blocks lack the components {missing} (a {type(blocks[0]).__name__} block); "
            f"compute skipping needs separate attn.q, attn.o and mlp components"
        )
    return None


class _RowSkip:
    """The wrapped forward of one component: runs only on `active()` rows (batch dim 0) at one-position steps.

    `active()` is None unless the forward is a one-position step in which some row exited, so
    the input's dim 0 is the batch whatever its layout (``[b, 1, d]``, or ``[b, heads, 1, d_head]``
    for a query norm).
    """

    def __init__(self, module: nn.Module, active: Callable[[], tuple[Tensor, int, int] | None]):
        self.active = active
        self.inner = module.forward  # bound method (or an earlier instance override)
        self.out_dim: int | None = None
        self.module = module

    @functools.cached_property
    def row_macs(self) -> int:
        """Multiply-adds per row, about: the component's weights (counted when first needed)."""
        return sum(p.numel() for p in self.module.parameters())

    def __call__(self, x, *args, **kwargs):
        running = self.active() if isinstance(x, Tensor) and x.ndim >= 2 and not args else None
        if running is None or self.out_dim is None:
            out = self.inner(x, *args, **kwargs)
            if isinstance(out, Tensor):
                self.out_dim = out.shape[-1]
            return out
        rows, n, batch = running  # indices of the running rows, their number, the batch size
        if n == batch or x.shape[0] != batch:  # all running, or an input not laid out batch first
            return self.inner(x, *args, **kwargs)
        if n == 0:
            return x.new_zeros((*x.shape[:-1], self.out_dim))
        if (batch - n) * self.row_macs < MIN_SAVED_MACS:  # gathering would cost more than it saves
            return self.inner(x, *args, **kwargs)
        part = self.inner(x.index_select(0, rows), *args, **kwargs)
        return part.new_zeros((x.shape[0], *part.shape[1:])).index_copy_(0, rows, part)


# HF attention classes whose keys and values `_KVOnly` computes as their own forward does: the input
# norm, the key projection (then, for Qwen3, the per-head key norm), the value projection, the
# rotary embedding of the keys, and the cache update. Other architectures keep the component path.
KV_ONLY = {"Qwen3Attention": True, "Qwen2Attention": False, "LlamaAttention": False, "MistralAttention": False}


def kv_only_support(layer: nn.Module) -> bool:
    """Whether `layer` (an HF decoder layer) is one whose keys and values `_KVOnly` knows how to compute."""
    attn = getattr(layer, "self_attn", None)
    name = type(attn).__name__
    if name not in KV_ONLY or not isinstance(getattr(layer, "input_layernorm", None), nn.Module):
        return False
    rotate_half = getattr(sys.modules.get(type(attn).__module__), "rotate_half", None)
    return callable(rotate_half) and all(hasattr(attn, a) for a in ("k_proj", "v_proj", "head_dim", "layer_idx"))


class _KVOnly:
    """The wrapped forward of an HF decoder layer: at a one-position step where every row has exited, only keys and values.

    A row that exited before block `l` needs nothing of it but the keys and values later tokens
    read from the cache: no query, attention, output projection or MLP, and its output is
    overwritten by the freeze hook. When no row of the step is running at this block (always,
    at batch 1, once the token exited), this computes just those (the same operations on the
    same input as the layer's own forward, so the cache is bit-identical) and returns the input
    unchanged; otherwise, and for any call it does not recognise, the layer's forward runs.
    At batch 1 this replaces the per-component skipping of the block's ~30 operations by ~8.
    """

    def __init__(self, layer: nn.Module, exited: Callable[[], bool]):
        self.layer, self.exited = layer, exited
        self.inner = layer.forward
        attn = layer.self_attn
        self.head_norm = KV_ONLY[type(attn).__name__]
        # the keys' rotation as the model's `apply_rotary_pos_emb` computes it, for the keys alone (it
        # rotates a query too, which nobody reads here): ``k * cos + rotate_half(k) * sin``
        self.rotate_half = sys.modules[type(attn).__module__].rotate_half

    def __call__(self, hidden_states, *args, **kwargs):
        cache, rope = kwargs.get("past_key_values"), kwargs.get("position_embeddings")
        if args or cache is None or rope is None or hidden_states.shape[1] != 1 or not self.exited():
            return self.inner(hidden_states, *args, **kwargs)
        attn = self.layer.self_attn
        x = self.layer.input_layernorm(hidden_states)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        k = attn.k_proj(x).view(shape)
        if self.head_norm:
            k = attn.k_norm(k)
        k = k.transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = rope
        k = (k * cos.unsqueeze(1)) + (self.rotate_half(k) * sin.unsqueeze(1))
        cache.update(k, v, attn.layer_idx)
        return hidden_states


def skipped_components(ee_model) -> list[tuple[int, nn.Module]]:
    """``(layer, component)`` for every bridge component compute skipping wraps (blocks from the first exitable layer)."""
    out = []
    for layer in range(ee_model.exit_layers[0], ee_model.n_layers):
        block = ee_model.model.blocks[layer]
        out += [(layer, m) for m in (_component(block, path) for path in SKIPPABLE + OPTIONAL) if m is not None]
    return out


def _all_exited(state, layer: int) -> bool:
    """Whether no row of the current one-position step runs at block `layer` (no device sync at a decode step)."""
    running = state.running(layer)
    return running is not None and running[1] == 0


@contextlib.contextmanager
def compute_skipping(ee_model, state, *, bypassed: bool = False):
    """Within this context, decode steps skip exited rows' query, output projection and MLP.

    Args:
        ee_model: the `EarlyExitModel`.
        state: the `ExitState` whose hooks are attached; its ``exit_at[:, -1]`` says which rows
            of the current one-position step have exited (rows with ``exit_at <= layer`` are skipped
            at block `layer`).
        bypassed: the forward runs the HF modules directly (`eetools.core.fast.bypass`): wrap the modules
            the components wrap, not the components.

    Yields True if skipping is active, False if the architecture is unsupported (then a
    warning says why and the masked path runs).
    """
    reason = skip_support(ee_model.model)
    if reason is not None:
        warnings.warn(
            f"skip='compute' is not supported for this model: {reason}; falling back to masking "
            f"(same results, no time saved)",
            stacklevel=3,
        )
        yield False
        return
    patched: list[tuple[nn.Module, object]] = []

    try:
        for layer, module in skipped_components(ee_model):
            if bypassed:
                module = module.original_component
            patched.append((module, module.__dict__.get("forward")))
            # object.__setattr__: bridge components forward attribute sets to the wrapped HF module
            object.__setattr__(module, "forward", _RowSkip(module, functools.partial(state.running, layer)))
        if bypassed:  # the HF decoder layers run directly: a block every row has exited computes keys and values only
            for layer in range(ee_model.exit_layers[0], ee_model.n_layers):
                hf_layer = ee_model.model.blocks[layer].original_component
                if kv_only_support(hf_layer):
                    patched.append((hf_layer, hf_layer.__dict__.get("forward")))
                    hf_layer.forward = _KVOnly(hf_layer, functools.partial(_all_exited, state, layer))
        yield True
    finally:
        for module, before in reversed(patched):
            if before is None:
                module.__dict__.pop("forward", None)
            else:
                object.__setattr__(module, "forward", before)

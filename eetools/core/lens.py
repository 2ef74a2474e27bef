"""The one residual-capture and logit-lens helper: `capturing`, `capture_residuals`, `lens_logits`.

Every analysis that reads the residual stream at some layers and decodes it through the final
norm and unembedding ("logit lens") goes through here, so that they all hook the same points
(the names of `eetools.core.hooks`), clean up the same way (hooks live only inside a
`model.hooks(...)` context: none survives the call, exceptions included) and say explicitly
whether the LoRA adapters are on (``base``) and whether the bridge's norms take the
bit-identical `norm_shortcut`.

Layers (``where="pre"``, the default): ``l`` in ``0 .. L-1`` is the stream entering block
``l`` (``blocks.{l}.hook_resid_pre``, what an exit head at ``l`` reads and what a token
exiting at ``l`` keeps); ``l = L`` is the stream leaving the last block
(``blocks.{L-1}.hook_resid_post``), the one the final norm and unembedding read. With
``where="post"``, ``l`` in ``0 .. L-1`` is the stream leaving block ``l``.

`capturing` is a context in which any forward (the bare bridge, or `EarlyExitModel` with exit
hooks, which are attached inside it and so run after the capture hooks) fills a dict;
`capture_residuals` runs the plain bridge forward in it. `lens_logits` and `lens_logprobs`
read a captured residual out.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from jaxtyping import Float, Int
from torch import Tensor

from eetools.core.fast.norm_shortcut import norm_shortcut as _norm_shortcut
from eetools.core.hooks import resid_post, resid_pre

Where = Literal["pre", "post"]


def _split(model) -> tuple[Any, Any]:
    """``(ee_model or None, bridge)`` from an `EarlyExitModel` or a bare TransformerLens bridge."""
    # an EarlyExitModel, told by its own attributes (no import: it imports us); plain dict look-ups,
    # not hasattr, which a bridge answers through a slow __getattr__ (readout runs per decode step)
    d = getattr(model, "__dict__", {})
    if "exit_layers" in d and "heads" in d.get("_modules", {}):
        return model, d["model"]
    return None, model


def residual_hook_name(layer: int, n_layers: int, where: Where = "pre") -> str:
    """The hook name of `layer` (see the module doc); raises a one-line ValueError if out of range."""
    if where not in ("pre", "post"):
        raise ValueError(f"where must be 'pre' or 'post', got {where!r}")
    top = n_layers if where == "pre" else n_layers - 1
    try:
        ok = not isinstance(layer, bool) and operator.index(layer) == layer and 0 <= layer <= top
    except TypeError:  # 1.5, "final", None
        ok = False
    if not ok:
        final = f" ({n_layers} = the final residual)" if where == "pre" else ""
        raise ValueError(
            f"layer {layer!r} is out of range for where={where!r}: valid layers are 0..{top}{final} "
            f"on this {n_layers}-block model"
        )
    layer = operator.index(layer)
    if where == "post":
        return resid_post(layer)
    return resid_pre(layer) if layer < n_layers else resid_post(n_layers - 1)


@contextlib.contextmanager
def base_and_shortcut(model, base: bool, norm_shortcut: bool) -> Iterator[None]:
    """Adapters off if `base`, the norm shortcut if `norm_shortcut`; restored on exit."""
    ee, bridge = _split(model)
    with contextlib.ExitStack() as stack:
        if base:
            if ee is None:
                raise ValueError("base=True (adapters off) needs an EarlyExitModel, not a bare bridge")
            stack.enter_context(ee.adapters_disabled())
        if norm_shortcut:
            stack.enter_context(_norm_shortcut(bridge))
        yield


@contextlib.contextmanager
def capturing(
    model,
    layers: Sequence[int],
    *,
    where: Where = "pre",
    rows: Any = None,
    base: bool = False,
    norm_shortcut: bool = True,
) -> Iterator[dict[int, Tensor]]:
    """Context yielding a dict that every forward run inside fills with ``{layer: residual}``.

    Args:
        model: an `EarlyExitModel` or a bare TransformerLens bridge.
        layers: layers to capture (see the module doc for ``where``).
        rows: None keeps the whole ``[batch, pos, d_model]`` tensor the hook sees (the tensor
            itself, no copy); otherwise an index into ``[batch, pos]`` (e.g. ``(row_ids,
            pos_ids)`` -> ``[n, d_model]``, or ``(0, p)`` -> ``[d_model]``), applied in the hook
            so only those rows are kept.
        base: LoRA adapters off (the base model) for forwards inside; needs an `EarlyExitModel`.
        norm_shortcut: run the bridge's norms through `norm_shortcut` (bit-identical, faster).

    A later forward inside the same context overwrites the dict's entries. The capture hooks
    are attached before anything the body attaches, so they see each residual before exit
    hooks (`ExitState`) on the same points change it.
    """
    _, bridge = _split(model)
    store, pairs = capture_hooks(model, layers, where=where, rows=rows)
    with base_and_shortcut(model, base, norm_shortcut), bridge.hooks(fwd_hooks=pairs):
        yield store


def capture_hooks(
    model, layers: Sequence[int], *, where: Where = "pre", rows: Any = None
) -> tuple[dict[int, Tensor], list[tuple[str, Any]]]:
    """`capturing`'s dict and the ``(hook name, fn)`` pairs that fill it, for a caller that attaches
    them itself (`eetools.core.fast.bypass.hooked`, which may run them on the HF modules).

    Every layer is validated (a one-line ValueError) before any pair is made.
    """
    _, bridge = _split(model)
    n_layers = int(bridge.cfg.n_layers)
    names = {}
    for l in layers:  # the name first: it gives the one-line error for a bad layer
        name = residual_hook_name(l, n_layers, where)
        names[operator.index(l)] = name
    store: dict[int, Tensor] = {}

    def grab(layer: int):
        def hook(resid, hook):
            store[layer] = resid if rows is None else resid[rows]

        return hook

    return store, [(name, grab(l)) for l, name in names.items()]


def capture_residuals(
    model,
    tokens: Int[Tensor, "batch pos"],
    layers: Sequence[int],
    *,
    attention_mask: Tensor | None = None,
    where: Where = "pre",
    rows: Any = None,
    base: bool = False,
    norm_shortcut: bool = True,
    return_logits: bool = False,
):
    """One plain bridge forward (no exits) capturing the residual stream at `layers`.

    Returns ``{layer: Float[Tensor, "batch pos d_model"]}`` (rows selected by `rows`, see
    `capturing`), or ``(that dict, logits [batch, pos, vocab])`` with `return_logits`. The
    logits are the full-depth ones, of the whole batch. Gradients are tracked as the caller's
    context says: wrap it in `torch.no_grad()` for analysis.
    """
    _, bridge = _split(model)
    kwargs = {"attention_mask": attention_mask} if attention_mask is not None else {}
    with capturing(model, layers, where=where, rows=rows, base=base, norm_shortcut=norm_shortcut) as store:
        logits = bridge(tokens, return_type="logits", **kwargs)
    return (dict(store), logits) if return_logits else dict(store)


def lens_logits(
    model, resid: Float[Tensor, "... d_model"], *, base: bool = False, norm_shortcut: bool = False
) -> Float[Tensor, "... vocab"]:
    """Logit lens with the final norm: ``unembed(ln_final(resid))``.

    `base` turns the adapters off for the readout (only matters if they touch the final norm or
    unembedding); `norm_shortcut` enters the (bit-identical) shortcut for the final norm. Both
    default off, so that inside a forward's contexts (as `EarlyExitModel.readout`, called per
    decode step) nothing is entered twice.
    """
    _, bridge = _split(model)
    if not base and not norm_shortcut:
        return bridge.unembed(bridge.ln_final(resid))
    with base_and_shortcut(model, base, norm_shortcut):
        return bridge.unembed(bridge.ln_final(resid))


def lens_logprobs(
    model, resid: Float[Tensor, "... d_model"], *, base: bool = False, norm_shortcut: bool = False
) -> Float[Tensor, "... vocab"]:
    """`lens_logits` as float32 log-probabilities."""
    return lens_logits(model, resid, base=base, norm_shortcut=norm_shortcut).float().log_softmax(-1)

"""Top-k lens readouts of chosen positions at chosen layers: `lens_topk`.

What a lens grid (`eetools.views.lens_grid`) and the token colouring's hover read: for each layer
``l`` and position ``p`` of one sequence, the `k` most probable tokens of ``softmax(unembed(
ln_final(resid_l[p])))`` and the probability of a given target token. Captured through
`eetools.core.lens` (the same hook points and clean-up as every other lens reader), either on a
plain forward (the model as it is, no exits) or on a forward with prescribed exits, where every
position sees the context it was generated with (frozen residuals of earlier exited tokens), so
the readout of a position at its own exit layer is exactly the distribution its token was drawn
from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from eetools.core.lens import _split, capture_residuals, capturing, lens_logits
from eetools.core.lenses import resolve_readout

__all__ = ["LensTopK", "lens_topk"]


@dataclass
class LensTopK:
    """Top-k readouts of `n` positions at `n_layer` layers (CPU tensors).

    Attributes:
        layers: the layers read, one per row (``L`` = the final residual).
        ids: top-k token ids ``[n_layer, n, k]``, most probable first.
        probs: their probabilities ``[n_layer, n, k]`` (float32).
        p_target: the probability of each position's target token ``[n_layer, n]`` (NaN without targets).
    """

    layers: list[int]
    ids: Int[Tensor, "n_layer n k"]
    probs: Float[Tensor, "n_layer n k"]
    p_target: Float[Tensor, "n_layer n"]

    def __post_init__(self):
        m, n, k = self.ids.shape
        if m != len(self.layers) or tuple(self.probs.shape) != (m, n, k) or tuple(self.p_target.shape) != (m, n):
            raise ValueError(
                f"LensTopK: ids {tuple(self.ids.shape)}, probs {tuple(self.probs.shape)} and p_target "
                f"{tuple(self.p_target.shape)} do not match {m} layers x positions x k"
            )


@torch.no_grad()
def lens_topk(
    model,
    tokens: Int[Tensor, "1 pos"],
    positions: Sequence[int],
    layers: Sequence[int],
    *,
    k: int = 5,
    targets: Sequence[int] | None = None,
    exit_at: Int[Tensor, "1 pos"] | None = None,
    attention_mask: Int[Tensor, "1 pos"] | None = None,
    base: bool = False,
    readout=None,
) -> LensTopK:
    """Top-`k` lens readouts of `positions` of one sequence at `layers` (see the module doc).

    Args:
        model: an `EarlyExitModel` or a bare bridge (a bridge only without `exit_at`).
        tokens: one sequence ``[1, pos]``.
        positions: the positions to read (each predicts the token after it).
        layers: layers ``0..L`` as in `eetools.core.lens` (``L``: the final residual).
        k: how many tokens to keep per cell (at most the vocabulary).
        targets: one token id per position whose probability to record (e.g. the token generated there).
        exit_at: prescribed exit layer per position (``L`` = none) for a forward with exits; None: plain forward.
        attention_mask: the sequence's mask (left padding), if any.
        base: adapters off (the base model); needs an `EarlyExitModel`.
        readout: how each layer is read out (`eetools.core.lenses.resolve_readout`): None/"logit"
            the logit lens, "exit" the model's exit readout, or a `Readout` (a `TunedLens` needs a
            translator at every layer read below ``L``; ``L`` is read as it is).

    Returns:
        A `LensTopK`. Under exits the stream of a position above its exit layer is the frozen one,
        except at ``L``, read before the freeze (callers show those cells as frozen).
    """
    ee, bridge = _split(model)
    if tokens.ndim != 2 or tokens.shape[0] != 1:
        raise ValueError(f"tokens must be one sequence [1, pos], got shape {tuple(tokens.shape)}")
    vocab = int(bridge.cfg.d_vocab)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an int in 1..{vocab} (the vocabulary), got {k!r}")
    pos = torch.as_tensor(list(positions), dtype=torch.long)
    if pos.numel() and not (0 <= int(pos.min()) and int(pos.max()) < tokens.shape[1]):
        raise ValueError(f"positions must lie in 0..{tokens.shape[1] - 1}, got {pos.tolist()}")
    if targets is not None and len(targets) != len(pos):
        raise ValueError(f"{len(targets)} targets for {len(pos)} positions: give one target per position")
    device = next(bridge.parameters()).device
    tokens = tokens.to(device)
    mask = attention_mask.to(device) if attention_mask is not None else None
    rows = (0, pos.to(device))
    if exit_at is None:
        store = capture_residuals(model, tokens, layers, attention_mask=mask, rows=rows, base=base, norm_shortcut=False)
    else:
        if ee is None:
            raise ValueError("exit_at needs an EarlyExitModel (exits are its hooks), not a bare bridge")
        # run_with_exits enters the norm shortcut itself; the capture hooks go on first
        with capturing(model, layers, rows=rows, base=base, norm_shortcut=False) as live:
            ee.run_with_exits(tokens, mask, exit_at=exit_at.to(device))
            store = dict(live)
    ids, probs, p_target = [], [], []
    tgt = torch.as_tensor(list(targets), dtype=torch.long, device=device) if targets is not None else None
    reader = resolve_readout(model, readout)
    n_layers = int(bridge.cfg.n_layers)
    for l in layers:
        resid = store[int(l)]
        if int(l) < n_layers:
            resid = reader.translate(resid, int(l))
        p = lens_logits(model, resid, base=base).float().softmax(-1)  # [n, vocab]
        top = p.topk(k, dim=-1)
        ids.append(top.indices.cpu())
        probs.append(top.values.cpu())
        if tgt is None:
            p_target.append(torch.full((len(pos),), float("nan")))
        else:
            p_target.append(p.gather(-1, tgt[:, None]).squeeze(-1).cpu())
    n = len(pos)
    return LensTopK(
        layers=[int(l) for l in layers],
        ids=torch.stack(ids) if ids else torch.zeros(0, n, k, dtype=torch.long),
        probs=torch.stack(probs) if probs else torch.zeros(0, n, k),
        p_target=torch.stack(p_target) if p_target else torch.zeros(0, n),
    )

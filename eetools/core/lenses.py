"""Readouts: how a residual at some layer becomes a next-token prediction. `LogitLens` and `TunedLens`.

A readout maps the residual ``h`` entering block ``l`` to logits. Every readout ends with the
model's own final norm and unembedding (`eetools.core.lens.lens_logits`); they differ in what they
do to ``h`` first (`Readout.translate`):

- `LogitLens`: nothing, ``unembed(ln_final(h))``: what an exited token has always emitted.
- `TunedLens` (Belrose et al. 2023, AlignmentResearch/tuned-lens): one affine translator per
  layer in residual form, ``h + A_l h + b_l``, then the final norm and unembedding. ``A_l`` and
  ``b_l`` start at zero, so an untrained tuned lens is exactly the logit lens, and training
  (`eetools.train.tune_readout`: KL from the final distribution, the model frozen) starts there.

An `EarlyExitModel` holds one readout (``ee_model.exit_readout``, the logit lens by default) and
reads exited tokens out through it. Only the exited token's own prediction changes: the residual
that later tokens attend to (and that later blocks' keys and values are computed from) stays the
frozen ``h``; the translation is applied to the stream leaving the last block, which nothing but
the final norm reads (`translate_exited`, called by the freeze hook of the last block).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from eetools.core.lens import lens_logits

__all__ = ["READOUT_KINDS", "LogitLens", "Readout", "TunedLens", "make_readout", "resolve_readout"]

READOUT_KINDS = ("logit", "tuned")


class Readout(nn.Module):
    """Base of the readouts: ``logits(model, h, layer) = unembed(ln_final(translate(h, layer)))``.

    ``layer`` is the layer ``h`` enters (``0 .. L-1``); None is the final residual (leaving the
    last block), which every readout reads as it is.
    """

    kind: str = "?"
    identity: bool = False  # translate is the identity at every layer (the freeze hooks then skip it)

    def translate(self, resid: Float[Tensor, "... d_model"], layer: int | None) -> Float[Tensor, "... d_model"]:
        raise NotImplementedError

    def logits(
        self, model, resid: Float[Tensor, "... d_model"], layer: int | None, *, base: bool = False
    ) -> Float[Tensor, "... vocab"]:
        """The readout of `resid` (entering `layer`) through `model`'s final norm and unembedding."""
        return lens_logits(model, self.translate(resid, layer), base=base)

    def translate_exited(
        self, resid: Float[Tensor, "batch pos d_model"], exit_at: Int[Tensor, "batch pos"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """`resid` with each position exited at layer ``l`` (``exit_at``) translated as at ``l``; others unchanged."""
        return resid

    def config(self) -> dict:
        """What rebuilds this readout (with `make_readout`), saved beside its weights."""
        return {"kind": self.kind}


class LogitLens(Readout):
    """The logit lens: the residual read out as it is, ``unembed(ln_final(h))``. No parameters."""

    kind, identity = "logit", True

    def translate(self, resid, layer):
        return resid

    def extra_repr(self) -> str:
        return "unembed(ln_final(h))"


class TunedLens(Readout):
    """One affine translator per layer, ``h + A_l h + b_l`` (residual form), then the logit lens.

    Args:
        d_model: the residual's width.
        layers: the layers with a translator (e.g. the exitable layers), increasing, within ``0 .. L-1``.

    The translators start at zero (``A_l = 0``, ``b_l = 0``): the lens is then exactly the logit
    lens. They run in float32 (their own dtype) whatever the residual's, and give back the
    residual's dtype.
    """

    kind = "tuned"

    def __init__(self, d_model: int, layers: Sequence[int]):
        super().__init__()
        layers = [int(l) for l in layers]
        if not layers or layers != sorted(set(layers)) or layers[0] < 0:
            raise ValueError(f"TunedLens layers must be increasing, distinct layers >= 0, got {layers}")
        self.d_model, self.layers = int(d_model), layers
        self.translators = nn.ModuleDict({str(l): nn.Linear(self.d_model, self.d_model) for l in layers})
        for t in self.translators.values():
            nn.init.zeros_(t.weight)
            nn.init.zeros_(t.bias)

    def _translator(self, layer: int) -> nn.Linear:
        t = self.translators._modules.get(str(layer))
        if t is None:
            raise ValueError(
                f"this TunedLens has translators for layers {self.layers}, not for layer {layer}: read "
                f"out one of those layers, or tune a lens for layer {layer} (eetools.train.tune_readout(layers=...))"
            )
        return t

    def translate(self, resid, layer):
        if layer is None:  # the final residual
            return resid
        t = self._translator(layer)
        h = resid if resid.dtype == t.weight.dtype else resid.to(t.weight.dtype)
        return (h + nn.functional.linear(h, t.weight, t.bias)).to(resid.dtype)

    def translate_exited(self, resid, exit_at):
        out = resid
        for l in self.layers:
            # every translator on every position (no device sync to find the exited ones); d_model^2
            # per token and layer, small beside the unembedding's vocab x d_model
            out = torch.where((exit_at == l).unsqueeze(-1), self.translate(resid, l), out)
        return out

    def config(self) -> dict:
        return {"kind": self.kind, "d_model": self.d_model, "layers": self.layers}

    def extra_repr(self) -> str:
        return f"h + A_l h + b_l at layers {self.layers}"


def make_readout(kind: str | Readout | None, *, d_model: int = 0, layers: Sequence[int] = ()) -> Readout:
    """A readout from its kind ("logit", "tuned": an untrained `TunedLens` at `layers`) or a `Readout` itself."""
    if kind is None:
        return LogitLens()
    if isinstance(kind, Readout):
        return kind
    if kind == "logit":
        return LogitLens()
    if kind == "tuned":
        return TunedLens(d_model, layers)
    raise ValueError(f"readout must be one of {READOUT_KINDS} or a Readout, got {kind!r}")


def resolve_readout(model, readout: str | Readout | None) -> Readout:
    """The readout an analysis reads through: None or "logit" the `LogitLens` (the default), "exit" the
    `EarlyExitModel`'s own exit readout (``model.exit_readout``), or a `Readout` itself."""
    if readout is None or readout == "logit":
        return LogitLens()
    if isinstance(readout, Readout):
        return readout
    if readout == "exit":
        r = getattr(model, "__dict__", {}).get("_modules", {}).get("exit_readout")
        if r is None:
            raise ValueError("readout='exit' needs an EarlyExitModel (its exit readout), not a bare bridge")
        return r
    raise ValueError(f"readout must be None, 'logit', 'exit' or a Readout (e.g. a TunedLens), got {readout!r}")

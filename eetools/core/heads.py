"""Exit heads: one small network per exitable layer, reading the residual stream.

A head maps the residual stream entering block `l` to one logit `z_l`;
``c_l = sigmoid(z_l)`` is the probability of exiting at `l` given the token got there.
The input is layer-normalised (no learned scale) so one learning rate suits every depth.
Heads start with a negative bias (``c ≈ 0.007``) so an uncalibrated model behaves like
the base model.

``kind="confidence"`` is the parameter-free baseline of the early-exit literature (e.g.
CALM's softmax confidence): ``c_l`` is the largest probability of the logit lens at `l`, so
a token exits where the early readout is confident. It needs no calibration, and shows what
the learned heads add. ``kind="lens"`` combines the two: the learned MLP, fed the logit lens
at its layer beside the residual (docs/experiments.md: "Heads that read the logit lens").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from eetools.core.rule import top_confidence  # noqa: F401 (the lens's confidence, shared with the exit rules)

HEAD_KINDS = ("mlp", "linear", "lens", "confidence")
TRAINABLE_KINDS = ("mlp", "linear", "lens")
INIT_BIAS = -5.0
# a "lens" head reads log-probabilities floored at LENS_FLOOR and divided by LENS_SCALE: in [-4, 0],
# the scale of the layer-normalised residual beside them (below e^-16 a token's odds do not matter)
LENS_FLOOR, LENS_SCALE = -16.0, 4.0


class ExitHead(nn.Module):
    """``d_model -> 1`` exit logit; ``kind="mlp"`` is the authors' ``d -> 2d -> 1`` ReLU MLP.

    ``kind="lens"`` is the same MLP reading the residual *and* the logit lens at its layer (the
    early readout's log-probabilities, ``vocab`` more inputs): what the exit would emit, so the
    head need not re-learn the final norm and unembedding to tell a confident readout.
    """

    def __init__(
        self,
        d_model: int,
        kind: str = "mlp",
        init_bias: float = INIT_BIAS,
        readout: Callable[[Tensor], Tensor] | None = None,
        vocab: int = 0,
    ):
        super().__init__()
        if kind not in TRAINABLE_KINDS:
            raise ValueError(f"ExitHead kind must be one of {TRAINABLE_KINDS}, got {kind!r}")
        if kind == "lens" and (readout is None or vocab < 1):
            raise ValueError("a 'lens' head needs the model's readout and vocabulary size")
        self.kind, self.d_model = kind, d_model
        self.readout = readout if kind == "lens" else None  # a function, not a submodule
        if kind in ("mlp", "lens"):
            width = d_model + (vocab if kind == "lens" else 0)
            self.net = nn.Sequential(nn.Linear(width, 2 * d_model), nn.ReLU(), nn.Linear(2 * d_model, 1))
        else:
            self.net = nn.Sequential(nn.Linear(d_model, 1))
        last = self.net[-1]
        nn.init.normal_(last.weight, std=0.01)
        nn.init.constant_(last.bias, init_bias)

    def forward(self, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, ...]:
        # functional form of self.net (same parameters): decode steps call 7 heads per token, so
        # the layers are fetched from `_modules` (indexing an nn.Sequential walks it)
        layers = self.net._modules
        first = layers["0"]
        w = first.weight
        x = nn.functional.layer_norm(resid if resid.dtype == w.dtype else resid.to(w.dtype), (self.d_model,))
        if self.kind == "lens":
            lens = self.readout(resid).to(w.dtype).log_softmax(-1)
            x = torch.cat([x, lens.clamp(min=LENS_FLOOR) / LENS_SCALE], -1)
        x = nn.functional.linear(x, w, first.bias)
        if self.kind != "linear":
            last = layers["2"]
            x = nn.functional.linear(torch.relu(x), last.weight, last.bias)
        return x.squeeze(-1)


class ConfidenceHead(nn.Module):
    """Parameter-free head: ``c_l`` = the largest probability of the logit lens ``readout(resid)``.

    Returns the logit of that probability, ``x_max - logsumexp(other logits)``: exact where the
    probability rounds to 1 in float32, so thresholds such as 0.9999 stay meaningful.
    """

    def __init__(self, readout: Callable[[Tensor], Tensor]):
        super().__init__()
        self.readout = readout  # a function, not a submodule: the bridge's weights stay the bridge's

    def forward(self, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, ...]:
        return top_confidence(self.readout(resid))[0]


def make_head(kind: str, d_model: int, readout: Callable[[Tensor], Tensor], vocab: int = 0) -> nn.Module:
    """An exit head of `kind` (one of `HEAD_KINDS`); `readout` is the logit lens, used by "lens" and "confidence"."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"head must be one of {HEAD_KINDS}, got {kind!r}")
    if kind == "confidence":
        return ConfidenceHead(readout)
    return ExitHead(d_model, kind, readout=readout, vocab=vocab)


def stick_breaking(cond: Float[Tensor, "... m"]) -> Float[Tensor, "... m_plus_1"]:
    """Exit distribution over m exitable layers plus "no exit" from conditional probabilities.

    ``P(e_i) = c_i * prod_{j<i}(1 - c_j)``, ``P(no exit) = prod_j (1 - c_j)``.
    """
    survive = torch.cumprod(1 - cond, dim=-1)
    before = torch.cat([torch.ones_like(cond[..., :1]), survive[..., :-1]], dim=-1)
    return torch.cat([cond * before, survive[..., -1:]], dim=-1)


VETOED = -1e4
"""Exit logit of a layer whose exit a rule vetoes (``sigmoid`` is 0 in float32; finite, so no NaN in gradients)."""


def exit_log_probs(
    exit_logits: Float[Tensor, "... m"], allowed: Bool[Tensor, "... m"] | None = None
) -> Float[Tensor, "... m_plus_1"]:
    """Log of `stick_breaking(sigmoid(exit_logits))`, computed stably with logsigmoid.

    `allowed` (None: every layer) masks exits a rule vetoes (patience, the confidence floor):
    such a layer's exit probability is 0 (the action is masked, as in RL with invalid actions),
    the others keep their conditional probability, and a vetoed head gets no gradient.
    """
    if allowed is not None:
        exit_logits = exit_logits.masked_fill(~allowed, VETOED)
    log_c = nn.functional.logsigmoid(exit_logits)
    log_not = nn.functional.logsigmoid(-exit_logits)
    cum_not = torch.cumsum(log_not, dim=-1)
    before = torch.cat([torch.zeros_like(log_c[..., :1]), cum_not[..., :-1]], dim=-1)
    return torch.cat([log_c + before, cum_not[..., -1:]], dim=-1)

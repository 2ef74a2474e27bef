"""`Rollout`: what a generation with exits produced, as tensors with checked shapes.

Alignment convention: entry `t` of every per-token field describes the forward pass that
*produced* generated token `t`. Its exit layer is the layer at which the position before
it (the previous token) stopped; the first generated token is always predicted at full
depth (exit layer `L`, exit log-prob 0), because prompt positions never exit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from eetools.core.rule import ExitRule


@dataclass
class Rollout:
    """A batch of generated continuations with their exit decisions.

    Attributes:
        prompts: the prompt strings.
        prompt_tokens: left-padded prompt ids ``[batch, prompt_pos]``.
        prompt_mask: 1 where `prompt_tokens` is a real token.
        tokens: generated ids ``[batch, new]`` (padding after EOS).
        mask: True for generated tokens up to and including EOS.
        exit_layers: layer at which each token was predicted (`n_layers` = no exit).
        token_logprobs: log-prob of each token under the model (temperature 1).
        exit_logprobs: log-prob of each exit decision under the heads' stick-breaking.
        exit_probs: heads' conditional exit probabilities ``[batch, new, n_exit_layers]`` (0 after EOS).
        text: decoded continuations (EOS and padding removed).
        str_tokens: generated tokens as strings, per sequence (up to and including EOS).
        prompt_str_tokens: prompt tokens as strings, per sequence (no padding).
        n_layers: number of blocks `L` of the model.
        layers: the exitable layers.
        mode: exit mode used ("sample", "threshold" or "off"); the rule's (kept for older callers).
        exit_allowed: with lens checks (patience, a confidence floor, an entropy ceiling), whether
            they let each token exit at each exitable layer ``[batch, new, n_exit]`` (layers after a
            token's exit are True); None: no check.
        patience: the patience the rollout was decoded with (0: none); the rule's.
        min_confidence: the floor on the logit lens's top probability it was decoded with (0: none); the rule's.
        rule: the `ExitRule` the rollout was decoded with. Left out, it is built from `mode`,
            `patience` and `min_confidence`; given, those three are set from it.
    """

    prompts: list[str]
    prompt_tokens: Int[Tensor, "batch prompt_pos"]
    prompt_mask: Int[Tensor, "batch prompt_pos"]
    tokens: Int[Tensor, "batch new"]
    mask: Bool[Tensor, "batch new"]
    exit_layers: Int[Tensor, "batch new"]
    token_logprobs: Float[Tensor, "batch new"]
    exit_logprobs: Float[Tensor, "batch new"]
    exit_probs: Float[Tensor, "batch new n_exit"]
    text: list[str]
    str_tokens: list[list[str]]
    prompt_str_tokens: list[list[str]]
    n_layers: int
    layers: list[int]
    mode: str = "sample"
    meta: dict = field(default_factory=dict)
    exit_allowed: Bool[Tensor, "batch new n_exit"] | None = None
    patience: int = 0
    min_confidence: float = 0.0
    rule: ExitRule | None = None

    def __post_init__(self):
        if self.rule is None:
            self.rule = ExitRule(mode=self.mode, patience=self.patience, min_confidence=self.min_confidence)
        else:  # the rule is the record; the loose fields mirror it
            self.mode, self.patience, self.min_confidence = self.rule.mode, self.rule.patience, self.rule.min_confidence
        b, n = self.tokens.shape
        for name in ("mask", "exit_layers", "token_logprobs", "exit_logprobs"):
            t = getattr(self, name)
            if tuple(t.shape) != (b, n):
                raise ValueError(f"Rollout.{name} has shape {tuple(t.shape)}, expected {(b, n)}")
        if tuple(self.exit_probs.shape) != (b, n, len(self.layers)):
            raise ValueError(
                f"Rollout.exit_probs has shape {tuple(self.exit_probs.shape)}, expected {(b, n, len(self.layers))}"
            )
        if self.exit_allowed is not None and tuple(self.exit_allowed.shape) != tuple(self.exit_probs.shape):
            raise ValueError(
                f"Rollout.exit_allowed has shape {tuple(self.exit_allowed.shape)}, "
                f"expected {tuple(self.exit_probs.shape)}"
            )
        if len(self.prompts) != b or len(self.text) != b:
            raise ValueError("Rollout: prompts/text must have one entry per sequence")

    @property
    def max_entropy(self) -> float | None:
        """The ceiling on the logit lens's entropy (nats) the rollout was decoded with (None: none)."""
        return self.rule.max_entropy

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def n_tokens(self) -> Int[Tensor, " batch"]:
        """Generated tokens per sequence (EOS included)."""
        return self.mask.sum(1)

    @property
    def allowed_exit_probs(self) -> Float[Tensor, "batch new n_exit"]:
        """`exit_probs` where the lens checks (patience, confidence floor, entropy ceiling) let a token exit, 0 where they
        vetoed: the conditional probabilities of the exit policy the rollout was decoded under
        (`exit_probs` without a rule)."""
        return self.exit_probs if self.exit_allowed is None else self.exit_probs * self.exit_allowed

    @property
    def blocks_used(self) -> Int[Tensor, "batch new"]:
        """Blocks of compute each token's prediction used (0 where masked)."""
        return self.exit_layers * self.mask

    @property
    def compute(self) -> Float[Tensor, " batch"]:
        """Mean over generated tokens of blocks used / L, per sequence."""
        used = (self.exit_layers.float() / self.n_layers) * self.mask
        return used.sum(1) / self.mask.sum(1).clamp(min=1)

    @property
    def layers_saved(self) -> Float[Tensor, " batch"]:
        return 1 - self.compute

    @property
    def batch_compute(self) -> float:
        """Compute fraction over every generated token of the batch."""
        used = (self.exit_layers.float() / self.n_layers) * self.mask
        return float(used.sum() / self.mask.sum().clamp(min=1))

    @property
    def sequences(self) -> Int[Tensor, "batch pos"]:
        """Prompt and generated tokens, ``[batch, prompt_pos + new]``."""
        return torch.cat([self.prompt_tokens, self.tokens], dim=1)

    @property
    def attention_mask(self) -> Int[Tensor, "batch pos"]:
        return torch.cat([self.prompt_mask, self.mask.long()], dim=1)

    def prescribed_exit_layers(self) -> Int[Tensor, "batch pos"]:
        """Per-position exit layers for `prescribed_forward` on `sequences`.

        Position of generated token `t` decides token `t+1`, so it gets ``exit_layers[t+1]``;
        prompt positions and the last position get `L`.
        """
        b, p = self.prompt_tokens.shape
        out = torch.full((b, p + self.tokens.shape[1]), self.n_layers, dtype=torch.long)
        out[:, p : p + self.tokens.shape[1] - 1] = torch.where(self.mask[:, 1:], self.exit_layers[:, 1:], self.n_layers)
        return out

    def exit_histogram(self) -> Float[Tensor, " n_exit_plus_1"]:
        """Fraction of generated tokens predicted at each exitable layer, then at full depth."""
        counts = torch.tensor(
            [float(((self.exit_layers == l) & self.mask).sum()) for l in [*self.layers, self.n_layers]]
        )
        return counts / counts.sum().clamp(min=1)

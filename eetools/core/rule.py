"""`ExitRule`: where a token may exit, as one frozen, validated value.

The exit heads give each exitable layer a probability ``c_l``; the rule says how that becomes
an exit (`mode`: sampled, thresholded, or never) and which further checks on the logit lens
(the readout of the residual at that layer) must hold for an exit to happen there: patience
(the lens's top token has held), a confidence floor (its top probability), an entropy ceiling
(its entropy). Every function that decodes with exits takes one `ExitRule` instead of loose
keyword arguments, so the settings are validated once, here, and a new rule is added here only:
a field, its check in `__post_init__`, and a line in `ExitRule.allows`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

MODES = ("sample", "threshold", "off")


class _Unset:
    """The default of a keyword argument that was not given (None is a value for some settings)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
"""Marks an exit setting left out of a call, so that it neither overrides nor conflicts with a `rule`."""


def check_threshold(threshold: float | Sequence[float], n_exit: int | None = None) -> float | tuple[float, ...]:
    """An exit threshold, checked: one number in (0, 1], or one per exitable layer (`n_exit` of them).

    Exits happen where ``c_l >= threshold`` (or ``>= threshold[i]`` at the i-th exitable layer).
    Returns a float or a tuple of floats.
    """
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        values, one = [float(threshold)], True
    else:
        try:
            if isinstance(threshold, (str, bytes)):
                raise TypeError
            values, one = [float(t) for t in threshold], False
        except (TypeError, ValueError):
            raise TypeError(
                f"threshold must be a number in (0, 1] or one per exitable layer, got {threshold!r}"
            ) from None
        if n_exit is not None and len(values) != n_exit:
            raise ValueError(
                f"threshold has {len(values)} values but the model has {n_exit} exitable layers; "
                f"give one number, or one per exitable layer"
            )
    for t in values:
        if not 0.0 < t <= 1.0:
            raise ValueError(f"threshold must be in (0, 1] (exit where c >= threshold), got {t}")
    return values[0] if one else tuple(values)


def check_patience(patience: int, mode: str, n_exit: int | None = None) -> int:
    """The patience of exits, checked: an int in ``0 .. n_exit - 1`` (``>= 0`` without `n_exit`),
    and only with a mode that exits."""
    if isinstance(patience, bool) or not isinstance(patience, int):
        raise TypeError(f"patience must be an int (exitable layers whose lens must agree), got {patience!r}")
    if patience and mode not in ("threshold", "sample"):
        raise ValueError(
            f"patience applies to exits (mode 'threshold' or 'sample'), not mode={mode!r}, which "
            f"never exits: pass patience=0"
        )
    if n_exit is None and patience < 0:
        raise ValueError(f"patience must be >= 0 (the first `patience` exitable layers cannot exit), got {patience}")
    if n_exit is not None and not 0 <= patience < n_exit:
        raise ValueError(
            f"patience must be in 0 .. {n_exit - 1} (the model has {n_exit} exitable layers, and the first "
            f"`patience` of them cannot exit), got {patience}"
        )
    return patience


def check_min_confidence(min_confidence: float, mode: str) -> float:
    """The lens-confidence floor of exits, checked: a number in ``[0, 1)``, and only with a mode that exits."""
    if isinstance(min_confidence, bool) or not isinstance(min_confidence, (int, float)):
        raise TypeError(f"min_confidence must be a number in [0, 1), got {min_confidence!r}")
    if not 0.0 <= min_confidence < 1.0:
        raise ValueError(
            f"min_confidence must be in [0, 1) (the logit lens's top probability a token needs to exit; "
            f"0: no floor), got {min_confidence}"
        )
    if min_confidence and mode not in ("threshold", "sample"):
        raise ValueError(
            f"min_confidence applies to exits (mode 'threshold' or 'sample'), not mode={mode!r}, which "
            f"never exits: pass min_confidence=0"
        )
    return float(min_confidence)


def check_max_entropy(max_entropy: float | None, mode: str) -> float | None:
    """The lens-entropy ceiling of exits, checked: None (no ceiling) or a number ``>= 0`` (nats),
    and only with a mode that exits."""
    if max_entropy is None:
        return None
    if isinstance(max_entropy, bool) or not isinstance(max_entropy, (int, float)):
        raise TypeError(f"max_entropy must be a number >= 0 (nats) or None, got {max_entropy!r}")
    if math.isnan(max_entropy) or max_entropy < 0:
        raise ValueError(
            f"max_entropy must be >= 0 (the logit lens's entropy in nats a token may exit at; "
            f"None: no ceiling), got {max_entropy}"
        )
    if mode not in ("threshold", "sample"):
        raise ValueError(
            f"max_entropy applies to exits (mode 'threshold' or 'sample'), not mode={mode!r}, which "
            f"never exits: pass max_entropy=None"
        )
    return float(max_entropy)


def top_confidence(logits: Float[Tensor, "... vocab"]) -> tuple[Float[Tensor, ...], Int[Tensor, ...]]:
    """The logit of the largest probability of `logits`' softmax, ``x_max - logsumexp(other logits)``,
    and the index of that largest one. Exact where the probability rounds to 1 in float32. Here (not
    in `heads`, whose `ConfidenceHead` uses it) so that this module imports nothing from eetools."""
    logits = logits.float()
    top, where = logits.max(-1, keepdim=True)
    others = logits.scatter(-1, where, float("-inf")).logsumexp(-1)
    return top.squeeze(-1) - others, where.squeeze(-1)


def lens_held(top: Sequence[Tensor], i: int, patience: int) -> Tensor:
    """The patience rule: whether the lens's top token at exitable layer `i` (``top[i]``) equals its
    top token at each of the `patience` exitable layers before; all False where ``i < patience``."""
    held = torch.full_like(top[i], i >= patience, dtype=torch.bool)
    for back in range(1, min(patience, i) + 1):
        held &= top[i] == top[i - back]
    return held


def lens_entropy(logits: Float[Tensor, "*batch vocab"]) -> Float[Tensor, "*batch"]:
    """Entropy in nats of the softmax of `logits` (float32; 0 where a probability is 0)."""
    return torch.special.entr(logits.float().softmax(-1)).sum(-1)


@dataclass(frozen=True)
class ExitRule:
    """How the exit heads' ``c_l`` become exits, and the lens checks an exit must pass.

    Attributes:
        mode: "sample" (exit drawn with probability ``c_l``), "threshold" (exit where
            ``c_l >= threshold``) or "off" (never exit).
        threshold: the threshold of mode "threshold": one number in (0, 1], or one per exitable
            layer (a tuple; check its length with `checked`).
        patience: a token may exit at an exitable layer only where the logit lens's top token equals
            its top token at the `patience` exitable layers before (Zhou et al. 2020). 0: off.
        min_confidence: a token may exit only where the lens's top probability is at least this
            (Schuster et al. 2022). 0: off.
        max_entropy: a token may exit only where the lens's entropy (nats) is at most this. None: off.

    With mode "sample" the lens checks mask the exit action (a vetoed layer's exit probability
    is 0), which `Rollout.exit_allowed` records and RL trains. Invalid values raise at construction.
    """

    mode: str = "sample"
    threshold: float | tuple[float, ...] = 0.5
    patience: int = 0
    min_confidence: float = 0.0
    max_entropy: float | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        set_ = lambda name, value: object.__setattr__(self, name, value)  # frozen: normalised once, here
        set_("threshold", check_threshold(self.threshold))
        set_("patience", check_patience(self.patience, self.mode))
        set_("min_confidence", check_min_confidence(self.min_confidence, self.mode))
        set_("max_entropy", check_max_entropy(self.max_entropy, self.mode))

    @property
    def ruled(self) -> bool:
        """Whether some check on the logit lens, besides the heads, decides where exits may happen."""
        return bool(self.patience or self.min_confidence or self.max_entropy is not None)

    def checked(self, n_exit: int) -> ExitRule:
        """This rule, checked against a model with `n_exit` exitable layers (per-layer threshold
        count, patience range); raises otherwise."""
        check_threshold(self.threshold, n_exit)
        check_patience(self.patience, self.mode, n_exit)
        return self

    def thresholds(self, n_exit: int) -> tuple[float, ...]:
        """One threshold per exitable layer, whether one or several were given."""
        return (self.threshold,) * n_exit if isinstance(self.threshold, float) else self.threshold

    def replace(self, **changes) -> ExitRule:
        """A copy with `changes` (validated again)."""
        return dataclasses.replace(self, **changes)

    def heads_only(self, mode: str | None = None) -> ExitRule:
        """The same mode and threshold (or `mode`) without lens checks: what mode "off" and the
        confidence baseline run with."""
        return ExitRule(mode=mode or self.mode, threshold=self.threshold)

    @classmethod
    def from_kwargs(cls, rule: ExitRule | None = None, *, n_exit: int | None = None, **kwargs) -> ExitRule:
        """The rule of a call that takes ``rule=`` and the old keyword arguments (mode, threshold,
        patience, min_confidence, max_entropy; `UNSET` ones are ignored): `rule` if given (a
        keyword that disagrees with it is an error), else one built from the keywords. With
        `n_exit`, also `checked` against that many exitable layers."""
        given = {k: v for k, v in kwargs.items() if v is not UNSET}
        unknown = set(given) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(
                f"unknown exit settings {sorted(unknown)}; ExitRule takes mode, threshold, patience, "
                f"min_confidence and max_entropy"
            )
        if rule is None:
            if n_exit is not None and "patience" in given:  # the range is the clearer message
                check_patience(given["patience"], given.get("mode", "sample"), n_exit)
            rule = cls(**given)
        else:
            if not isinstance(rule, ExitRule):
                raise TypeError(f"rule must be an ExitRule, got {type(rule).__name__}")
            other = dataclasses.replace(rule, **given)
            clash = [k for k in given if getattr(other, k) != getattr(rule, k)]
            if clash:
                raise ValueError(
                    f"both rule= and {', '.join(f'{k}={given[k]!r}' for k in clash)} were given and "
                    f"they disagree; give the exit settings once"
                )
        return rule.checked(n_exit) if n_exit is not None else rule

    @property
    def floor_logit(self) -> float:
        """`min_confidence` as a logit, compared with the lens's top-probability logit (-inf: no floor)."""
        c = self.min_confidence
        return math.log(c / (1 - c)) if c else -math.inf

    def fires(self, c: Float[Tensor, " batch"], i: int, u: Float[Tensor, " batch"]) -> Bool[Tensor, " batch"]:
        """The heads' decision at the i-th exitable layer: ``u < c`` (sampled, `u` the step's
        uniforms) or ``c >= threshold`` (thresholded); the lens checks come on top (`allows`)."""
        if self.mode == "sample":
            return u < c
        return c >= (self.threshold if isinstance(self.threshold, float) else self.threshold[i])

    def allows(
        self, logits: Float[Tensor, "batch vocab"], i: int, top: list[Int[Tensor, " batch"]]
    ) -> Bool[Tensor, " batch"]:
        """Whether the lens checks let each row exit at the i-th exitable layer, given the logit
        lens's `logits` there. `top` holds the lens's top tokens at exitable layers ``0 .. i-1``
        (for patience); this layer's is appended, so call it for ``i = 0, 1, ...`` in order."""
        confidence, best = top_confidence(logits)  # the logit of the top probability, as a confidence head's
        top.append(best)
        ok = lens_held(top, i, self.patience)
        if self.min_confidence:
            ok = ok & (confidence >= self.floor_logit)
        if self.max_entropy is not None:
            ok = ok & (lens_entropy(logits) <= self.max_entropy)
        return ok

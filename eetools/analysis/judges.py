"""Coherence judges: functions from (example, completion) to a score in [0, 1].

The paper scored coherence with an LLM judge. eetools offers judges that work offline
and a protocol for plugging in any other:

- `ReasoningJudge`: for eetools' own tasks, the fraction of written reasoning steps that
  are well-formed and right (each column sum and carry; each placement's witnesses).
- `ReferenceLikelihoodJudge`: for any model, how likely the reference (base) model finds
  the completion, normalised so its own greedy completions score about 1.
- `CallableJudge`: wrap any function (e.g. a rubric prompt to a chat model you have).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch

from eetools import tasks as task_lib


@runtime_checkable
class Judge(Protocol):
    """Anything callable as ``judge(example, completion) -> float`` in [0, 1]."""

    name: str

    def __call__(self, example, completion: str) -> float: ...


class ReasoningJudge:
    """Fraction of the written reasoning steps that are well-formed and correct (`Task.coherence`).

    Works for any `Example` of an eetools task (the task is looked up by `example.task`).
    Never raises: anything that is not a string, or an unknown task, scores 0.
    """

    name = "reasoning"

    def __call__(self, example, completion: str) -> float:
        try:
            return task_lib.get(example.task).coherence(example, completion)
        except Exception:
            return 0.0


class CallableJudge:
    """Wrap a user function ``fn(example, completion) -> float`` as a judge.

    Scores are clipped to [0, 1]. An exception inside `fn` is re-raised as `JudgeError`
    naming the completion, so a failing judge is visible rather than silently scored.
    """

    def __init__(self, fn: Callable[[object, str], float], name: str | None = None):
        if not callable(fn):
            raise TypeError(f"CallableJudge needs a callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "custom")

    def __call__(self, example, completion: str) -> float:
        try:
            value = float(self.fn(example, completion))
        except Exception as e:
            raise JudgeError(f"judge {self.name!r} raised on completion {str(completion)[:80]!r}: {e}") from e
        if math.isnan(value):
            raise JudgeError(f"judge {self.name!r} returned NaN on completion {str(completion)[:80]!r}")
        return min(1.0, max(0.0, value))


class JudgeError(RuntimeError):
    """A user-supplied judge failed."""


class ReferenceLikelihoodJudge:
    """Reference-model likelihood of a completion, normalised to the model's own greedy text.

    ``score = min(1, exp(-(nll - nll_ref)))`` where `nll` is the completion's mean per-token
    negative log-likelihood under the reference model (no exits, adapters off) and `nll_ref`
    the same for the reference model's greedy completions on a few prompts (`fit`). A
    completion the base model would write itself scores about 1; incoherent text tends to 0.

    Args:
        ee_model: an `EarlyExitModel` (its base, adapters off, is the reference) or a bridge.
        nll_ref: the normaliser; call `fit(prompts)` to measure it (default 0: raw likelihood).
    """

    name = "reference_likelihood"

    def __init__(self, ee_model, nll_ref: float = 0.0):
        self.ee_model = ee_model
        self.nll_ref = float(nll_ref)

    def _ee(self):
        from eetools.core.model import EarlyExitModel, attach_exit_heads

        if isinstance(self.ee_model, EarlyExitModel):
            return self.ee_model
        self.ee_model = attach_exit_heads(self.ee_model)
        return self.ee_model

    @torch.no_grad()
    def nll(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """Mean per-token NLL of each completion given its prompt under the reference model."""
        from eetools.core.encoding import encode_sequences

        ee = self._ee()
        out = []
        for p, c in zip(prompts, completions):
            if not isinstance(c, str) or not c:
                out.append(float("inf"))
                continue
            ids, attn, predict = encode_sequences(ee, [p], [c[: int(ee.model.cfg.n_ctx)]])
            if ids.shape[1] > int(ee.model.cfg.n_ctx):
                out.append(float("inf"))
                continue
            logp = ee.teacher_forward(ids, attn).logprobs
            tok_lp = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
            m = predict[:, :-1].float()
            out.append(float(-(tok_lp * m).sum() / m.sum().clamp(min=1)))
        return out

    def fit(self, prompts: Sequence[str], max_new_tokens: int = 96) -> ReferenceLikelihoodJudge:
        """Set the normaliser to the mean NLL of the reference model's greedy completions."""
        ee = self._ee()
        with ee.adapters_disabled():
            r = ee.generate(list(prompts), max_new_tokens, mode="off", temperature=0, seed=0, heads=False)
        vals = [v for v in self.nll(prompts, r.text) if math.isfinite(v)]
        self.nll_ref = sum(vals) / max(len(vals), 1)
        return self

    def score_many(self, examples, completions: Sequence[str]) -> list[float]:
        prompts = [e.prompt if hasattr(e, "prompt") else str(e) for e in examples]
        try:
            nlls = self.nll(prompts, completions)
        except Exception:
            return [0.0] * len(prompts)
        return [min(1.0, math.exp(-(v - self.nll_ref))) if math.isfinite(v) else 0.0 for v in nlls]

    def __call__(self, example, completion: str) -> float:
        return self.score_many([example], [completion])[0]


def as_judge(judge) -> Judge:
    """A judge from a judge, a plain function, or a name ("reasoning")."""
    if judge == "reasoning":
        return ReasoningJudge()
    if isinstance(judge, (ReasoningJudge, ReferenceLikelihoodJudge, CallableJudge)):
        return judge
    if callable(judge):
        return CallableJudge(judge)
    raise TypeError(f"not a judge: {judge!r}")


def score_all(judge, examples, completions: Sequence[str]) -> list[float]:
    """Score many completions (batched when the judge supports it)."""
    judge = as_judge(judge)
    if hasattr(judge, "score_many"):
        return judge.score_many(examples, completions)
    return [judge(e, c) for e, c in zip(examples, completions)]

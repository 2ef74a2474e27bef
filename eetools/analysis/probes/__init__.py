"""Looking inside early-exit models: residual probes, skipped computation, oracle exits, hidden planning.

Every probe is a function that returns a dataclass holding a pandas DataFrame (``.df``,
the data) and a ``.figure()`` (a plotly view of it); data first, views second.

Public API (all importable from ``eetools.analysis.probes``; defining module in brackets):

- `collect_residuals(ee_model, examples)` -> `ResidualSet`: teacher-forced residual streams
  at every continuation token, with token classes and task variables per token [residuals].
- `fit_probe(residuals, layer, target)` -> `ProbeResult`: a linear probe (scikit-learn)
  with a shuffled-label baseline; `probe_sweep(residuals, target)` -> `ProbeSweep`, one
  row per layer [linear].
- `skipped_computation(ee_model, rollout)` -> `SkippedResult`: for each exited token, what
  the skipped blocks would have changed (KL, top-1 agreement, per-block norms and direct
  logit attribution); `linearised_final_norm`, the frozen-scale norm it uses [skipped].
- `oracle_exits(ee_model, examples)` -> `OracleResult` (earliest exitable layer whose
  logit-lens argmax equals the final argmax) and its pure core `oracle_from_logprobs`;
  `depth_necessity(ee_model, examples)` -> `DepthResult` (agreement and loss when every
  token is read out at one layer) [oracle].
- `hidden_planning(ee_model_before, ee_model_after, examples)` -> `HiddenPlanningResult`:
  how decodable the answer is before it is written, before vs after RL [planning].
- `annotate_tokens(pieces, task, example)`: token classes and task variables of a text;
  `TOKEN_CLASSES` per task; `guess_task(prompt)` [tokens].

Conventions:

- Layer ``l`` in ``0 .. L-1`` means the residual stream entering block ``l``
  (``resid_pre(l)`` in `eetools.core.hooks`); layer ``L`` ("final") means the stream leaving
  the last block (``resid_post(L-1)``), the one the final norm and unembedding read. All
  probes capture through `eetools.core.lens`.
- Rows of `collect_residuals` are token *positions*: the residual at position ``p`` sits on
  the token at ``p`` and predicts the token at ``p + 1``. The exit of position ``p``
  (docs/method.md section 4) decides the prediction of the next token.
- Rows of `oracle_exits`, `depth_necessity` and `skipped_computation` are *predictions*:
  one per predicted continuation token (and EOS), labelled by the predicted token, as in a
  `Rollout` (generated token ``t`` is predicted at position ``P + t - 1``).
- Token classes: addition -- "format" (``+ = : A``, spaces, newlines), "copied_digit"
  (the two operand digits and the carry-in of a column line), "computed_digit" (digits
  of a column sum), "answer" (digits after ``"A: "``); ToM -- "format", "copied_name"
  (agent names), "mark" (``+``/``-``: in the room or not), "container", "answer". Also "prompt" (a prompt token), "eos", and
  "other" (letters or digits in a line that does not follow the task's format).
"""

from __future__ import annotations

from eetools.analysis.probes.linear import ProbeResult, ProbeSweep, fit_probe, probe_sweep
from eetools.analysis.probes.oracle import (
    DepthResult,
    OracleResult,
    depth_necessity,
    oracle_exits,
    oracle_from_logprobs,
)
from eetools.analysis.probes.planning import HiddenPlanningResult, hidden_planning
from eetools.analysis.probes.residuals import ResidualSet, collect_residuals
from eetools.analysis.probes.skipped import SkippedResult, linearised_final_norm, skipped_computation
from eetools.analysis.probes.tokens import TOKEN_CLASSES, annotate_tokens, guess_task

__all__ = [
    "ResidualSet",
    "guess_task",
    "collect_residuals",
    "annotate_tokens",
    "TOKEN_CLASSES",
    "ProbeResult",
    "ProbeSweep",
    "fit_probe",
    "probe_sweep",
    "SkippedResult",
    "skipped_computation",
    "linearised_final_norm",
    "OracleResult",
    "oracle_exits",
    "oracle_from_logprobs",
    "DepthResult",
    "depth_necessity",
    "HiddenPlanningResult",
    "hidden_planning",
]

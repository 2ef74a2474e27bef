"""Accuracy against layers saved as the exit threshold moves: a model's operating points.

Sampled exits give one point. Thresholded exits (exit where ``c >= t``) give a curve, from
cautious thresholds near 1 to eager ones near 0. `tradeoff` evaluates the model at each
threshold on the same held-out examples (greedy tokens). It puts beside them the base model
(no exits, 0 % saved), the model itself at full depth when it has LoRA adapters ("no_exit":
what the adapters alone cost) and the oracle-exit bound (docs/method.md section 8: the most any
exit policy could save while keeping the base model's greedy text). With ``confidence=[...]``
it adds the parameter-free baseline on the same weights: exit where the logit lens's top
probability reaches ``t`` (``head="confidence"``, see `eetools.core.heads`), which shows what the
learned heads add.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
from tqdm.auto import tqdm

from eetools.core.options import check_value
from eetools.core.rule import UNSET, ExitRule

DEFAULT_THRESHOLDS = (0.9, 0.7, 0.5, 0.3, 0.15, 0.05)


@dataclass
class Tradeoff:
    """Operating points of one model on one task.

    Attributes:
        df: one row per point: ``system`` ("threshold", "sample", "base", "no_exit" with adapters,
            "confidence" when asked for, "oracle"), ``threshold`` (NaN except for "threshold" and
            "confidence" rows), ``n``, ``accuracy``, ``layers_saved``,
            ``compute`` and ``coherence`` (the judge's mean).
        task: the task's name.
        split: "test" (the frozen test split) or "validation" (`Task.validation_split`).
    """

    df: pd.DataFrame
    task: str
    split: str = "test"

    def best_threshold(self, max_drop: float = 0.01) -> float | None:
        """The threshold saving the most layers with accuracy at least the base model's minus `max_drop`.

        None if no threshold qualifies. Pick it on the validation split (``split="validation"``)
        and report the test split at it: the best point of a curve measured on the test split is
        an optimistic estimate of that point.
        """
        if not max_drop >= 0:
            raise ValueError(f"max_drop is the accuracy one may lose (a fraction, e.g. 0.01), got {max_drop}")
        base = float(self.df.loc[self.df.system == "base", "accuracy"].iloc[0])
        ok = self.df[(self.df.system == "threshold") & (self.df.accuracy >= base - max_drop - 1e-9)]
        return None if ok.empty else float(ok.sort_values("layers_saved").threshold.iloc[-1])

    def _repr_html_(self) -> str:
        return self.df.to_html(float_format=lambda v: f"{v:.3f}", formatters={"threshold": "{:g}".format}, index=False)

    def figure(self) -> go.Figure:
        """Accuracy against layers saved: the threshold curve, the sampled point, base, oracle (and the confidence baseline)."""
        fig = go.Figure()
        styles = {
            "threshold": dict(mode="lines+markers+text", marker=dict(size=8, color="rgb(40,70,170)")),
            "sample": dict(mode="markers", marker=dict(size=12, symbol="diamond", color="rgb(215,48,31)")),
            "base": dict(mode="markers", marker=dict(size=11, symbol="square", color="gray")),
            "no_exit": dict(mode="markers", marker=dict(size=11, symbol="square-open", color="gray")),
            "confidence": dict(
                mode="lines+markers+text",
                line=dict(dash="dot", color="rgb(230,140,20)"),
                marker=dict(size=8, symbol="triangle-up", color="rgb(230,140,20)"),
            ),
            "oracle": dict(mode="markers", marker=dict(size=14, symbol="star", color="rgb(90,160,90)")),
        }
        for system, g in self.df.groupby("system", sort=False):
            text = [f"t={t:g}" for t in g["threshold"]] if system in ("threshold", "confidence") else None
            fig.add_trace(
                go.Scatter(
                    x=100 * g["layers_saved"],
                    y=100 * g["accuracy"],
                    name=system,
                    text=text,
                    # the confidence baseline's labels below its points, the threshold curve's above:
                    # the two curves often pass through the same corner
                    textposition="bottom center" if system == "confidence" else "top center",
                    customdata=g[["coherence"]],
                    hovertemplate="%{x:.1f} % saved, %{y:.1f} % correct, coherence %{customdata[0]:.3f}",
                    **styles.get(system, {}),
                )
            )
        base = self.df[self.df.system == "base"]
        if len(base):
            fig.add_hline(y=100 * float(base["accuracy"].iloc[0]), line_dash="dash", line_color="gray")
        fig.update_layout(
            title=f"Accuracy vs layers saved ({self.task}, {self.split} split, threshold exits labelled t)",
            xaxis_title="layers saved (%)",
            yaxis_title="accuracy (%)",
            template="plotly_white",
            height=420,
            width=640,
        )
        return fig


def tradeoff(
    ee_model,
    task,
    *,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    n: int = 100,
    seed: int = 0,
    sample: bool = True,
    judge="reasoning",
    split: str = "test",
    confidence: Sequence[float] = (),
    rule: ExitRule | None = None,
    patience: int = UNSET,
    min_confidence: float = UNSET,
    max_entropy: float | None = UNSET,
    progress: bool = True,
) -> Tradeoff:
    """Evaluate `ee_model` at several exit thresholds (and with sampled exits) on one task.

    Args:
        ee_model: an `EarlyExitModel`.
        task: task name or `Task`; the first `n` examples of its frozen test split, or with
            ``split="validation"`` `n` examples of `Task.validation_split` (to choose a threshold
            with `Tradeoff.best_threshold` without looking at the test split).
        thresholds: exit thresholds, each in (0, 1]; a token exits at the first layer whose
            head gives ``c >= t``.
        sample: also evaluate sampled exits (seeded by `seed`).
        judge: the coherence judge (name, judge object or function).
        confidence: thresholds of the confidence baseline, each in (0, 1]: the same weights
            (adapters included) with parameter-free heads, a token exiting at the first layer
            whose logit-lens top probability is ``>= t``. Confident readouts come early, so
            useful thresholds sit close to 1 (0.999, 0.9999).
        rule: the lens checks of the threshold and sampled points, an `ExitRule` (its mode and
            threshold are those of each point); or give them as the keywords below (with a
            `rule`, one that disagrees is an error). Not applied to the confidence baseline.
        patience: the threshold and sampled points also require the logit lens's top token to
            agree over this many exitable layers before an exit (see `eetools.core.generation.generate`);
            not applied to the confidence baseline.
        min_confidence: the threshold and sampled points also require the logit lens's top
            probability at the exit layer to be at least this; not applied to the confidence baseline.
        max_entropy: the threshold and sampled points also require the logit lens's entropy (nats)
            at the exit layer to be at most this; not applied to the confidence baseline.

    Returns:
        A `Tradeoff` (`.df`, `.figure()`).
    """
    from eetools import tasks as task_lib
    from eetools.analysis.evaluation import evaluate
    from eetools.core.model import attach_exit_heads

    if split not in ("test", "validation"):
        raise ValueError(f"split must be 'test' or 'validation', got {split!r}")
    check_value("n", n, int, ">= 1")
    thresholds, confidence = [float(t) for t in thresholds], [float(t) for t in confidence]
    if not thresholds:
        raise ValueError("thresholds is empty; give at least one number in (0, 1]")
    rule = ExitRule.from_kwargs(
        rule,
        n_exit=len(ee_model.exit_layers),
        patience=patience,
        min_confidence=min_confidence,
        max_entropy=max_entropy,
    )
    # every point's rule, all checked before any evaluation runs
    rules = [("sample", rule.replace(mode="sample"))] if sample else []
    rules += [("threshold", rule.replace(mode="threshold", threshold=t)) for t in thresholds]
    rules += [("confidence", ExitRule(mode="threshold", threshold=t)) for t in confidence]
    task = task_lib.get(task, tokenizer=ee_model)  # resolved once for every evaluation
    examples = task.validation_split(n) if split == "validation" else None
    # the baseline: the same bridge (adapters included) seen through parameter-free heads
    baseline = attach_exit_heads(ee_model.model, ee_model.exit_layers, head="confidence") if confidence else None
    rows = []
    for i, (system, point) in enumerate(tqdm(rules, desc="tradeoff", disable=not progress)):
        model = baseline if system == "confidence" else ee_model
        t = None if system == "sample" else point.threshold
        ev = evaluate(
            model, task, n=n, seed=seed, judges=(judge,), rule=point, examples=examples, compare=i == 0, progress=False
        )
        for rec in ev.summary.to_dict(orient="records"):
            label = system if rec["system"] == "model" else rec["system"]
            coherence = next(v for k, v in rec.items() if k.startswith("coherence_"))
            rows.append(
                {
                    "system": label,
                    "threshold": t if label in ("threshold", "confidence") else float("nan"),
                    "n": rec["n"],
                    "accuracy": rec["accuracy"],
                    "layers_saved": rec["layers_saved"],
                    "compute": rec["compute"],
                    "coherence": coherence,
                }
            )
    order = {"base": 0, "no_exit": 1, "sample": 2, "threshold": 3, "confidence": 4, "oracle": 5}
    df = pd.DataFrame(rows).sort_values("system", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
    return Tradeoff(df=df, task=task.name, split=split)

"""Hidden planning: how decodable the answer is before it is written, before vs after RL."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from eetools.analysis.probes.linear import fit_probe
from eetools.analysis.probes.residuals import collect_residuals


def _sequence_label(df: pd.DataFrame, target: str, column: int) -> pd.Series:
    if target == "answer_digit":

        def digit(ans):
            s = str(ans) if ans is not None else ""
            if not s.isdigit():
                raise ValueError(
                    f"answer {ans!r} is not a number; use target='answer' or 'believed_location' for non-numeric tasks"
                )
            k = column if column >= 0 else len(s) + column
            return int(s[::-1][k]) if 0 <= k < len(s) else pd.NA

        return df["answer"].map(digit)
    if target not in df:
        raise KeyError(f"target {target!r} is not a column of the residual set; columns: {list(df.columns)}")
    return df[target]


@dataclass
class HiddenPlanningResult:
    """Decodability of the final answer before it is written, before vs after RL.

    Attributes:
        df: one row per (model, relative position, layer): ``model`` ("before"/"after"),
            ``rel_position`` (-1 = prompt's last token, 0.. = reasoning tokens),
            ``layer``, ``score`` (probe test accuracy), ``baseline`` (shuffled labels),
            ``chance``, ``n_train``, ``n_test``.
    """

    df: pd.DataFrame

    def summary(self) -> pd.DataFrame:
        """Per (relative position, layer): accuracy before, after, and after - before."""
        p = self.df.pivot_table(index=["rel_position", "layer"], columns="model", values="score").reset_index()
        if {"before", "after"} <= set(p.columns):
            p["delta"] = p["after"] - p["before"]
        return p

    def figure(self):
        """Best-layer probe accuracy at each early position, before and after; baselines dashed."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for name, g in self.df.groupby("model", sort=False):
            best = g.groupby("rel_position").agg(score=("score", "max"), baseline=("baseline", "max")).reset_index()
            fig.add_trace(go.Scatter(x=best["rel_position"], y=best["score"], mode="lines+markers", name=name))
            fig.add_trace(
                go.Scatter(
                    x=best["rel_position"],
                    y=best["baseline"],
                    mode="lines",
                    name=f"{name} shuffled",
                    line=dict(dash="dash"),
                )
            )
        fig.update_layout(
            title="Hidden planning: answer decodability before it is written (max over layers)",
            xaxis_title="position (-1 = prompt's last token)",
            yaxis_title="probe accuracy",
            template="plotly_white",
        )
        return fig


def hidden_planning(
    ee_model_before,
    ee_model_after,
    examples,
    *,
    target: str = "answer_digit",
    column: int = 0,
    n_positions: int = 4,
    layers: Sequence[int | str] | None = None,
    test_size: float = 0.3,
    seed: int = 0,
    batch_size: int = 16,
) -> HiddenPlanningResult:
    """Probe the final answer at early positions, before vs after RL.

    For each model, residuals are collected (no exits, teacher-forced on the examples'
    reasoning) at the prompt's last token and the first ``n_positions - 1`` reasoning
    tokens; at each such relative position and each layer a logistic probe, trained on
    some sequences and tested on others, predicts a per-sequence label. Higher accuracy
    at positions where the answer has not been written yet means the answer is computed
    silently ("hidden planning"); RL for early exits should lower it. Use enough
    examples (hundreds) for the per-position probes to be meaningful.

    Args:
        ee_model_before, ee_model_after: the models to compare (e.g. calibrated vs RL-trained).
        examples: `Example`s (the same set is used for both models).
        target: "answer_digit" (the true answer's digit in `column`), or a df column that
            is constant within a sequence ("answer", "believed_location").
        column: which answer digit for "answer_digit": 0 = units (the first column
            computed in writing), -1 = the leading digit.
        n_positions: positions probed: the prompt's last token, then reasoning tokens.
        layers: layers to probe (default: exitable layers and the final residual).
        test_size, seed: the probe's split.
        batch_size: sequences per forward pass.

    Returns:
        A `HiddenPlanningResult`; ``.summary()`` pivots before/after and their difference.
    """
    if target == "answer_digit":  # fail before running any model
        _sequence_label(pd.DataFrame({"answer": [getattr(e, "answer", None) for e in examples]}), target, column)
    rows = []
    for name, ee in (("before", ee_model_before), ("after", ee_model_after)):
        rs = collect_residuals(ee, examples, layers=layers, prompt_last=True, batch_size=batch_size)
        label = _sequence_label(rs.df, target, column)
        rs.df["_label"] = label.astype(object).where(label.notna(), None)
        for rel in range(-1, n_positions - 1):
            sub = rs.subset((rs.df["rel_position"] == rel).to_numpy())
            if len(sub) < 4 or sub.df["_label"].dropna().astype(str).nunique() < 2:
                continue
            for l in sub.layers:
                try:
                    r = fit_probe(
                        sub, l, "_label", kind="logistic", test_size=test_size, seed=seed, split="token"
                    ).df.iloc[0]
                except ValueError:  # too few tokens or a single class in the training split
                    continue
                rows.append(
                    {
                        "model": name,
                        "rel_position": rel,
                        "layer": l,
                        "score": r["score"],
                        "baseline": r["baseline"],
                        "chance": r["chance"],
                        "n_train": r["n_train"],
                        "n_test": r["n_test"],
                        "target": target,
                    }
                )
    return HiddenPlanningResult(
        df=pd.DataFrame(
            rows,
            columns=["model", "rel_position", "layer", "score", "baseline", "chance", "n_train", "n_test", "target"],
        )
    )

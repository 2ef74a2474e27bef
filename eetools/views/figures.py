"""Figures of training runs, from their histories (plain DataFrames): calibration curves and RL dynamics.

Training code draws nothing itself: pass a `CalibrationResult`, `RLResult` or `SweepResult`
(or its ``history`` DataFrame) to these.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots


def calibration_figure(history) -> go.Figure:
    """Calibration loss curves and mean target vs student expected compute per step.

    Args:
        history: a `CalibrationResult` or its ``history`` (columns step, loss, kl, exit_nll,
            student_compute, target_compute).
    """
    h = getattr(history, "history", history)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "expected compute"))
    for col in ("loss", "kl", "exit_nll"):
        fig.add_trace(go.Scatter(x=h["step"], y=h[col], name=col, mode="lines"), row=1, col=1)
    for col in ("student_compute", "target_compute"):
        fig.add_trace(go.Scatter(x=h["step"], y=h[col], name=col, mode="lines"), row=1, col=2)
    fig.update_layout(title="Calibration", template="plotly_white")
    return fig


def rl_dynamics_figure(
    history,
    *,
    metrics=("accuracy", "compute", "coherence"),
    base: Mapping | None = None,
    run_col: str = "run",
    step_col: str = "step",
) -> go.Figure:
    """Fig. 2 left: per-step metrics of several runs: each run light, mean bold with +-1 SE, base dashed.

    Args:
        history: one row per (run, step) with the metric columns (e.g. `run_sweep(...).history`), or an
            `RLResult`/`SweepResult` (its history; one run gets run 0).
        base: optional {metric: value} of the base model, drawn as dashed horizontal lines.
    """
    history = getattr(history, "history", history)
    if run_col not in history.columns:
        history = history.assign(**{run_col: 0})
    metrics = [m for m in metrics if m in history.columns]
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=metrics)
    for j, m in enumerate(metrics, start=1):
        for run, g in history.groupby(run_col, sort=True):
            fig.add_trace(
                go.Scatter(
                    x=g[step_col],
                    y=g[m],
                    mode="lines",
                    line=dict(width=1, color="rgba(70,110,200,0.3)"),
                    name=f"run {run}",
                    showlegend=False,
                    hoverinfo="skip",
                ),
                row=1,
                col=j,
            )
        agg = history.groupby(step_col)[m].agg(["mean", "std", "count"]).reset_index()
        se = (agg["std"].fillna(0) / np.sqrt(agg["count"].clip(lower=1))).to_numpy()
        fig.add_trace(
            go.Scatter(
                x=agg[step_col],
                y=agg["mean"],
                mode="lines+markers",
                line=dict(width=3, color="rgb(40,70,170)"),
                error_y=dict(type="data", array=se, visible=True),
                name=f"mean {m}",
                showlegend=False,
            ),
            row=1,
            col=j,
        )
        if base is not None and m in base:
            fig.add_hline(
                y=float(base[m]),
                line_dash="dash",
                line_color="gray",
                row=1,
                col=j,
                annotation_text="base",
                annotation_position="bottom right",
            )
        fig.update_xaxes(title_text="RL step", row=1, col=j)
    fig.update_layout(
        title="RL dynamics (runs light, mean bold, ±1 SE; base dashed)",
        template="plotly_white",
        height=350,
        width=330 * max(len(metrics), 1),
    )
    return fig

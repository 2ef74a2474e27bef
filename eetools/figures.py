"""The paper's figures as data plus plotly views (DESIGN.md section 9).

- Fig. 2 left: `rl_dynamics_figure(history)`: accuracy / compute / coherence per RL step,
  each run light, the mean bold with +-1 SE error bars, the base model dashed.
- Fig. 3: `coherence_by_kl_factor(...)`: coherence distributions of students calibrated
  with several KL factors, against the base model.
- Fig. 4: `exit_distribution_vs_target(...)`: the calibrated student's exit distribution
  against the target distribution, total variation in the title.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from eetools import tasks as task_lib


@dataclass
class ExitDistributionComparison:
    """Fig. 4 data: mean exit distribution of the student heads and of the calibration target."""

    df: pd.DataFrame  # index: outcome ("1".."L-1", "full"); columns: student, target
    tv: float
    layers: list[int]
    n_layers: int
    kl_factor: float

    def figure(self) -> go.Figure:
        from eetools.viz import exit_histogram_figure

        return exit_histogram_figure({"student (learned)": self.df["student"].to_numpy(),
                                      "target": self.df["target"].to_numpy()}, self.layers, self.n_layers,
                                     title=f"Learned vs target exit distribution (k={self.kl_factor:g}): "
                                           f"total variation {self.tv:.3f}")


@torch.no_grad()
def exit_distribution_vs_target(ee_model, task="addition", *, n: int = 64, kl_factor: float | None = None,
                                examples: Sequence | None = None, batch_size: int = 16) -> ExitDistributionComparison:
    """Fig. 4 on held-out examples: mean stick-breaking distribution of the heads (no exits
    prescribed, adapters on) vs the calibration target, over the continuation tokens that may exit.

    `kl_factor` must be the one the heads were calibrated with; None takes it from the model's
    ``calibration`` record (saved with its checkpoint) and refuses heads that have none.
    """
    from eetools.calibration import encode_sequences, exit_targets
    from eetools.heads import exit_log_probs

    if kl_factor is None:
        kl_factor = (ee_model.calibration or {}).get("kl_factor")
        if kl_factor is None:
            raise ValueError("these heads carry no calibration record (not calibrated, or saved before eetools kept "
                             "one); pass kl_factor=, the k they were calibrated with")
    exs = list(examples) if examples is not None else task_lib.get(task).test_split()[:n]
    student, target, count = 0.0, 0.0, 0.0
    L = ee_model.n_layers
    for i in range(0, len(exs), batch_size):
        chunk = exs[i:i + batch_size]
        ids, attn, predict = encode_sequences(ee_model, [e.prompt for e in chunk], [e.reasoning for e in chunk])
        exitable = predict.clone()
        exitable[torch.arange(len(chunk)), predict.float().argmax(1)] = False
        t = ee_model.teacher_forward(ids, attn)
        tgt = exit_targets(t.logprobs, t.early_logprobs, kl_factor)
        out = ee_model.prescribed_forward(ids, torch.full_like(ids, L), attention_mask=attn)
        stu = exit_log_probs(out.exit_logits).exp()
        w = exitable.float().unsqueeze(-1)
        student = student + (stu * w).sum((0, 1))
        target = target + (tgt * w).sum((0, 1))
        count += float(exitable.sum())
    s, t = (student / count).cpu().numpy(), (target / count).cpu().numpy()
    idx = [str(l) for l in ee_model.exit_layers] + ["full"]
    df = pd.DataFrame({"student": s, "target": t}, index=idx)
    return ExitDistributionComparison(df=df, tv=float(0.5 * np.abs(s - t).sum()), layers=list(ee_model.exit_layers),
                                      n_layers=L, kl_factor=kl_factor)


@dataclass
class CoherenceByKL:
    """Fig. 3 data: one row per (system, example) with its coherence score."""

    df: pd.DataFrame  # columns: system, kl_factor, example, coherence, correct, compute

    def summary(self) -> pd.DataFrame:
        return (self.df.groupby(["system", "kl_factor"], dropna=False, sort=False)
                .agg(coherence=("coherence", "mean"), accuracy=("correct", "mean"), compute=("compute", "mean"))
                .reset_index())

    def figure(self) -> go.Figure:
        fig = go.Figure()
        for system, g in self.df.groupby("system", sort=False):
            fig.add_trace(go.Box(y=g["coherence"], name=system, boxmean=True, boxpoints=False))
        fig.update_layout(title="Coherence by KL factor (higher k: exits rarer, text closer to the base model)",
                          yaxis_title="coherence", template="plotly_white", showlegend=False)
        return fig


def coherence_by_kl_factor(models: Mapping[float, object], task="addition", *, n: int = 100, seed: int = 0,
                           judge="reasoning", mode: str = "sample", base_model=None, progress: bool = True) -> CoherenceByKL:
    """Fig. 3: evaluate students calibrated with different KL factors ({k: ee_model}) plus the base model."""
    from eetools.evaluation import evaluate

    frames = []
    for k, ee in sorted(models.items()):
        ev = evaluate(ee, task, n=n, mode=mode, seed=seed, judges=(judge,), compare=False, progress=progress)
        d = ev.per_example.assign(system=f"k={k:g}", kl_factor=k)
        frames.append(d)
    base = base_model if base_model is not None else next(iter(models.values()))
    # evaluate's "base" row: no exits and adapters off, i.e. the unmodified model
    ev_base = evaluate(base, task, n=n, mode="off", seed=seed, judges=(judge,), compare=True, progress=progress)
    b = ev_base.per_example[ev_base.per_example.system == "base"].assign(system="base", kl_factor=np.nan)
    frames.append(b)
    df = pd.concat(frames, ignore_index=True)
    col = [c for c in df.columns if c.startswith("coherence_")][0]
    df = df.rename(columns={col: "coherence"})[["system", "kl_factor", "example", "coherence", "correct", "compute"]]
    return CoherenceByKL(df=df)


def rl_dynamics_figure(history: pd.DataFrame, *, metrics=("accuracy", "compute", "coherence"), base: Mapping | None = None,
                       run_col: str = "run", step_col: str = "step") -> go.Figure:
    """Fig. 2 left: per-step metrics of several runs: each run light, mean bold with +-1 SE, base dashed.

    Args:
        history: one row per (run, step) with the metric columns (e.g. `run_sweep(...).history`).
        base: optional {metric: value} of the base model, drawn as dashed horizontal lines.
    """
    metrics = [m for m in metrics if m in history.columns]
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=metrics)
    for j, m in enumerate(metrics, start=1):
        for run, g in history.groupby(run_col, sort=True):
            fig.add_trace(go.Scatter(x=g[step_col], y=g[m], mode="lines", line=dict(width=1, color="rgba(70,110,200,0.3)"),
                                     name=f"run {run}", showlegend=False, hoverinfo="skip"), row=1, col=j)
        agg = history.groupby(step_col)[m].agg(["mean", "std", "count"]).reset_index()
        se = (agg["std"].fillna(0) / np.sqrt(agg["count"].clip(lower=1))).to_numpy()
        fig.add_trace(go.Scatter(x=agg[step_col], y=agg["mean"], mode="lines+markers", line=dict(width=3, color="rgb(40,70,170)"),
                                 error_y=dict(type="data", array=se, visible=True), name=f"mean {m}",
                                 showlegend=False), row=1, col=j)
        if base is not None and m in base:
            fig.add_hline(y=float(base[m]), line_dash="dash", line_color="gray", row=1, col=j,
                          annotation_text="base", annotation_position="bottom right")
        fig.update_xaxes(title_text="RL step", row=1, col=j)
    fig.update_layout(title="RL dynamics (runs light, mean bold, ±1 SE; base dashed)", template="plotly_white",
                      height=350, width=330 * max(len(metrics), 1))
    return fig


@dataclass
class ClassHistogram:
    """Exit-layer histograms per token class, for one or more systems (e.g. before/after RL).

    Each generated token is counted at the layer its prediction exited (L = full depth) and
    under the class of the token predicted (format, copied digit, computed digit, answer...).
    """

    df: pd.DataFrame  # columns: system, token_class, outcome, count, fraction
    layers: list[int]
    n_layers: int

    def figure(self) -> go.Figure:
        classes = list(dict.fromkeys(self.df["token_class"]))
        fig = make_subplots(rows=1, cols=len(classes), subplot_titles=classes, shared_yaxes=True)
        colors = ["rgb(215,48,31)", "rgb(40,70,170)", "rgb(90,160,90)", "rgb(150,90,170)"]
        for j, c in enumerate(classes, start=1):
            for s, (system, g) in enumerate(self.df[self.df.token_class == c].groupby("system", sort=False)):
                fig.add_trace(go.Bar(x=g["outcome"], y=g["fraction"], name=system, marker_color=colors[s % 4],
                                     showlegend=j == 1, legendgroup=system), row=1, col=j)
        fig.update_xaxes(type="category")
        fig.update_layout(barmode="group", template="plotly_white", height=330, width=280 * len(classes),
                          title="Exit layer by token class")
        return fig


def exit_histogram_by_class(rollouts: Mapping[str, object], examples: Sequence | None = None,
                            task: str | None = None) -> ClassHistogram:
    """Histograms of exit layers per token class for each named rollout (same prompts or not).

    Args:
        rollouts: {system name: Rollout}.
        examples: the `Example` of each sequence (gives the task and its truth), optional.
        task: the task name when `examples` is not given.
    """
    from eetools.probes import annotate_tokens

    rows = []
    first = next(iter(rollouts.values()))
    layers, L = list(first.layers), first.n_layers
    outcomes = [str(l) for l in layers] + ["full"]
    for system, r in rollouts.items():
        for i in range(len(r)):
            ex = examples[i] if examples is not None and i < len(examples) else None
            pieces = r.str_tokens[i]
            ann = annotate_tokens(pieces, task, ex)
            n = int(r.mask[i].sum())
            for t in range(min(n, len(ann))):
                e = int(r.exit_layers[i, t])
                rows.append({"system": system, "token_class": ann["token_class"].iloc[t],
                             "outcome": "full" if e == L else str(e)})
    df = pd.DataFrame(rows)
    counts = df.groupby(["system", "token_class", "outcome"], sort=False).size().rename("count").reset_index()
    full = pd.MultiIndex.from_product([list(rollouts), list(dict.fromkeys(df["token_class"])), outcomes],
                                      names=["system", "token_class", "outcome"])
    counts = counts.set_index(["system", "token_class", "outcome"]).reindex(full, fill_value=0).reset_index()
    counts["fraction"] = counts["count"] / counts.groupby(["system", "token_class"])["count"].transform("sum").clip(lower=1)
    return ClassHistogram(df=counts, layers=layers, n_layers=L)

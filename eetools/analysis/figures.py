"""The paper's figures as data plus plotly views (docs/method.md, "Measurements").

Fig. 2 left is `eetools.views.rl_dynamics_figure` (from a run's history) and Fig. 3
`eetools.analysis.evaluation.coherence_by_kl_factor`.

- Fig. 4: `exit_distribution_vs_target(...)`: the calibrated student's exit distribution
  against the target distribution, total variation in the title.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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
        from eetools.views.tokens import exit_histogram_figure

        return exit_histogram_figure(
            {"student (learned)": self.df["student"].to_numpy(), "target": self.df["target"].to_numpy()},
            self.layers,
            self.n_layers,
            title=f"Learned vs target exit distribution (k={self.kl_factor:g}): total variation {self.tv:.3f}",
        )


@torch.no_grad()
def exit_distribution_vs_target(
    ee_model,
    task="addition",
    *,
    n: int = 64,
    kl_factor: float | None = None,
    examples: Sequence | None = None,
    batch_size: int = 16,
) -> ExitDistributionComparison:
    """Fig. 4 on held-out examples: mean stick-breaking distribution of the heads (no exits
    prescribed, adapters on) vs the calibration target, over the continuation tokens that may exit.

    `kl_factor` must be the one the heads were calibrated with; None takes it from the model's
    ``calibration`` record (saved with its checkpoint) and refuses heads that have none.
    """
    from eetools.core.encoding import encode_sequences
    from eetools.core.heads import exit_log_probs
    from eetools.train.calibration import exit_targets

    if kl_factor is None:
        kl_factor = (ee_model.calibration or {}).get("kl_factor")
        if kl_factor is None:
            raise ValueError(
                "these heads carry no calibration record (not calibrated, or saved before eetools kept "
                "one); pass kl_factor=, the k they were calibrated with"
            )
    exs = list(examples) if examples is not None else task_lib.get(task, tokenizer=ee_model).test_split()[:n]
    student, target, count = 0.0, 0.0, 0.0
    L = ee_model.n_layers
    for i in range(0, len(exs), batch_size):
        chunk = exs[i : i + batch_size]
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
    return ExitDistributionComparison(
        df=df, tv=float(0.5 * np.abs(s - t).sum()), layers=list(ee_model.exit_layers), n_layers=L, kl_factor=kl_factor
    )


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
                fig.add_trace(
                    go.Bar(
                        x=g["outcome"],
                        y=g["fraction"],
                        name=system,
                        marker_color=colors[s % 4],
                        showlegend=j == 1,
                        legendgroup=system,
                    ),
                    row=1,
                    col=j,
                )
        fig.update_xaxes(type="category")
        fig.update_layout(
            barmode="group",
            template="plotly_white",
            height=330,
            width=280 * len(classes),
            title="Exit layer by token class",
        )
        return fig


def exit_histogram_by_class(
    rollouts: Mapping[str, object], examples: Sequence | None = None, task: str | None = None
) -> ClassHistogram:
    """Histograms of exit layers per token class for each named rollout (same prompts or not).

    Args:
        rollouts: {system name: Rollout}.
        examples: the `Example` of each sequence (gives the task and its truth), optional.
        task: the task name when `examples` is not given.
    """
    from eetools.analysis.probes.tokens import annotate_tokens

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
                rows.append(
                    {
                        "system": system,
                        "token_class": ann["token_class"].iloc[t],
                        "outcome": "full" if e == L else str(e),
                    }
                )
    df = pd.DataFrame(rows)
    counts = df.groupby(["system", "token_class", "outcome"], sort=False).size().rename("count").reset_index()
    full = pd.MultiIndex.from_product(
        [list(rollouts), list(dict.fromkeys(df["token_class"])), outcomes], names=["system", "token_class", "outcome"]
    )
    counts = counts.set_index(["system", "token_class", "outcome"]).reindex(full, fill_value=0).reset_index()
    counts["fraction"] = counts["count"] / counts.groupby(["system", "token_class"])["count"].transform("sum").clip(
        lower=1
    )
    return ClassHistogram(df=counts, layers=layers, n_layers=L)

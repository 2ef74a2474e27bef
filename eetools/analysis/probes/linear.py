"""Linear probes of residuals with a shuffled-label baseline: `fit_probe`, `probe_sweep`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

if TYPE_CHECKING:
    from eetools.analysis.probes.residuals import ResidualSet


def _split(df: pd.DataFrame, y: np.ndarray, test_size: float, seed: int, split: str):
    from sklearn.model_selection import GroupShuffleSplit, train_test_split

    if split not in ("sequence", "token"):
        raise ValueError(f"split must be 'sequence' or 'token', got {split!r}")
    idx = np.arange(len(y))
    if split == "sequence" and "seq" in df and df["seq"].nunique() >= 4:
        gss = GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
        tr, te = next(gss.split(idx, y, groups=df["seq"].to_numpy()))
        return tr, te
    try:
        return train_test_split(idx, test_size=test_size, random_state=seed, stratify=y)
    except ValueError:  # a class too rare to stratify (or a continuous target)
        return train_test_split(idx, test_size=test_size, random_state=seed)


def _make_probe(kind: str, C: float, alpha: float):
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "logistic":
        return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    if kind == "ridge":
        return make_pipeline(StandardScaler(), Ridge(alpha=alpha))
    raise ValueError(f"kind must be 'logistic' or 'ridge', got {kind!r}")


@dataclass
class ProbeResult:
    """A fitted linear probe and its test score against a shuffled-label baseline.

    Attributes:
        df: one row: ``layer``, ``target``, ``kind``, ``metric`` ("accuracy" or "r2"),
            ``score``, ``baseline`` (same probe trained on shuffled labels), ``chance``
            (majority-class accuracy on the test split, 0 for R^2), ``n_train``,
            ``n_test``, ``n_classes``.
        probe: the fitted scikit-learn pipeline (standardisation + linear model).
    """

    df: pd.DataFrame
    probe: object = None

    @property
    def score(self) -> float:
        return float(self.df["score"].iloc[0])

    @property
    def baseline(self) -> float:
        return float(self.df["baseline"].iloc[0])

    def figure(self):
        """Bars: probe score, shuffled-label baseline and chance."""
        import plotly.graph_objects as go

        r = self.df.iloc[0]
        fig = go.Figure(
            go.Bar(
                x=["probe", "shuffled labels", "chance"],
                y=[r["score"], r["baseline"], r["chance"]],
                marker_color=["#1f77b4", "#999999", "#cccccc"],
            )
        )
        fig.update_layout(
            title=f"{r['kind']} probe of {r['target']} at layer {r['layer']}",
            yaxis_title=r["metric"],
            template="plotly_white",
        )
        return fig


def fit_probe(
    residuals: ResidualSet,
    layer: int | str,
    target: str,
    *,
    kind: str = "logistic",
    test_size: float = 0.3,
    seed: int = 0,
    token_class: str | Sequence[str] | None = None,
    split: str = "sequence",
    C: float = 1.0,
    alpha: float = 1.0,
) -> ProbeResult:
    """Fit a linear probe of a df column from the residuals at one layer.

    Rows whose target is missing are dropped. The split keeps whole sequences on one
    side (``split="sequence"``, when there are at least 4 sequences) so a per-sequence
    variable cannot leak through sequence identity; ``split="token"`` splits tokens.
    The baseline is the same probe trained on a permutation of the training labels and
    scored on the true test labels (near chance when the probe cannot cheat).

    Args:
        residuals: a `ResidualSet`.
        layer: a captured layer, "final", or "exit".
        target: a column of ``residuals.df`` (e.g. "carry", "sum_digit", "answer_digit").
        kind: "logistic" (classification, accuracy) or "ridge" (regression, R^2).
        test_size: fraction held out.
        seed: seeds the split and the label shuffle.
        token_class: keep only tokens of this class (or classes).
        split: "sequence" or "token".
        C, alpha: regularisation of logistic regression / ridge.

    Returns:
        A `ProbeResult`.
    """
    df = residuals.df
    keep = df[target].notna().to_numpy().copy() if target in df else None
    if keep is None:
        raise KeyError(f"target {target!r} is not a column of the residual set; columns: {list(df.columns)}")
    if token_class is not None:
        classes = [token_class] if isinstance(token_class, str) else list(token_class)
        keep &= df["token_class"].isin(classes).to_numpy()
    sub = df[keep].reset_index(drop=True)
    x = residuals.acts(layer)[torch.from_numpy(np.flatnonzero(keep))].double().numpy()
    y_raw = sub[target]
    if kind == "logistic":
        y = y_raw.astype(str).to_numpy()
        n_classes = len(set(y))
        if n_classes < 2:
            raise ValueError(
                f"target {target!r} has {n_classes} distinct value(s) on the selected tokens; "
                "a classifier needs at least 2"
            )
    else:
        y = y_raw.astype(float).to_numpy()
        n_classes = 0
    if len(y) < 4:
        raise ValueError(f"only {len(y)} tokens have a {target!r} label; too few to probe")
    tr, te = _split(sub, y, test_size, seed, split)
    probe = _make_probe(kind, C, alpha)
    shuffled = _make_probe(kind, C, alpha)
    rng = np.random.default_rng(seed)
    y_shuf = y[tr][rng.permutation(len(tr))]
    if kind == "logistic" and len(set(y[tr])) < 2:
        raise ValueError(f"the training split of {target!r} has a single class; use more examples")
    probe.fit(x[tr], y[tr])
    shuffled.fit(x[tr], y_shuf)
    if kind == "logistic":
        score, base = float((probe.predict(x[te]) == y[te]).mean()), float((shuffled.predict(x[te]) == y[te]).mean())
        values, counts = np.unique(y[tr], return_counts=True)
        chance = float((y[te] == values[counts.argmax()]).mean())
        metric = "accuracy"
    else:
        from sklearn.metrics import r2_score

        score, base, chance, metric = (
            float(r2_score(y[te], probe.predict(x[te]))),
            float(r2_score(y[te], shuffled.predict(x[te]))),
            0.0,
            "r2",
        )
    row = {
        "layer": layer,
        "target": target,
        "kind": kind,
        "metric": metric,
        "score": score,
        "baseline": base,
        "chance": chance,
        "n_train": len(tr),
        "n_test": len(te),
        "n_classes": n_classes,
        "token_class": None if token_class is None else str(token_class),
    }
    return ProbeResult(df=pd.DataFrame([row]), probe=probe)


@dataclass
class ProbeSweep:
    """`fit_probe` at several layers: one row per layer (columns as `ProbeResult.df`)."""

    df: pd.DataFrame
    probes: dict = field(default_factory=dict)

    def figure(self):
        """Probe score vs layer, the shuffled-label baseline dashed, chance dotted."""
        import plotly.graph_objects as go

        d = self.df
        x = [str(l) for l in d["layer"]]
        fig = go.Figure()
        fig.add_trace(go.Scatter(x=x, y=d["score"], mode="lines+markers", name="probe"))
        fig.add_trace(
            go.Scatter(
                x=x, y=d["baseline"], mode="lines+markers", name="shuffled labels", line=dict(dash="dash", color="grey")
            )
        )
        if len(d) and d["metric"].iloc[0] == "accuracy":
            fig.add_trace(
                go.Scatter(x=x, y=d["chance"], mode="lines", name="chance", line=dict(dash="dot", color="lightgrey"))
            )
        target = d["target"].iloc[0] if len(d) else ""
        fig.update_layout(
            title=f"Linear probe of {target} by layer",
            xaxis_title="layer",
            yaxis_title=d["metric"].iloc[0] if len(d) else "",
            template="plotly_white",
        )
        return fig


def probe_sweep(residuals: ResidualSet, target: str, layers: Sequence[int | str] | None = None, **kwargs) -> ProbeSweep:
    """`fit_probe` at each layer (default: every captured layer); kwargs go to `fit_probe`."""
    layers = list(residuals.layers) if layers is None else list(layers)
    results = {l: fit_probe(residuals, l, target, **kwargs) for l in layers}
    return ProbeSweep(
        df=pd.concat([r.df for r in results.values()], ignore_index=True),
        probes={l: r.probe for l, r in results.items()},
    )

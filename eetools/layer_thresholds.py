"""One exit threshold per layer, fitted on the validation split.

With one threshold for every exitable layer, the accuracy/layers-saved curve of `tradeoff` is
all a model offers. The heads are not equally reliable, though: on the shipped RL models,
lowering layer 4's threshold from 0.8 to 0.5 saves a point of layers at no cost on addition,
while lowering layer 6's costs six answers in 500 for less. `fit_thresholds` searches
per-layer thresholds on `Task.validation_split` (never the test split):

1. uniform thresholds down the grid, stopping below the accuracy floor (the base model's
   accuracy minus `max_drop`);
2. from one grid step above the best uniform threshold, greedy steps: each round tries
   lowering every layer's threshold one grid step and takes the move that saves the most
   layers per answer lost (``saved gained / (answers lost + 1)``) among those that keep the
   floor; a layer whose step breaks the floor is left where it is.

It returns the qualifying point that saves the most layers among everything it measured (so
never less than the best single threshold on the validation split), with the search path.
Report the test split at the fitted thresholds with
``evaluate(..., mode="threshold", threshold=fit.thresholds)``: a point chosen among many on
the validation split is an optimistic estimate of itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import plotly.graph_objects as go
from tqdm.auto import tqdm

DEFAULT_GRID = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


@dataclass
class ThresholdFit:
    """Per-layer exit thresholds fitted on the validation split, and how they were found.

    Attributes:
        thresholds: one threshold per exitable layer (pass as ``threshold=`` to `generate`,
            `evaluate`), or None if not even the grid's highest uniform threshold keeps the floor.
        layers: the exitable layers the thresholds belong to.
        accuracy: validation accuracy at `thresholds`.
        layers_saved: validation layers saved at `thresholds`.
        base_accuracy: the base model's validation accuracy (no exits, adapters off).
        floor: the least accuracy allowed (`base_accuracy` minus `max_drop`).
        uniform: the best single threshold on the same examples (None if none keeps the floor).
        path: every point measured: ``stage`` ("uniform" or "greedy"), ``round``, ``thresholds``,
            ``accuracy``, ``layers_saved``, ``kept`` (the greedy step taken in its round).
        task: the task's name.
        n: validation examples.
    """

    thresholds: tuple[float, ...] | None
    layers: list[int]
    accuracy: float
    layers_saved: float
    base_accuracy: float
    floor: float
    uniform: float | None
    path: pd.DataFrame
    task: str
    n: int

    def _repr_html_(self) -> str:
        th = "none keeps the floor" if self.thresholds is None else ", ".join(
            f"{l}: {t:g}" for l, t in zip(self.layers, self.thresholds))
        return (f"<b>{self.task}</b>, {self.n} validation examples, base {self.base_accuracy:.1%}, floor "
                f"{self.floor:.1%}<br>per-layer thresholds ({th}): accuracy {self.accuracy:.1%}, layers saved "
                f"{self.layers_saved:.1%}; best single threshold {self.uniform}")

    def figure(self) -> go.Figure:
        """Validation accuracy against layers saved: the uniform curve, the greedy path, the fit and the floor."""
        fig = go.Figure()
        uni = self.path[self.path.stage == "uniform"]
        fig.add_scatter(x=uni.layers_saved, y=uni.accuracy, mode="lines+markers+text", name="one threshold",
                        text=[f"t={t[0]:g}" for t in uni.thresholds], textposition="top center",
                        marker=dict(size=8, color="rgb(40,70,170)"))
        tried = self.path[self.path.stage == "greedy"]
        fig.add_scatter(x=tried.layers_saved, y=tried.accuracy, mode="markers", name="greedy steps tried",
                        marker=dict(size=5, color="rgba(120,120,120,0.5)"))
        kept = tried[tried.kept]
        fig.add_scatter(x=kept.layers_saved, y=kept.accuracy, mode="lines+markers", name="greedy path",
                        marker=dict(size=7, color="rgb(200,80,40)"))
        if self.thresholds is not None:
            fig.add_scatter(x=[self.layers_saved], y=[self.accuracy], mode="markers", name="fitted",
                            marker=dict(size=14, symbol="star", color="rgb(200,80,40)"))
        fig.add_hline(y=self.floor, line_dash="dash", line_color="grey",
                      annotation_text=f"floor (base {self.base_accuracy:.1%} - max_drop)")
        fig.update_layout(title=f"Per-layer exit thresholds on {self.task} (validation, n = {self.n})",
                          xaxis_title="layers saved", yaxis_title="accuracy", xaxis_tickformat=".0%",
                          yaxis_tickformat=".1%", template="plotly_white")
        return fig


def fit_thresholds(ee_model, task, *, n: int = 500, max_drop: float = 0.01, grid: Sequence[float] = DEFAULT_GRID,
                   batch_size: int = 250, progress: bool = True) -> ThresholdFit:
    """Fit one exit threshold per exitable layer on `n` examples of the task's validation split.

    Args:
        ee_model: an `EarlyExitModel`.
        task: task name or `Task`.
        n: validation examples (`Task.validation_split(n)`; none of them is in the test split).
        max_drop: accuracy one may lose against the base model (a fraction: 0.01 is one point).
        grid: the threshold values tried, each in (0, 1]; searched from the highest down.
        batch_size: prompts decoded together (greedy tokens, so it does not change the result).

    Returns:
        A `ThresholdFit` (`.thresholds`, `.path`, `.figure()`).
    """
    from eetools import tasks as task_lib
    from eetools.evaluation import evaluate
    from eetools.generation import check_threshold

    if not max_drop >= 0:
        raise ValueError(f"max_drop is the accuracy one may lose (a fraction, e.g. 0.01), got {max_drop}")
    grid = sorted({check_threshold(t) for t in grid}, reverse=True)
    if not grid:
        raise ValueError("grid is empty; give the threshold values to try, each in (0, 1]")
    task = task_lib.get(task)
    examples = task.validation_split(n)
    m = len(ee_model.exit_layers)
    measured: dict[tuple[int, ...], tuple[float, float]] = {}  # grid indices per layer -> (accuracy, saved)
    rows: list[dict] = []
    base: list[float] = []
    bar = tqdm(desc=f"fit thresholds ({task.name})", disable=not progress, leave=False)

    def measure(state: tuple[int, ...], stage: str, round_: int) -> tuple[float, float]:
        if state not in measured:
            th = tuple(grid[i] for i in state)
            ev = evaluate(ee_model, task, examples=examples, mode="threshold", threshold=th, judges=(),
                          batch_size=batch_size, compare=not base, progress=False)
            s = ev.summary.set_index("system")
            if not base:
                base.append(float(s.loc["base", "accuracy"]))
            measured[state] = (float(s.loc["model", "accuracy"]), float(s.loc["model", "layers_saved"]))
            rows.append({"stage": stage, "round": round_, "thresholds": th, "accuracy": measured[state][0],
                         "layers_saved": measured[state][1], "kept": False})
            bar.update()
            bar.set_postfix(accuracy=f"{measured[state][0]:.3f}", saved=f"{measured[state][1]:.3f}")
        return measured[state]

    # 1. one threshold for every layer, down the grid until accuracy falls below the floor
    best_uniform = None
    for i in range(len(grid)):
        acc, _ = measure((i,) * m, "uniform", 0)
        if acc < base[0] - max_drop - 1e-9:
            break
        best_uniform = i
    floor = base[0] - max_drop - 1e-9
    # 2. greedy per-layer steps from one grid step above the best uniform threshold
    if best_uniform is not None:
        state = (max(best_uniform - 1, 0),) * m
        blocked: set[int] = set()
        round_ = 0
        while True:
            round_ += 1
            acc0, saved0 = measure(state, "greedy", round_)
            best, best_eff = None, 0.0
            for layer in range(m):
                if layer in blocked or state[layer] + 1 >= len(grid):
                    continue
                cand = state[:layer] + (state[layer] + 1,) + state[layer + 1:]
                acc, saved = measure(cand, "greedy", round_)
                if acc < floor:
                    blocked.add(layer)
                    continue
                lost = max(round((acc0 - acc) * len(examples)), 0)
                eff = (saved - saved0) / (lost + 1)
                if eff > best_eff:
                    best, best_eff = cand, eff
            if best is None:
                break
            state = best
            rows[[r["thresholds"] for r in rows].index(tuple(grid[i] for i in state))]["kept"] = True
    bar.close()
    ok = [(saved, acc, s) for s, (acc, saved) in measured.items() if acc >= floor]
    path = pd.DataFrame(rows)
    if not ok:
        return ThresholdFit(thresholds=None, layers=list(ee_model.exit_layers), accuracy=float("nan"),
                            layers_saved=float("nan"), base_accuracy=base[0], floor=base[0] - max_drop, uniform=None,
                            path=path, task=task.name, n=len(examples))
    saved, acc, s = max(ok)
    return ThresholdFit(thresholds=tuple(grid[i] for i in s), layers=list(ee_model.exit_layers), accuracy=acc,
                        layers_saved=saved, base_accuracy=base[0], floor=base[0] - max_drop,
                        uniform=None if best_uniform is None else grid[best_uniform], path=path, task=task.name,
                        n=len(examples))

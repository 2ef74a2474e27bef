"""Externalisation, measured: does early-exit RL move reasoning from the layers into the tokens?

The paper's claim is that a model rewarded for exiting early must write its reasoning down
instead of doing it silently in its layers. On the `steps` task (`eetools.tasks.steps`: sums whose
column lines may be written or skipped) this module measures, for an exit model at a point of
RL training:

- **accuracy** of greedy completions (threshold exits), and **layers saved**, per token (mean of
  ``1 - blocks/L``) and per answer (blocks used by the whole completion, in units of ``L``);
- **verbosity**: share of the column lines written (0 terse, 1 full), share of terse answers and
  completion length;
- **hidden computation**, two ways. (1) Probes at the prompt's last token -- the position
  before any column line would be written, where the model chooses its style -- for the carry
  out of the units column and the units digit of the answer, linear (scikit-learn logistic
  regression, held-out accuracy), averaged over the deeper half of the layers. A model that
  computes silently has these values there; one that writes them need not. (2) The oracle exit
  layer of the answer's digits (`eetools.analysis.probes.oracle_exits` on the model's own greedy
  completions): an answer copied from written lines needs few layers, one computed silently many.

`measure` does it for one model; `ExternalisationResult` holds runs of the three conditions
(``lam = 0``; ``lam > 0`` with the mean exit cost; ``lam > 0`` with the total exit cost, the
control for "a mean per token falls by adding easy tokens") over RL steps, with per-condition
means and standard errors (`summary`, `contrasts`) and a `.figure()` in the style of Fig. 2.
The experiment itself is `eetools.pipeline.run_externalisation` (``eetools externalisation``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from eetools import tasks as task_lib
from eetools.core.rule import ExitRule
from eetools.tasks.steps import StepsTask

# condition -> RL settings; the experiment runs each with the same seeds and steps
CONDITIONS: dict[str, dict] = {
    "lam0": {"lam": 0.0, "exit_cost": "mean"},
    "mean-cost": {"lam": 1.5, "exit_cost": "mean"},
    "total-cost": {"lam": 1.5, "exit_cost": "total"},
}
LABELS = {
    "lam0": "task reward only (lam 0)",
    "mean-cost": "exit RL, mean cost",
    "total-cost": "exit RL, total cost",
}
# the measures of `measure`, in the order the summary lists them
MEASURES = (
    "accuracy",
    "layers_saved",
    "blocks_per_answer",
    "verbosity",
    "terse_share",
    "length",
    "probe_carry",
    "probe_digit",
    "answer_oracle_layer",
)
PROBE_TARGETS = {"carry": "carry out of the units column", "digit": "units digit of the answer"}


@torch.no_grad()
def prompt_residuals(ee_model, prompts: Sequence[str], batch_size: int = 64) -> Float[Tensor, "n layers d_model"]:
    """Residual stream at each prompt's last token, layers ``0 .. L`` (L: the final stream), adapters on.

    The last prompt token (the newline) predicts the first completion token: the position before
    any column line would be written.
    """
    from eetools.core.encoding import encode_sequences
    from eetools.core.lens import capture_residuals

    if not prompts:
        raise ValueError("no prompts given")
    L = ee_model.n_layers
    out = []
    for b0 in range(0, len(prompts), batch_size):
        chunk = list(prompts[b0 : b0 + batch_size])
        ids, attn, predict = encode_sequences(ee_model, chunk, [""] * len(chunk))
        last = predict.float().argmax(1)  # first predicting position = the prompt's last token
        rows = (torch.arange(len(chunk)), last)
        store = capture_residuals(ee_model, ids, range(L + 1), attention_mask=attn, rows=rows)
        out.append(torch.stack([store[l].float().cpu() for l in range(L + 1)], 1))
    return torch.cat(out)


def probe_targets(examples) -> dict[str, np.ndarray]:
    """Per example, the intermediate values the probes look for (see `PROBE_TARGETS`)."""
    rows = [StepsTask.intermediates(e)[0] for e in examples]
    return {
        "carry": np.array([r["carry_out"] for r in rows]),
        "digit": np.array([r["digit"] for r in rows]),
    }


def probe_accuracy(
    features: Float[np.ndarray, "n layers d"], labels: np.ndarray, *, test_share: float = 0.3, seed: int = 0
) -> np.ndarray:
    """Held-out accuracy of a logistic-regression probe at each layer; shape ``[layers]``.

    One split for every layer (`seed`), features standardised on the training part.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n = len(labels)
    if features.shape[0] != n or n < 10:
        raise ValueError(f"need >= 10 examples with one label each, got {features.shape[0]} and {n} labels")
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(test_share * n)))
    test, train = order[:n_test], order[n_test:]
    out = []
    for l in range(features.shape[1]):
        y = labels[train]
        if len(np.unique(y)) < 2:
            out.append(float(np.mean(labels[test] == y[0])))
            continue
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=500))
        clf.fit(features[train, l], y)
        out.append(float(clf.score(features[test, l], labels[test])))
    return np.array(out)


def answer_depth(oracle_df: pd.DataFrame, completions: Sequence[str], n_layers: int) -> np.ndarray:
    """Mean oracle layer of each completion's answer digits (NaN where there is no answer line).

    `oracle_df` is `OracleResult.df` for ``(prompt, completion)`` pairs: per sequence ``seq``, one row
    per predicted token in order, its text in ``token`` (the EOS row last). A token belongs to the
    answer when its characters lie within the answer line after ``"A: "``.
    """
    out = np.full(len(completions), np.nan)
    for i, (_, rows) in enumerate(oracle_df.groupby("seq", sort=True)):
        text = completions[i]
        start = 0 if text.startswith("A: ") else text.find("\nA: ") + 1
        if start == 0 and not text.startswith("A: "):
            continue
        start += 3
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        pieces = rows["token"].astype(str).tolist()
        ends = np.cumsum([len(p) for p in pieces])
        begins = ends - np.array([len(p) for p in pieces])
        inside = (begins >= start) & (ends <= end) & (ends > begins)
        layers = rows["oracle_layer"].to_numpy()[inside]
        if len(layers):
            out[i] = float(layers.mean())
    return out


def measure(
    ee_model,
    task: StepsTask | str = "steps",
    *,
    n_eval: int = 64,
    n_probe: int = 200,
    threshold: float = 0.5,
    seed: int = 0,
) -> dict:
    """Every measure of one exit model on the steps task's held-out sums (see the module doc).

    Args:
        ee_model: an `EarlyExitModel` with learned heads.
        task: a `StepsTask` (or its name).
        n_eval: held-out sums generated greedily (threshold exits) for accuracy, compute and verbosity.
        n_probe: held-out sums whose prompts the probes are fitted and tested on (70/30 split).
        threshold: exit threshold of the greedy evaluation.
        seed: seed of the generation and of the probe split.

    Returns:
        One row: the `MEASURES`, plus ``probe_carry_chance`` / ``probe_digit_chance`` (share of the
        majority class of the probe's test labels) and ``n_eval``.
    """
    from eetools.analysis.probes.oracle import oracle_exits

    task = task_lib.get(task)
    if not isinstance(task, StepsTask):
        raise ValueError(f"externalisation is measured on the steps task, got {task.name!r}")
    if n_eval < 1 or n_probe < 10:
        raise ValueError(f"need n_eval >= 1 and n_probe >= 10, got {n_eval} and {n_probe}")
    split = task.test_split()
    exs = split[:n_eval]
    r = ee_model.generate(
        [e.prompt for e in exs],
        task.max_new_tokens,
        rule=ExitRule(mode="threshold", threshold=threshold),
        temperature=0.0,
        seed=seed,
        skip="compute",
    )
    comps = [task.cut(e, t) for e, t in zip(exs, r.text)]  # the task's answer protocol
    L = ee_model.n_layers
    used = ((r.exit_layers.float() / L) * r.mask).sum(1)  # blocks per completion, in units of L
    oracle = oracle_exits(ee_model, [(e.prompt, c) for e, c in zip(exs, comps)])
    depth = answer_depth(oracle.df, comps, L)
    probe_exs = task.validation_split(n_probe)
    feats = prompt_residuals(ee_model, [e.prompt for e in probe_exs]).numpy()
    deep = slice(L // 2, L + 1)
    row = {
        "accuracy": float(np.mean([task.score(e, c) == 1.0 for e, c in zip(exs, comps)])),
        "layers_saved": 1.0 - r.batch_compute,
        "blocks_per_answer": float(used.mean()),
        "verbosity": float(np.mean([task.verbosity(e, c) for e, c in zip(exs, comps)])),
        "terse_share": float(np.mean([task.written_lines(c) == 0 for c in comps])),
        "length": float(r.mask.sum(1).float().mean()),
        "answer_oracle_layer": float(np.nanmean(depth)) if np.isfinite(depth).any() else float("nan"),
        "n_eval": len(exs),
    }
    rng = np.random.default_rng(seed)
    for name, labels in probe_targets(probe_exs).items():
        acc = probe_accuracy(feats, labels, seed=int(rng.integers(1 << 31)))
        row[f"probe_{name}"] = float(acc[deep].mean())
        row[f"probe_{name}_chance"] = float(np.bincount(labels).max() / len(labels))
    return row


@torch.no_grad()
def style_accuracy(model, task: StepsTask | str = "steps", *, n: int = 200, batch_size: int = 100) -> pd.DataFrame:
    """Base-model accuracy per style on the same held-out sums, the style forced by the completion's start.

    "terse": the prompt followed by ``"A: "``; "written": the prompt followed by the first character
    of the first column line (the model then writes on as it likes); "free": the prompt alone.
    Greedy tokens, no exits (adapters off when `model` is an exit model). One row per (style,
    number of digits of the larger operand) and an "all" row per style: ``accuracy``, ``n``,
    ``verbosity`` (of the free completions).
    """
    from eetools.core.model import EarlyExitModel, attach_exit_heads

    task = task_lib.get(task)
    if not isinstance(task, StepsTask):
        raise ValueError(f"style accuracy is measured on the steps task, got {task.name!r}")
    ee = model if isinstance(model, EarlyExitModel) else attach_exit_heads(model)
    exs = task.test_split()[:n]
    starts = {"terse": lambda e: "A: ", "written": lambda e: str(e.meta["a"])[-1], "free": lambda e: ""}
    rows = []
    for style, start in starts.items():
        texts = []
        for b0 in range(0, len(exs), batch_size):
            chunk = exs[b0 : b0 + batch_size]
            with ee.adapters_disabled():  # the base model
                r = ee.generate(
                    [e.prompt + start(e) for e in chunk],
                    task.max_new_tokens,
                    rule=ExitRule(mode="off"),
                    temperature=0.0,
                    seed=0,
                )
            texts += [start(e) + t for e, t in zip(chunk, r.text)]
        comps = [task.cut(e, t) for e, t in zip(exs, texts)]
        for e, c in zip(exs, comps):
            rows.append(
                {
                    "style": style,
                    "digits": len(str(max(e.meta["a"], e.meta["b"]))),
                    "correct": float(task.extract_answer(c) == e.answer),
                    "verbosity": task.verbosity(e, c),
                    "terse": float(task.written_lines(c) == 0),
                }
            )
    df = pd.DataFrame(rows)
    per = df.groupby(["style", "digits"]).agg(
        accuracy=("correct", "mean"), n=("correct", "size"), verbosity=("verbosity", "mean"), terse=("terse", "mean")
    )
    total = df.groupby("style").agg(
        accuracy=("correct", "mean"), n=("correct", "size"), verbosity=("verbosity", "mean"), terse=("terse", "mean")
    )
    total.index = pd.MultiIndex.from_tuples([(s, "all") for s in total.index], names=["style", "digits"])
    per.index = per.index.set_levels(per.index.levels[1].astype(str), level=1)
    return pd.concat([per, total]).reset_index()


@dataclass
class ExternalisationResult:
    """Measures of RL runs of several conditions over RL steps.

    Attributes:
        history: one row per (condition, seed, step): columns ``condition``, ``seed``, ``step`` and
            the `MEASURES`.
        rl_history: optional per-step RL history of every run (``condition``, ``seed``, ``step``,
            ``accuracy``, ``compute``, ``length``, ...), the sampled rollouts' view.
    """

    history: pd.DataFrame
    rl_history: pd.DataFrame | None = None

    def __post_init__(self):
        need = {"condition", "seed", "step"}
        missing = need - set(self.history.columns)
        if missing:
            raise ValueError(f"history lacks columns {sorted(missing)}")

    @property
    def conditions(self) -> list[str]:
        known = [c for c in CONDITIONS if c in set(self.history["condition"])]
        return known + sorted(set(self.history["condition"]) - set(known))

    def final(self) -> pd.DataFrame:
        """Each run's row at its last measured step."""
        h = self.history.sort_values("step")
        return h.groupby(["condition", "seed"], sort=False).tail(1).reset_index(drop=True)

    def summary(self, measures: Sequence[str] = MEASURES) -> pd.DataFrame:
        """Per condition at the last step: mean, standard error over seeds and number of seeds of each measure."""
        f = self.final()
        rows = []
        for cond in self.conditions:
            d = f[f["condition"] == cond]
            row = {"condition": cond, "seeds": len(d), "step": int(d["step"].max())}
            for m in measures:
                if m in d:
                    x = d[m].to_numpy(float)
                    x = x[np.isfinite(x)]  # e.g. no answer line anywhere: no answer depth
                    row[m] = float(x.mean()) if len(x) else float("nan")
                    row[f"{m}_se"] = float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")
            rows.append(row)
        return pd.DataFrame(rows)

    def contrasts(self, reference: str | None = None, measures: Sequence[str] = MEASURES) -> pd.DataFrame:
        """Difference of each condition's final mean from the `reference` condition (default: lam 0),
        with a 95 % interval (Welch's t over seeds)."""
        from scipy import stats

        reference = reference or self.conditions[0]
        f = self.final()
        ref = f[f["condition"] == reference]
        rows = []
        for cond in self.conditions:
            if cond == reference:
                continue
            d = f[f["condition"] == cond]
            for m in measures:
                if m not in d:
                    continue
                a, b = d[m].dropna().to_numpy(float), ref[m].dropna().to_numpy(float)
                diff = float(a.mean() - b.mean()) if len(a) and len(b) else float("nan")
                va, vb = (
                    (a.var(ddof=1) / len(a) if len(a) > 1 else np.nan),
                    (b.var(ddof=1) / len(b) if len(b) > 1 else np.nan),
                )
                se = float(np.sqrt(va + vb))
                if se > 0 and np.isfinite(se):
                    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
                    half = float(stats.t.ppf(0.975, dof) * se)
                else:
                    half = 0.0 if se == 0 else float("nan")
                rows.append(
                    {
                        "condition": cond,
                        "reference": reference,
                        "measure": m,
                        "diff": diff,
                        "lo": diff - half,
                        "hi": diff + half,
                    }
                )
        return pd.DataFrame(rows)

    def figure(self, measures: Sequence[str] = ("verbosity", "probe_carry", "answer_oracle_layer", "accuracy")):
        """One panel per measure over RL steps: each run light, each condition's mean bold with +-1 SE."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        titles = {
            "verbosity": "verbosity (share of column lines written)",
            "probe_carry": "hidden: carry probe at the prompt's end",
            "probe_digit": "hidden: units-digit probe at the prompt's end",
            "answer_oracle_layer": "hidden: oracle exit layer of answer digits",
            "accuracy": "accuracy (greedy, threshold exits)",
            "layers_saved": "layers saved per token",
            "blocks_per_answer": "blocks per answer (units of L)",
            "terse_share": "share of terse answers",
        }
        measures = [m for m in measures if m in self.history]
        fig = make_subplots(rows=1, cols=len(measures), subplot_titles=[titles.get(m, m) for m in measures])
        colours = ["#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a"]
        for j, m in enumerate(measures, start=1):
            for i, cond in enumerate(self.conditions):
                c = colours[i % len(colours)]
                d = self.history[self.history["condition"] == cond]
                for _seed, run in d.groupby("seed"):
                    run = run.sort_values("step")
                    fig.add_trace(
                        go.Scatter(
                            x=run["step"],
                            y=run[m],
                            mode="lines",
                            line={"color": c, "width": 1},
                            opacity=0.3,
                            showlegend=False,
                            legendgroup=cond,
                            hoverinfo="skip",
                        ),
                        row=1,
                        col=j,
                    )
                g = d.groupby("step")[m]
                mean, se = g.mean(), g.std(ddof=1) / np.sqrt(g.count())
                se = se.fillna(0.0)
                x = list(mean.index)
                fig.add_trace(
                    go.Scatter(
                        x=x + x[::-1],
                        y=list(mean + se) + list((mean - se)[::-1]),
                        fill="toself",
                        fillcolor=c,
                        opacity=0.15,
                        line={"width": 0},
                        showlegend=False,
                        legendgroup=cond,
                        hoverinfo="skip",
                    ),
                    row=1,
                    col=j,
                )
                fig.add_trace(
                    go.Scatter(
                        x=x,
                        y=mean,
                        mode="lines+markers",
                        line={"color": c, "width": 3},
                        name=LABELS.get(cond, cond),
                        legendgroup=cond,
                        showlegend=j == 1,
                    ),
                    row=1,
                    col=j,
                )
            fig.update_xaxes(title_text="RL step", row=1, col=j)
        fig.update_layout(
            title="Externalisation over RL: runs light, mean bold, band +-1 SE",
            template="plotly_white",
            height=380,
            width=330 * len(measures),
        )
        return fig

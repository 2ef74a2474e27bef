"""Evaluating an early-exit model on a task: accuracy, compute, coherence, exit histograms.

`evaluate` runs the model on held-out prompts (the task's frozen test split) with greedy
tokens and exits following `mode`, and puts beside it the base model (no exits, adapters
off), the oracle-exit bound (docs/method.md section 8: per token, the earliest exitable
layer whose logit-lens argmax equals the final argmax, on the base model's greedy text)
and, for a model with LoRA adapters, the same model at full depth ("no_exit"): the
adapters can cost accuracy on their own, and that row separates their cost from the exits'.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from eetools import tasks as task_lib
from eetools.analysis.judges import as_judge, score_all
from eetools.core.options import check_value
from eetools.core.rule import UNSET, ExitRule


@dataclass
class Evaluation:
    """Results of `evaluate`.

    Attributes:
        summary: one row per system ("model", "base", "no_exit" for a model with LoRA adapters,
            "oracle"): accuracy, compute,
            layers_saved and one ``coherence_<judge>`` column per judge.
        per_example: one row per (system, example): score, correct, compute, coherences, completion.
        histogram: fraction of generated tokens per exit outcome (exitable layers, then "full"), per system.
    """

    summary: pd.DataFrame
    per_example: pd.DataFrame
    histogram: pd.DataFrame
    layers: list[int] = field(default_factory=list)
    n_layers: int = 0

    def _repr_html_(self) -> str:
        return self.summary.to_html(float_format=lambda v: f"{v:.3f}")

    def figure(self):
        """Exit-layer histogram of each system (grouped bars)."""
        from eetools.views.tokens import exit_histogram_figure

        hist = {c: self.histogram[c].to_numpy() for c in self.histogram.columns}
        acc = ", ".join(f"{r.system} {r.accuracy:.0%}" for r in self.summary.itertuples())
        return exit_histogram_figure(hist, self.layers, self.n_layers, title=f"Exit layers (accuracy: {acc})")


_CACHE: dict | None = None  # rollouts kept by `rollouts_kept`, None outside it


@contextlib.contextmanager
def rollouts_kept(*, one_base: bool = False):
    """Within this context, rollouts that `evaluate` (and what calls it: `tradeoff`, `coherence_by_kl_factor`)
    has made once are reused, not made again: the same model object, prompts, rule, seed and settings.

    For a job that evaluates the same models several ways (``eetools reproduce``: Fig. 3's base row, the
    evaluation table and each model's operating points all start with the same rollouts). The models must
    not change within it (no training, no new adapters). With `one_base`, every model evaluated inside
    shares one base model, so the base rollouts (adapters off, no exits) of one serve them all.
    """
    global _CACHE
    outer, _CACHE = _CACHE, {"one_base": one_base, "entries": {}}
    try:
        yield
    finally:
        _CACHE = outer


def _cache_key(ee_model, prompts, rule, base, max_new_tokens, seed, batch_size, temperature) -> tuple:
    # no exits: neither the threshold nor the lens checks change a token; greedy as well: nor does the seed
    off = rule.mode == "off"
    who = "base" if base and off and _CACHE["one_base"] else id(ee_model)
    seed = None if off and temperature == 0 else seed
    return (who, base, "off" if off else rule, tuple(prompts), max_new_tokens, seed, batch_size, temperature)


def _generate_all(
    ee_model, prompts, *, rule: ExitRule, max_new_tokens, seed, batch_size, temperature, base, progress, label=None
):
    """Rollouts of `prompts` in batches under `rule` (greedy or sampled tokens), the base model's with `base`."""

    def make():
        return _make_all(ee_model, prompts, rule, max_new_tokens, seed, batch_size, temperature, base, progress, label)

    if _CACHE is None:
        return make()
    entries, key = (
        _CACHE["entries"],
        _cache_key(ee_model, prompts, rule, base, max_new_tokens, seed, batch_size, temperature),
    )
    if key not in entries:  # the model is kept with its rollouts: its id is not reused
        entries[key] = (ee_model, make())
    return entries[key][1]


def _make_all(ee_model, prompts, rule, max_new_tokens, seed, batch_size, temperature, base, progress, label):
    rollouts = []
    ctx = ee_model.adapters_disabled() if base else contextlib.nullcontext()
    with ctx:
        for i in tqdm(
            range(0, len(prompts), batch_size),
            desc=f"evaluate ({label or ('base' if base else rule.mode)})",
            disable=not progress,
            leave=False,
        ):
            rollouts.append(
                ee_model.generate(
                    prompts[i : i + batch_size],
                    max_new_tokens,
                    rule=rule,
                    temperature=temperature,
                    seed=seed + i,
                    skip="compute",
                )
            )
    return rollouts


def _check_counts(**counts) -> None:
    """Each count None (its default) or an integer >= 1: a negative `n` would slice from the end."""
    for name, value in counts.items():
        check_value(name, value, int | None, ">= 1")


def evaluate(
    ee_model,
    task,
    *,
    n: int = 100,
    rule: ExitRule | None = None,
    mode: str = UNSET,
    seed: int = 0,
    judges=("reasoning",),
    max_new_tokens: int | None = None,
    batch_size: int = 50,
    temperature: float = 0.0,
    threshold: float | Sequence[float] = UNSET,
    examples: Sequence | None = None,
    compare: bool = True,
    progress: bool = True,
    patience: int = UNSET,
    min_confidence: float = UNSET,
    max_entropy: float | None = UNSET,
) -> Evaluation:
    """Evaluate `ee_model` on `n` held-out examples of `task` (greedy tokens, exits by the rule).

    Args:
        ee_model: an `EarlyExitModel`.
        task: task name or `Task`; examples come from its frozen test split unless `examples` is given.
        n: number of examples.
        rule: the exits of the model under test, an `ExitRule` (default: sampled exits); or give
            its fields as the keywords below (with a `rule`, one that disagrees is an error).
        mode: "sample", "threshold" or "off" exits for the model under test.
        threshold: with mode "threshold", exit where ``c >= threshold``: one number, or one per
            exitable layer.
        patience: also require the logit lens's top token to agree over this many exitable layers
            before an exit, thresholded or sampled (see `eetools.core.generation.generate`).
        min_confidence: also require the logit lens's top probability at the exit layer to be at
            least this (see `eetools.core.generation.generate`).
        max_entropy: also require the logit lens's entropy (nats) at the exit layer to be at most
            this (None: no ceiling).
        seed: seed of the exit sampling.
        judges: coherence judges (names, judge objects or functions).
        compare: also evaluate the base model, the oracle-exit bound and, if the model has LoRA
            adapters, the model itself with exits off ("no_exit": adapters on, full depth).
        max_new_tokens: generation cap (default: the task's, which fits its longest reasoning).

    Returns:
        An `Evaluation` (DataFrames; `.figure()` plots the exit histograms).
    """
    rule = ExitRule.from_kwargs(
        rule,
        n_exit=len(ee_model.exit_layers),
        mode=mode,
        threshold=threshold,
        patience=patience,
        min_confidence=min_confidence,
        max_entropy=max_entropy,
    )
    _check_counts(n=n, batch_size=batch_size, max_new_tokens=max_new_tokens)
    check_value("temperature", temperature, float, ">= 0: 0 means greedy tokens")
    task = task_lib.get(task, tokenizer=ee_model)
    max_new_tokens = max_new_tokens or task.max_new_tokens
    exs = list(examples) if examples is not None else task.test_split()[:n]
    if not exs:
        raise ValueError("no examples to evaluate")
    judges = [as_judge(j) for j in judges]
    prompts = [e.prompt for e in exs]
    L, layers = ee_model.n_layers, list(ee_model.exit_layers)
    rows, hist = [], {}
    base_text, done = None, {}  # rollouts per (rule, base): with mode "off", no_exit is the model's own run
    for name, r, base in _systems(ee_model, rule, compare):
        if (r, base) not in done:
            done[r, base] = _generate_all(
                ee_model,
                prompts,
                rule=r,
                max_new_tokens=max_new_tokens,
                seed=seed,
                batch_size=batch_size,
                temperature=temperature,
                base=base,
                progress=progress,
                label=rule.mode if name == "model" else name,
            )
        rs = done[r, base]
        texts = [t for r in rs for t in r.text]
        exits = torch.cat([torch.where(r.mask, r.exit_layers, -1).flatten() for r in rs])
        hist[name] = _shares(exits, [*layers, L])
        lengths = torch.cat([r.mask.sum(1) for r in rs]).tolist()
        rows += _rows(name, task, exs, texts, torch.cat([r.compute for r in rs]).tolist(), judges, lengths)
        if base:
            base_text = texts
    if compare and base_text is not None:
        hist["oracle"], oracle_rows = _oracle(ee_model, task, exs, base_text, judges)
        rows += oracle_rows
    per = pd.DataFrame(rows)
    histogram = pd.DataFrame(hist, index=[*(str(l) for l in layers), "full"])
    return Evaluation(summary=_summary(per, judges), per_example=per, histogram=histogram, layers=layers, n_layers=L)


def _systems(ee_model, rule: ExitRule, compare: bool) -> list[tuple[str, ExitRule, bool]]:
    """``(name, rule, adapters off)`` of each system `evaluate` runs: the model, and with `compare` the
    base model and, for a model with LoRA adapters, the model at full depth (what the adapters alone cost)."""
    from eetools.core.adapters import lora_layers

    systems = [("model", rule, False)]
    if compare:
        systems.append(("base", rule.heads_only("off"), True))
        if lora_layers(ee_model):
            systems.append(("no_exit", rule.heads_only("off"), False))
    return systems


def _shares(exits, outcomes: list[int]) -> np.ndarray:
    """Share of the tokens at each outcome (exitable layers, then L); entries not in `outcomes` (-1: padding) ignored."""
    counts = np.array([float((exits == l).sum()) for l in outcomes])
    return counts / max(counts.sum(), 1)


def _oracle(ee_model, task, exs, base_text: list[str], judges) -> tuple[np.ndarray, list[dict]]:
    """The oracle-exit bound on the base model's greedy text: its exit histogram and per-example rows.

    Read out through the model's own exit readout (the logit lens, or its tuned lens): the bound on
    what this model's exits could save."""
    from eetools.analysis.probes.oracle import oracle_exits  # per-token oracle on the base model's greedy text

    L, layers = ee_model.n_layers, list(ee_model.exit_layers)
    pairs = [(e.prompt, task.cut(e, t)) for e, t in zip(exs, base_text)]
    odf = oracle_exits(ee_model, pairs, base=True, readout="exit").df
    per_seq = odf.groupby("seq")["oracle_layer"].mean() / L
    comp = [float(per_seq.get(i, 1.0)) for i in range(len(exs))]
    return _shares(torch.tensor(odf["oracle_layer"].to_numpy()), [*layers, L]), _rows(
        "oracle", task, exs, base_text, comp, judges
    )


def _summary(per: pd.DataFrame, judges) -> pd.DataFrame:
    """One row per system: accuracy, mean score, compute, layers saved and each judge's mean coherence."""
    summary = []
    for name, g in per.groupby("system", sort=False):
        rec = {
            "system": name,
            "n": len(g),
            "accuracy": g["correct"].mean(),
            "mean_score": g["score"].mean(),
            "compute": g["compute"].mean(),
            "layers_saved": 1 - g["compute"].mean(),
            "length": g["length"].mean(),  # generated tokens per completion (NaN for the oracle: not decoded)
        }
        for j in judges:
            rec[f"coherence_{j.name}"] = g[f"coherence_{j.name}"].mean()
        summary.append(rec)
    return pd.DataFrame(summary)


def _rows(system, task, exs, texts, compute, judges, lengths=None):
    """Per-example rows; `lengths` are the generated tokens per completion (EOS included; None: not decoded)."""
    cut = [task.cut(e, t) for e, t in zip(exs, texts)]
    lengths = lengths if lengths is not None else [float("nan")] * len(exs)
    scores = [task.score(e, c) for e, c in zip(exs, cut)]
    coh = {j.name: score_all(j, exs, cut) for j in judges}
    return [
        {
            "system": system,
            "example": i,
            "score": s,
            "correct": s == 1.0,
            "compute": c,
            "length": n,
            "completion": t,
            **{f"coherence_{k}": v[i] for k, v in coh.items()},
        }
        for i, (s, c, t, n) in enumerate(zip(scores, compute, cut, lengths))
    ]


def greedy_accuracy(
    model,
    task,
    *,
    n: int | None = None,
    batch_size: int = 100,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> float:
    """Greedy accuracy of a base model (a bridge, no exits) on the task's frozen test split."""
    from eetools.core.model import attach_exit_heads

    _check_counts(n=n, batch_size=batch_size, max_new_tokens=max_new_tokens)
    task = task_lib.get(task, tokenizer=model)
    max_new_tokens = max_new_tokens or task.max_new_tokens
    exs = task.test_split()[:n] if n is not None else task.test_split()
    ee = attach_exit_heads(model)
    rs = _generate_all(
        ee,
        [e.prompt for e in exs],
        rule=ExitRule(mode="off"),
        max_new_tokens=max_new_tokens,
        seed=0,
        batch_size=batch_size,
        temperature=0.0,
        base=True,
        progress=progress,
    )
    texts = [t for r in rs for t in r.text]
    return sum(task.score(e, task.cut(e, t)) == 1.0 for e, t in zip(exs, texts)) / len(exs)


@dataclass
class CoherenceByKL:
    """Fig. 3 data: one row per (system, example) with its coherence score."""

    df: pd.DataFrame  # columns: system, kl_factor, example, coherence, correct, compute

    def summary(self) -> pd.DataFrame:
        return (
            self.df.groupby(["system", "kl_factor"], dropna=False, sort=False)
            .agg(coherence=("coherence", "mean"), accuracy=("correct", "mean"), compute=("compute", "mean"))
            .reset_index()
        )

    def figure(self) -> go.Figure:
        fig = go.Figure()
        for system, g in self.df.groupby("system", sort=False):
            fig.add_trace(go.Box(y=g["coherence"], name=system, boxmean=True, boxpoints=False))
        fig.update_layout(
            title="Coherence by KL factor (higher k: exits rarer, text closer to the base model)",
            yaxis_title="coherence",
            template="plotly_white",
            showlegend=False,
        )
        return fig


def coherence_by_kl_factor(
    models: Mapping[float, object],
    task="addition",
    *,
    n: int = 100,
    seed: int = 0,
    judge="reasoning",
    mode: str = "sample",
    base_model=None,
    progress: bool = True,
) -> CoherenceByKL:
    """Fig. 3: evaluate students calibrated with different KL factors ({k: ee_model}) plus the base model."""
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

"""The externalisation experiment: RL under three conditions x seeds, measured every few steps.

``eetools externalisation --out DIR [--quick]`` runs it (see `run_externalisation`): from one
calibrated exit model (default: the shipped mixed-style tiny reasoner), for every condition of
`eetools.analysis.externalisation.CONDITIONS` and every seed, RL on a steps-task variant (`task`, by default
``steps-small``, the regime where the shipped model's terse style is as accurate as its written one)
(`eetools.train.rl.train_rl`) in segments of `measure_every` steps, each followed by
`eetools.analysis.externalisation.measure`. Every segment ends in a checkpoint and a row of
``history.csv``, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import pandas as pd

from eetools.analysis.externalisation import CONDITIONS, ExternalisationResult, measure
from eetools.core.options import validate_config
from eetools.io.paths import check_writable
from eetools.tasks import get as get_task
from eetools.tasks.steps import StepsTask

DEFAULT_MODEL = "tiny-reasoner-mixed/calibrated"
DEFAULT_TASK = "steps-small"  # the regime of the shipped model: terse as accurate as written


@dataclass
class ExternalisationConfig:
    """Settings of ``eetools externalisation`` (each field is an option)."""

    LIMITS: ClassVar[dict] = {
        "seeds": ">= 0",
        "steps": ">= 1",
        "measure_every": ">= 1",
        "prompts_per_step": ">= 1",
        "k": ">= 2: RLOO needs at least 2 rollouts per prompt",
        "lam": "> 0: the exit-RL conditions need an exit cost (lam 0 is always run too)",
        "beta": ">= 0",
        "lr": "> 0",
        "n_eval": ">= 1",
        "n_probe": ">= 10",
        "conditions": tuple(CONDITIONS),
    }
    exit_model: str = DEFAULT_MODEL
    """Calibrated exit model every run starts from (preset or folder)."""
    task: str = DEFAULT_TASK
    """Steps-task variant the runs train and are measured on (``steps``, ``steps-small``...; see `eetools.tasks.get`)."""
    quick: bool = False
    """A smoke version (under 5 minutes on 2 cores): 2 steps, 2 rollouts of 2 prompts, small measures."""
    conditions: list[str] = field(default_factory=lambda: list(CONDITIONS))
    """Conditions to run (all three by default; one per process splits the experiment, see `load_externalisation`)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """RL seeds, the same for every condition."""
    steps: int = 8
    """RL steps per run."""
    measure_every: int = 4
    """Steps between measures (and checkpoints)."""
    prompts_per_step: int = 8
    """Prompts per RL step."""
    k: int = 4
    """Rollouts per prompt (RLOO group)."""
    lam: float = 1.5
    """Exit-cost weight of the two exit-RL conditions (the lam-0 condition is the task-reward-only baseline)."""
    beta: float = 0.25
    """KL weight in every condition."""
    lr: float = 2e-3
    """RL learning rate (twice `eetools rl`'s default: the runs are short)."""
    n_eval: int = 40
    """Held-out sums generated greedily per measure."""
    n_probe: int = 120
    """Held-out prompts the probes are fitted and tested on per measure."""

    def effective(self) -> ExternalisationConfig:
        """The settings actually run (`quick` shrinks them)."""
        if not self.quick:
            return self
        # the same settings, smaller: every field not named here is kept
        return replace(
            self, seeds=self.seeds[:3], steps=2, measure_every=2, prompts_per_step=2, k=2, n_eval=12, n_probe=40
        )


def _slug(condition: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in condition).strip("-").replace("--", "-")


def _conditions(cfg: ExternalisationConfig) -> dict[str, dict]:
    """The chosen `CONDITIONS`, the exit-RL conditions' lam set to `cfg.lam`."""
    return {
        name: {**c, "lam": 0.0 if c["lam"] == 0 else cfg.lam}
        for name, c in CONDITIONS.items()
        if name in cfg.conditions
    }


def run_externalisation(cfg: ExternalisationConfig, out: str | Path, *, progress: bool = True) -> ExternalisationResult:
    """Run (or resume) the experiment into `out`; returns its `ExternalisationResult`.

    Writes ``out/history.csv`` (measures per condition, seed and step), ``out/rl_history.csv``
    (the RL history of every run, per step), ``out/summary.csv`` and ``out/contrasts.csv``
    (final means +- SE; differences from lam 0 with 95 % intervals), ``out/figure.json`` (plotly)
    and ``out/config.json``. Runs live in ``out/runs/<condition>-seed<s>/``.
    """
    from tqdm.auto import tqdm

    from eetools.io.models import load_exit_model
    from eetools.train.rl import train_rl

    validate_config(cfg)
    if cfg.steps % cfg.measure_every:
        raise ValueError(f"steps ({cfg.steps}) must be a multiple of measure_every ({cfg.measure_every})")
    out = check_writable(out)
    eff = cfg.effective()
    if not isinstance(get_task(eff.task), StepsTask):  # a bad task fails here, before any folder is written
        raise ValueError(f"task must be a steps-task variant (steps, steps-small...), got {eff.task!r}")
    load_exit_model(eff.exit_model)  # a missing model fails here, before any folder is written
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"asked": asdict(cfg), "ran": asdict(eff)}, indent=2) + "\n")
    hist_path = out / "history.csv"
    history = pd.read_csv(hist_path) if hist_path.exists() else pd.DataFrame()
    done = set() if history.empty else set(zip(history["condition"], history["seed"], history["step"]))
    conds = _conditions(eff)
    measure_kw = {"task": eff.task, "n_eval": eff.n_eval, "n_probe": eff.n_probe}
    targets = list(range(eff.measure_every, eff.steps + 1, eff.measure_every))
    bar = tqdm(total=len(conds) * len(eff.seeds) * (len(targets) + 1), desc="externalisation", disable=not progress)
    start_row = None

    def record(row: dict) -> None:
        nonlocal history
        history = pd.concat([history, pd.DataFrame([row])], ignore_index=True)
        history.to_csv(hist_path, index=False)

    rl_rows = []
    for name, settings in conds.items():
        for seed in eff.seeds:
            if (name, seed, 0) not in done:
                if start_row is None:  # every run starts from the same model: measured once
                    start_row = measure(load_exit_model(eff.exit_model), **measure_kw)
                record({"condition": name, "seed": seed, "step": 0, **start_row})
            bar.update(1)
            run_dir = out / "runs" / f"{_slug(name)}-seed{seed}"
            ee = None
            for target in targets:
                if (name, seed, target) in done:
                    bar.update(1)
                    continue
                ee = ee or load_exit_model(eff.exit_model)
                bar.set_postfix_str(f"{name}, seed {seed}, step {target}")
                res = train_rl(
                    ee,
                    eff.task,
                    steps=target,
                    checkpoint_dir=run_dir / "checkpoint",
                    checkpoint_every=eff.measure_every,
                    seed=seed,
                    prompts_per_step=eff.prompts_per_step,
                    k=eff.k,
                    beta=eff.beta,
                    lr=eff.lr,
                    eval_every=0,
                    progress=False,
                    start=eff.exit_model,
                    **settings,
                )
                res.history.to_csv(run_dir / "rl_history.csv", index=False)
                record({"condition": name, "seed": seed, "step": target, **measure(ee, **measure_kw)})
                bar.update(1)
            if (run_dir / "rl_history.csv").exists():
                rl_rows.append(pd.read_csv(run_dir / "rl_history.csv").assign(condition=name, seed=seed))
    bar.close()
    result = ExternalisationResult(
        history=history, rl_history=pd.concat(rl_rows, ignore_index=True) if rl_rows else None
    )
    if result.rl_history is not None:
        result.rl_history.to_csv(out / "rl_history.csv", index=False)
    result.summary().to_csv(out / "summary.csv", index=False)
    result.contrasts().to_csv(out / "contrasts.csv", index=False)
    (out / "figure.json").write_text(result.figure().to_json())
    return result


def load_externalisation(*folders: str | Path, rl_history: str | Path | None = None) -> ExternalisationResult:
    """The result of finished (or partial) runs, from their output folders or ``history.csv`` files.

    Several folders (e.g. one process per condition) are concatenated. A folder's ``rl_history.csv`` is
    read beside its history; `rl_history` names one explicitly (the shipped CSVs).
    """
    hists, rls = [], []
    for folder in folders:
        folder = Path(folder)
        path = folder / "history.csv" if folder.is_dir() else folder
        if not path.exists():
            raise FileNotFoundError(
                f"no externalisation history at {path}; run `eetools externalisation --out DIR` first"
            )
        hists.append(pd.read_csv(path))
        rl = path.parent / "rl_history.csv"
        if rl_history is None and folder.is_dir() and rl.exists():
            rls.append(pd.read_csv(rl))
    if not hists:
        raise ValueError("give at least one output folder or history.csv")
    if rl_history is not None:
        rls = [pd.read_csv(rl_history)]
    return ExternalisationResult(
        history=pd.concat(hists, ignore_index=True), rl_history=pd.concat(rls, ignore_index=True) if rls else None
    )

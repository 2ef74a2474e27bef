"""End-to-end runs behind the command line: calibrate, RL, evaluate, reproduce, report.

Each writes into an output folder: checkpoints (exit-model folders), histories (CSV),
figures (plotly JSON, so `write_report` can assemble them without a model), and for
`reproduce` a self-contained ``report.html``. `run_calibrate` and `run_rl` also run under
torchrun (every process trains its shards; only rank 0 writes). `reproduce` trains in
``workers`` processes of its own (`distributed.spawn`), then evaluates in this one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import pandas as pd
import torch

from eetools import tasks as task_lib
from eetools.core.options import validate_config
from eetools.core.rule import UNSET, ExitRule
from eetools.io.exit_checkpoint import save_exit_model
from eetools.io.paths import check_writable
from eetools.train import distributed


def _default_thresholds():
    from eetools.analysis.operating_points import DEFAULT_THRESHOLDS  # imported lazily: it pulls in plotly

    return DEFAULT_THRESHOLDS


@dataclass
class ReproduceConfig:
    """Settings of ``eetools reproduce`` (the paper's figures on the shipped tiny reasoner)."""

    # what each field may be, beyond its type (`eetools.core.options.validate_config`)
    LIMITS: ClassVar[dict] = {
        "n_seeds": ">= 1",
        "kl_factors": "> 0",
        "calib_kl_factor": "> 0",
        "calib_steps": ">= 0",
        "fig3_steps": ">= 0",
        "rl_steps": ">= 0",
        "rl_temperature": ">= 0",
        "rl_lr": "> 0",
        "rl_head_lr": ">= 0",
        "eval_n": ">= 1",
        "thresholds": "> 0 and <= 1",
        "confidence": "> 0 and <= 1",
        "workers": (1, 2),
    }
    quick: bool = False
    """A ~3-minute smoke version: fewer steps, seeds, KL factors and examples."""
    task: str = "addition"
    """Task for evaluation and the figures."""
    rl_task: str = "addition+tom"
    """Task (or mixture, e.g. "addition+tom") RL trains on."""
    calib_task: str = "addition+tom"
    """Task (or mixture) the shipped exit heads are calibrated on, so they behave on every task."""
    seed: int = 0
    """Base seed (RL runs use seed, seed+1, ...)."""
    n_seeds: int = 3
    """RL runs (seeds) for Fig. 2 left."""
    kl_factors: list[float] = field(default_factory=lambda: [1.0, 4.0, 16.0, 64.0])
    """Other KL factors for Fig. 3 (short calibrations; the main one, `calib_kl_factor`, is added)."""
    calib_kl_factor: float = 64.0
    """KL factor of the main calibration (the shipped heads; 64, the paper's default). 32 saves more depth on
    addition but costs ToM accuracy (docs/experiments.md, "KL factor 32 instead of 64")."""
    calib_steps: int = 500
    """Calibration steps at the main KL factor."""
    fig3_steps: int = 120
    """Calibration steps for the other KL factors of Fig. 3."""
    rl_steps: int = 30
    """RL steps per run."""
    rl_temperature: float = 0.0
    """Token temperature of RL rollouts (0: greedy tokens, exits sampled: the exit policy alone is trained)."""
    rl_train_adapters: bool = True
    """RL trains the LoRA adapters with the exit heads; False (``--no-rl-train-adapters``): the heads alone (docs/experiments.md, "RL on the exit heads alone")."""
    rl_lr: float = 1e-3
    """RL learning rate of the LoRA adapters (and of the heads unless `rl_head_lr` is set)."""
    rl_head_lr: float = 0.0
    """RL learning rate of the exit heads; 0: `rl_lr`. ``--rl-lr 2.5e-4 --rl-head-lr 1e-3`` keeps ToM within a point
    of the base model (docs/experiments.md, "Slower adapters")."""
    eval_n: int = 100
    """Held-out examples per evaluation."""
    thresholds: list[float] = field(default_factory=lambda: list(_default_thresholds()))
    """Exit thresholds of the operating-points figures (accuracy vs layers saved)."""
    confidence: list[float] = field(default_factory=lambda: [0.9999, 0.999])
    """Thresholds of the confidence baseline beside them (the same weights, exiting where the logit lens's top
    probability reaches t; docs/experiments.md, "Learned heads against the confidence baseline")."""
    workers: int = 2
    """Processes the training stages (calibration, Fig. 3's calibrations, RL) and then the evaluation jobs run in on
    a CPU (1 or 2): 2 processes of one thread each take 1.2-1.4x fewer seconds a step than one of two threads on 2
    cores (docs/speed.md). The models are the same either way up to float rounding: every batch is cut into 2
    shards, run side by side (2) or one after the other (1, or a GPU); the evaluation jobs are split in two
    (`EVAL_JOBS`)."""


def _quick(cfg: ReproduceConfig) -> ReproduceConfig:
    if not cfg.quick:
        return cfg
    return ReproduceConfig(
        quick=True,
        task=cfg.task,
        calib_task=cfg.calib_task,
        rl_task=cfg.rl_task,
        seed=cfg.seed,
        n_seeds=2,
        kl_factors=[16.0, 64.0],
        calib_kl_factor=cfg.calib_kl_factor,
        calib_steps=12,
        fig3_steps=6,
        rl_steps=2,
        eval_n=24,
        rl_temperature=cfg.rl_temperature,
        rl_train_adapters=cfg.rl_train_adapters,
        rl_lr=cfg.rl_lr,
        rl_head_lr=cfg.rl_head_lr,
        thresholds=[0.5, 0.15],
        confidence=[0.999],
        workers=cfg.workers,
    )


def _dtype(dtype):
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _fresh_ee(model=None, layers=None, head="mlp", device="cpu", dtype=None, seed=None):
    from eetools.core.model import attach_exit_heads
    from eetools.io.models import load_model

    return attach_exit_heads(load_model(model, device=device, dtype=_dtype(dtype)), layers, head=head, seed=seed)


def run_calibrate(
    cfg,
    out: Path,
    *,
    model=None,
    task="addition",
    layers=None,
    head="mlp",
    device="cpu",
    dtype=None,
    progress=True,
    figure_task: str | None = None,
    fig4: bool = True,
) -> Path:
    """Calibrate, save the exit model to ``out/model`` and the history and (with `fig4`) Fig. 4 beside it."""
    from eetools.analysis.figures import exit_distribution_vs_target
    from eetools.train.calibration import calibrate

    validate_config(cfg)
    task_lib.get(task)  # an unknown task fails here, before the model loads
    out = check_writable(out)
    ee = _fresh_ee(model, layers, head, device, dtype, seed=cfg.seed)  # heads, like adapters, from the seed
    res = calibrate(
        ee,
        task,
        checkpoint_dir=out / "checkpoint",
        progress=progress,
        start=_origin(model if model is not None else "tiny-reasoner"),
        **asdict(cfg),
    )
    if not distributed.is_main():  # under torchrun rank 0 writes the results
        return out / "model"
    save_exit_model(ee, out / "model")
    res.history.to_csv(out / "calibration_history.csv", index=False)
    if not fig4:
        return out / "model"
    fig4 = exit_distribution_vs_target(ee, figure_task or task, n=64, kl_factor=cfg.kl_factor)
    fig4.figure().write_json(out / "fig4.json")
    fig4.df.to_csv(out / "fig4.csv")
    (out / "fig4_tv.txt").write_text(f"{fig4.tv:.4f}\n")
    return out / "model"


def run_rl(
    cfg, out: Path, *, start="tiny-reasoner/calibrated", task="addition", device="cpu", dtype=None, progress=True
) -> Path:
    """RL-train from an exit-model checkpoint; save to ``out/model`` with the history."""
    from eetools.io.models import load_exit_model
    from eetools.train.rl import train_rl

    validate_config(cfg)
    task_lib.get(task)  # an unknown task fails here, before the model loads
    out = check_writable(out)
    ee = load_exit_model(start, model=_base_for(start, device, dtype))
    res = train_rl(
        ee,
        task,
        checkpoint_dir=out / "checkpoint",
        progress=progress,
        start=_origin(start),
        **{k: v for k, v in asdict(cfg).items()},
    )
    if not distributed.is_main():  # under torchrun rank 0 writes the results
        return out / "model"
    save_exit_model(ee, out / "model")
    res.history.to_csv(out / "rl_history.csv", index=False)
    res.evals.to_csv(out / "rl_evals.csv", index=False)
    return out / "model"


def read_texts(path) -> list:
    """Training text for `tune_readout` from a JSON-lines file: ``{"prompt", "answer"}`` lines become
    (prompt, continuation) pairs (``scripts/smollm2_answers.py`` writes these), ``{"text"}`` lines texts."""
    import json

    out = []
    with open(path) as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {i} is not JSON ({e.msg}); give one JSON object per line") from None
            if isinstance(d, dict) and isinstance(d.get("prompt"), str) and isinstance(d.get("answer"), str):
                out.append((d["prompt"], d["answer"]))
            elif isinstance(d, dict) and isinstance(d.get("text"), str):
                out.append(d["text"])
            else:
                raise ValueError(f'{path} line {i} needs "prompt" and "answer" strings, or a "text" string')
    if not out:
        raise ValueError(f"{path} holds no lines of text")
    return out


def run_tune_lens(
    cfg,
    out: Path,
    *,
    model=None,
    start=None,
    layers=None,
    data=None,
    task=None,
    n_examples: int = 512,
    device="cpu",
    dtype=None,
    progress=True,
) -> Path:
    """Tune a readout (`eetools.train.tune_readout`); save it to ``out/readout`` (and, from an exit model
    `start`, that exit model with the tuned readout to ``out/model``) and the history beside it."""
    from eetools.io.exit_checkpoint import save_readout
    from eetools.io.models import load_exit_model
    from eetools.train.tune_readout import tune_readout

    validate_config(cfg)
    if (data is None) == (task is None):
        raise ValueError("give the training text as one of --data FILE.jsonl or --task NAME")
    if start is not None and (model is not None or layers is not None):
        raise ValueError("--from takes its base model and layers from the exit model: leave out --model and --layers")
    texts = read_texts(data) if data is not None else None
    if task is not None:
        task_lib.get(task)  # an unknown task fails here, before the model loads
    out = check_writable(out)
    if start is not None:
        ee = load_exit_model(start, model=_base_for(start, device, dtype))
    else:
        ee = _fresh_ee(model, layers, "mlp", device, dtype, seed=cfg.seed)
    if texts is None:
        texts = task_lib.get(task, tokenizer=ee).sample(n_examples, seed=cfg.seed)
    res = tune_readout(
        ee,
        texts,
        checkpoint_dir=out / "checkpoint",
        progress=progress,
        start=_origin(start if start is not None else model if model is not None else "tiny-reasoner"),
        **asdict(cfg),
    )
    save_readout(ee, res.readout, out / "readout", tuning=asdict(cfg))
    res.history.to_csv(out / "tune_history.csv", index=False)
    if start is not None:
        save_exit_model(ee, out / "model")
        return out / "model"
    return out / "readout"


def _origin(name_or_path) -> str:
    """How a run records the model it starts from: a folder as its absolute path, a preset or name as given."""
    key = str(name_or_path)
    return str(Path(key).resolve()) if Path(key).is_dir() else key


def _base_for(start, device, dtype):
    if device == "cpu" and dtype is None:
        return None
    from eetools.io.checkpoints import load_json
    from eetools.io.exit_checkpoint import resolve_checkpoint
    from eetools.io.models import base_model_source, load_model

    want = load_json(resolve_checkpoint(start) / "exit_config.json")["base_model"]
    return load_model(base_model_source(want), device=device, dtype=_dtype(dtype))


def _output_and_model(out, exit_model, device, dtype):
    """The output folder (checked writable, then created once the model loads) and the exit model on its
    base, for `run_evaluate` and `run_tradeoff`."""
    from eetools.io.models import load_exit_model

    out = check_writable(out)
    ee = load_exit_model(exit_model, model=_base_for(exit_model, device, dtype))
    out.mkdir(parents=True, exist_ok=True)
    return out, ee


def run_evaluate(
    out: Path,
    *,
    exit_model="tiny-reasoner/rl",
    task="addition",
    n=100,
    rule=None,
    mode=UNSET,
    threshold=UNSET,
    seed=0,
    patience=UNSET,
    min_confidence=UNSET,
    max_entropy=UNSET,
    device="cpu",
    dtype=None,
    progress=True,
):
    """`eetools.evaluate` of an exit-model checkpoint under `rule` (an `ExitRule`, or its fields as
    keywords); writes ``evaluation.csv`` and ``exit_histogram.json`` (plotly)."""
    from eetools.analysis.evaluation import evaluate

    rule = ExitRule.from_kwargs(
        rule, mode=mode, threshold=threshold, patience=patience, min_confidence=min_confidence, max_entropy=max_entropy
    )  # checked before loading
    out, ee = _output_and_model(out, exit_model, device, dtype)
    ev = evaluate(ee, task, n=n, rule=rule, seed=seed, progress=progress)
    ev.summary.to_csv(out / "evaluation.csv", index=False)
    ev.figure().write_json(out / "exit_histogram.json")
    return ev


def run_tradeoff(
    out: Path,
    *,
    exit_model="tiny-reasoner/rl",
    task="addition",
    n=100,
    thresholds=None,
    seed=0,
    sample=True,
    split="test",
    confidence=(),
    rule=None,
    patience=UNSET,
    min_confidence=UNSET,
    max_entropy=UNSET,
    device="cpu",
    dtype=None,
    progress=True,
):
    """`eetools.tradeoff` of an exit-model checkpoint, the lens checks of its points from `rule` (or
    its fields as keywords); writes ``tradeoff.csv`` and ``tradeoff.json`` (plotly)."""
    from eetools.analysis.operating_points import DEFAULT_THRESHOLDS, tradeoff

    rule = ExitRule.from_kwargs(rule, patience=patience, min_confidence=min_confidence, max_entropy=max_entropy)
    out, ee = _output_and_model(out, exit_model, device, dtype)
    res = tradeoff(
        ee,
        task,
        thresholds=thresholds or DEFAULT_THRESHOLDS,
        n=n,
        seed=seed,
        sample=sample,
        split=split,
        confidence=confidence or (),
        rule=rule,
        progress=progress,
    )
    res.df.to_csv(out / "tradeoff.csv", index=False)
    res.figure().write_json(out / "tradeoff.json")
    return res


def reproduce(cfg: ReproduceConfig, out: Path, *, device="cpu", dtype=None, progress=True) -> Path:
    """Calibration, Fig. 3 KL sweep, RL across seeds, evaluation, operating points, every figure, and ``report.html``."""
    from eetools.train.rl import SweepResult
    from eetools.views.figures import rl_dynamics_figure

    if distributed.launched():
        raise ValueError("reproduce runs in one process; under torchrun run `eetools calibrate` and `eetools rl`")
    _check_reproduce(cfg)
    cfg = _quick(cfg)
    out = check_writable(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    # 1-3. calibration (+ Fig. 4), Fig. 3's short calibrations, RL across seeds (Fig. 2 left);
    # 4. evaluation of the calibrated and RL (first seed) models, Fig. 3's coherence, operating points, Fig. 2 right
    if cfg.workers > 1 and torch.device(device).type == "cpu":
        distributed.spawn(_stages, (cfg, out, device, dtype, progress, 1), workers=cfg.workers)
    else:  # the same shards and jobs, one after the other
        _stages(cfg, out, device, dtype, progress, SHARDS)
    timings = json.loads((out / "stage_timings.json").read_text())
    table = pd.read_csv(out / "evaluation.csv")
    row = table[(table.system == "base") & (table.task == cfg.task)].iloc[0]
    base = {"accuracy": float(row["accuracy"]), "compute": 1.0, "coherence": float(row["coherence_reasoning"])}
    sweep = SweepResult(history=pd.read_csv(out / "rl_history.csv"), evals=pd.DataFrame())
    rl_dynamics_figure(sweep, base=base).write_json(out / "fig2_left.json")
    timings["total_s"] = time.time() - t_start
    (out / "summary.json").write_text(
        json.dumps(
            {
                "config": asdict(cfg),
                "timings": timings,
                "fig4_tv": float((out / "calibrated" / "fig4_tv.txt").read_text()),
                "table": table.to_dict(orient="records"),
            },
            indent=2,
        )
    )
    return write_report(out)


def _check_reproduce(cfg: ReproduceConfig) -> None:
    """Every setting and task name of `cfg`, checked before the first stage runs."""
    validate_config(cfg)
    for name in ("task", "rl_task", "calib_task"):
        try:
            task_lib.get(getattr(cfg, name))
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None


SHARDS = 2
"""Shards of every training batch in `reproduce`: `ReproduceConfig.workers` processes run them side by side."""


def _fig3_factors(cfg: ReproduceConfig) -> list[float]:
    return [k for k in dict.fromkeys(cfg.kl_factors) if k != cfg.calib_kl_factor]


def _train_stages(cfg: ReproduceConfig, out: Path, device, dtype, progress, micro_batches: int) -> None:
    """`reproduce`'s stages 1-3 in this process (one of ``SHARDS / micro_batches`` in a group): the main
    calibration with Fig. 4, Fig. 3's short calibrations (saved under ``fig3/``), RL across seeds; rank 0
    writes ``rl_history.csv`` and the stages' times (``train_timings.json``). Each stage resumes from its
    checkpoints."""
    from eetools.io.models import load_exit_model
    from eetools.train.calibration import CalibrationConfig
    from eetools.train.rl import run_sweep

    timings, t0 = {}, time.time()

    def lap(name: str) -> None:
        distributed.barrier()  # rank 0's files of the stage are written before any rank reads them
        timings[name] = time.time() - t0 - sum(timings.values())

    calib = dict(seed=cfg.seed, micro_batches=micro_batches)
    calibrated = run_calibrate(
        CalibrationConfig(kl_factor=cfg.calib_kl_factor, steps=cfg.calib_steps, **calib),
        out / "calibrated",
        task=cfg.calib_task,
        device=device,
        dtype=dtype,
        progress=progress,
        figure_task=cfg.task,
    )
    lap("calibration_s")
    for k in _fig3_factors(cfg):
        run_calibrate(
            CalibrationConfig(kl_factor=k, steps=cfg.fig3_steps, **calib),
            out / "fig3" / f"kl{k:g}",
            task=cfg.task,
            device=device,
            dtype=dtype,
            progress=progress,
            fig4=False,
        )
    lap("fig3_s")
    sweep = run_sweep(
        lambda: load_exit_model(calibrated, model=_base_for(calibrated, device, dtype)),
        cfg.rl_task,
        seeds=[cfg.seed + i for i in range(cfg.n_seeds)],
        steps=cfg.rl_steps,
        eval_every=0,
        temperature=cfg.rl_temperature,
        train_adapters=cfg.rl_train_adapters,
        lr=cfg.rl_lr,
        head_lr=cfg.rl_head_lr,
        progress=progress,
        checkpoint_root=out / "rl",
        micro_batches=micro_batches,
    )
    lap("rl_s")
    if distributed.is_main():
        sweep.history.to_csv(out / "rl_history.csv", index=False)
    return timings


def _stages(cfg: ReproduceConfig, out: Path, device, dtype, progress, micro_batches: int) -> None:
    """Everything of `reproduce` that needs a model, in this process (one of a group, or alone): the training
    stages (`_train_stages`), then this process's share of the evaluation jobs (`EVAL_JOBS`); rank 0 writes
    the stages' times (``stage_timings.json``)."""
    timings = _train_stages(cfg, out, device, dtype, progress, micro_batches)
    t = time.time()
    _evaluate_stage(cfg, out, device, dtype, progress)
    distributed.barrier()  # every job's files are written
    timings["eval_s"] = time.time() - t
    if distributed.is_main():
        _merge_parts(cfg, out)
        (out / "stage_timings.json").write_text(json.dumps(timings))


EVAL_JOBS = (
    # two shares of about equal time; a process makes a model's rollouts once (`rollouts_kept`), so the jobs
    # that start with the same rollouts (the calibrated model's and the base model's on the main task) share
    ("fig3", "table calibrated main", "tradeoff calibrated"),
    ("table calibrated others", "table rl main", "table rl others", "tradeoff rl", "fig2_right"),
)
"""`reproduce`'s evaluation jobs (`_evaluate_stage`), in shares: rank r of a group runs shares r, r + world, ..."""


def _evaluate_stage(cfg: ReproduceConfig, out: Path, device, dtype, progress) -> None:
    """This process's share of `EVAL_JOBS`: Fig. 3's coherence (``fig3.csv``, ``fig3.json``), the evaluation
    table's rows, each model's operating points, Fig. 2 right. The table's and operating points' rows go to
    ``parts/``, which `_merge_parts` joins."""
    from eetools.analysis.evaluation import rollouts_kept
    from eetools.io.models import load_exit_model

    rank, world = distributed.rank(), distributed.world_size()
    calibrated = out / "calibrated" / "model"
    folders = {"calibrated": calibrated, "rl": out / "rl" / f"lam1.5_beta0.25_seed{cfg.seed}" / "model"}
    folders.update({k: out / "fig3" / f"kl{k:g}" / "model" for k in _fig3_factors(cfg)})
    loaded: dict = {}

    def model(name):  # each loaded once per process, on a fresh base model
        if name not in loaded:
            loaded[name] = load_exit_model(folders[name], model=_base_for(calibrated, device, dtype))
        return loaded[name]

    progress = progress and distributed.is_main()
    tasks = {"main": [cfg.task], "others": [t for t in task_lib.NAMES if t != cfg.task]}
    (out / "parts").mkdir(exist_ok=True)
    with rollouts_kept(one_base=True):  # every model here was trained from the calibrated model's base
        for job in [job for share in EVAL_JOBS[rank::world] for job in share]:
            kind, *what = job.split()
            if kind == "fig3":
                fig3 = {k: model(k) for k in _fig3_factors(cfg)}
                _fig3(cfg, out, {cfg.calib_kl_factor: model("calibrated"), **fig3}, progress)
            elif kind == "table":
                _evaluation_rows(cfg, out, what[0], model(what[0]), tasks[what[1]], progress)
            elif kind == "tradeoff":
                _operating_points(cfg, out, what[0], model(what[0]), progress)
            else:
                _fig2_right(cfg, out, model("calibrated"), model("rl"))


def _fig3(cfg: ReproduceConfig, out: Path, models: dict, progress) -> None:
    """Fig. 3: coherence of the students calibrated (briefly) at each KL factor, beside the main calibrated model."""
    from eetools.analysis.evaluation import coherence_by_kl_factor

    fig3 = coherence_by_kl_factor(models, cfg.task, n=cfg.eval_n, seed=cfg.seed, progress=progress)
    fig3.df.to_csv(out / "fig3.csv", index=False)
    fig3.figure().write_json(out / "fig3.json")


def _evaluation_rows(cfg: ReproduceConfig, out: Path, label: str, model, tasks: list[str], progress) -> None:
    """Rows of ``evaluation.csv`` for one model on `tasks` (``parts/evaluation_<label>_<task>.csv``): the
    calibrated model with the base model, its no-exit row and the oracle bound beside it, the RL model alone."""
    from eetools.analysis.evaluation import evaluate

    for name in tasks:
        ev = evaluate(model, name, n=cfg.eval_n, seed=cfg.seed, compare=label == "calibrated", progress=progress)
        s = ev.summary.copy()
        s["system"] = s["system"].replace({"model": label})
        s.assign(task=name).to_csv(out / "parts" / f"evaluation_{label}_{name}.csv", index=False)


def _operating_points(cfg: ReproduceConfig, out: Path, label: str, model, progress) -> None:
    """Accuracy vs layers saved over exit thresholds of one model: ``tradeoff_<label>.json`` and its rows of
    ``tradeoff.csv`` (``parts/tradeoff_<label>.csv``)."""
    from eetools.analysis.operating_points import tradeoff

    tr = tradeoff(
        model,
        cfg.task,
        thresholds=cfg.thresholds,
        n=cfg.eval_n,
        seed=cfg.seed,
        confidence=cfg.confidence,
        progress=progress,
    )
    tr.figure().update_layout(
        title=f"Accuracy vs layers saved, {label} ({cfg.task}, threshold exits labelled t)"
    ).write_json(out / f"tradeoff_{label}.json")
    tr.df.assign(model=label, task=cfg.task).to_csv(out / "parts" / f"tradeoff_{label}.csv", index=False)


def _merge_parts(cfg: ReproduceConfig, out: Path) -> None:
    """``evaluation.csv`` (base, calibrated and RL on every task, the main task first) and ``tradeoff.csv``
    from the evaluation jobs' parts."""
    parts = out / "parts"
    order = [cfg.task, *[t for t in task_lib.NAMES if t != cfg.task]]
    rows = [pd.read_csv(parts / f"evaluation_{label}_{t}.csv") for t in order for label in ("calibrated", "rl")]
    table = pd.concat(rows, ignore_index=True)
    table[["task", *[c for c in table.columns if c != "task"]]].to_csv(out / "evaluation.csv", index=False)
    points = [pd.read_csv(parts / f"tradeoff_{label}.csv") for label in ("calibrated", "rl")]
    pd.concat(points, ignore_index=True).to_csv(out / "tradeoff.csv", index=False)


def _fig2_right(cfg: ReproduceConfig, out: Path, before_model, after_model) -> None:
    """Fig. 2 right: the same test prompt's tokens coloured by exit layer, before and after RL."""
    from eetools.views.tokens import color_tokens

    task = task_lib.get(cfg.task)
    prompt = task.test_split()[0].prompt
    for name, m, title in (("calibrated", before_model, "calibrated"), ("rl", after_model, "after RL")):
        r = m.generate(prompt, task.max_new_tokens, temperature=0, seed=cfg.seed)
        (out / f"fig2_right_{name}.html").write_text(str(color_tokens(r, title=title)))


def write_report(out: Path) -> Path:
    """Assemble ``report.html`` from the files `reproduce` wrote into `out`."""
    import plotly.io as pio

    from eetools.views.report import build_report

    out = Path(out)
    need = ["evaluation.csv", "fig2_left.json", "fig3.json", "calibrated/fig4.json"]
    missing = [n for n in need if not (out / n).exists()]
    if missing:
        raise FileNotFoundError(f"{out} lacks {', '.join(missing)}; run `eetools reproduce --out {out}` first")

    class _Html:
        def __init__(self, text):
            self.text = text

        def _repr_html_(self):
            return self.text

    # completion length stays in evaluation.csv; the report's table keeps to what fits a narrow window
    table = pd.read_csv(out / "evaluation.csv").drop(columns=["length"], errors="ignore")
    sections = [
        ("Results: base, calibrated and RL-trained models, per task", table),
        ("Fig. 2 (left): RL dynamics", pio.read_json(out / "fig2_left.json")),
        (
            "Fig. 2 (right): tokens coloured by exit layer, calibrated",
            _Html((out / "fig2_right_calibrated.html").read_text()),
        ),
        ("Fig. 2 (right): tokens coloured by exit layer, after RL", _Html((out / "fig2_right_rl.html").read_text())),
        ("Fig. 3: coherence by KL factor", pio.read_json(out / "fig3.json")),
        ("Fig. 4: learned vs target exit distribution", pio.read_json(out / "calibrated" / "fig4.json")),
    ]
    for label in ("calibrated", "rl"):  # absent from output folders of earlier versions
        if (out / f"tradeoff_{label}.json").exists():
            sections.append(
                (f"Operating points: accuracy vs layers saved, {label}", pio.read_json(out / f"tradeoff_{label}.json"))
            )
    summ = out / "summary.json"
    summary = json.loads(summ.read_text()) if summ.exists() else {}
    if summary.get("timings"):
        sections.append(("Run time", run_time_table(summary["timings"])))
    title, banner = "eetools: reproduction of Pavlova et al. (2026)", None
    if summary.get("config", {}).get("quick"):
        title, banner = quick_banner(summary["config"])
    return build_report(sections, out / "report.html", title=title, banner=banner, labels=TABLE_LABELS)


# table headers of the report, by column of evaluation.csv and the run-time table
TABLE_LABELS = {
    "n": "examples",
    "mean_score": "mean score",
    "compute": "compute (blocks used / L)",
    "layers_saved": "layers saved",
    "coherence_reasoning": "coherence of the reasoning",
}


def run_time_table(timings: dict) -> pd.DataFrame:
    """``summary.json``'s timings (``{"calibration_s": 725.3, ...}``) as stage / duration rows ("12 min 5 s")."""
    from eetools.views.report import format_duration

    return pd.DataFrame(
        {
            "stage": [k.removesuffix("_s").replace("_", " ") for k in timings],
            "duration": [format_duration(v) for v in timings.values()],
        }
    )


def quick_banner(config: dict) -> tuple[str, tuple[str, str]]:
    """Title and banner of a ``--quick`` run's report: a smoke test of the pipeline, not a reproduction."""
    return (
        "eetools: quick smoke run of the reproduction (not results)",
        (
            "Quick run (--quick): these numbers are not a reproduction of Pavlova et al.",
            f"It calibrated for {config.get('calib_steps')} steps, ran {config.get('n_seeds')} RL runs of "
            f"{config.get('rl_steps')} steps and evaluated {config.get('eval_n')} examples per task, to check "
            "that every stage runs. Run `eetools reproduce` without --quick for the paper's figures.",
        ),
    )


# what `ship` copies from a reproduction's output folder into data/results
SHIPPED_RESULTS = (
    "evaluation.csv",
    "rl_history.csv",
    "fig3.csv",
    "calibrated/fig4.csv",
    "calibrated/calibration_history.csv",
    "summary.json",
)
OPTIONAL_RESULTS = ("tradeoff.csv",)  # absent from output folders of earlier versions


def ship(out: Path, data: Path | None = None) -> list[Path]:
    """Copy a reproduction's calibrated and RL (first seed) exit models and its results into ``data/``.

    These are what the presets "tiny-reasoner/calibrated" and "tiny-reasoner/rl" and the notebooks load.
    Every source is checked first (present, and the models' weights whole); then everything is
    staged beside ``data/`` and moved into place, so a failure changes nothing there.
    """
    from eetools.io.paths import data_dir

    out, data = Path(out), Path(data) if data else data_dir()
    return _replace_all(data, _ship_sources(out))


def _ship_sources(out: Path) -> dict[str, Path]:
    """What `ship` copies, as {path under data/: source}, once every source is checked to be there and whole."""
    from eetools.io.checkpoints import load_json
    from eetools.io.exit_checkpoint import verify_files

    hint = f"run `eetools reproduce --out {out}` to the end first (nothing in data/ was changed)"
    if not (out / "summary.json").is_file():
        raise FileNotFoundError(f"cannot ship {out}: it has no summary.json; {hint}")
    config = load_json(out / "summary.json").get("config", {})
    if "other_tasks" in config:
        raise ValueError(f"{out} is a real-model run: ship it with eetools.real_pipeline.ship (`eetools ship` does)")
    seed = config.get("seed", 0)
    models = {
        "models/tiny-reasoner-calibrated": out / "calibrated" / "model",
        "models/tiny-reasoner-rl": out / "rl" / f"lam1.5_beta0.25_seed{seed}" / "model",
    }
    missing = [str(m) for m in models.values() if not (m / "exit_config.json").is_file()]
    missing += [str(out / n) for n in SHIPPED_RESULTS if not (out / n).is_file()]
    if missing:
        raise FileNotFoundError(f"cannot ship {out}: it lacks {', '.join(missing)}; {hint}")
    for m in models.values():
        verify_files(m)
    names = SHIPPED_RESULTS + tuple(n for n in OPTIONAL_RESULTS if (out / n).is_file())
    return {**models, **{f"results/{Path(n).name}": out / n for n in names}}


def _recover_interrupted_ships(data: Path) -> None:
    """Undo what a killed `ship` left in `data`: put back each previous version it had moved out whose target is
    missing (the kill came between the two moves), then remove its staging folder (full copies of the models).

    Staging folders of a ship still running (its process alive) are left alone."""
    import os
    import shutil

    from eetools.io.checkpoints import _pid_alive

    for stage in data.glob(".ship-*"):
        pid = stage.name.split("-")[1] if stage.name.count("-") >= 2 else ""
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue
        try:
            targets = json.loads((stage / "targets.json").read_text())
        except (OSError, ValueError):
            targets = []
        for rel in targets:
            old, dst = stage / "old" / rel, data / rel
            if old.exists() and not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(old, dst)
        shutil.rmtree(stage, ignore_errors=True)


def _replace_all(data: Path, sources: dict[str, Path]) -> list[Path]:
    """Copy every source into a staging folder in `data`, then move each over its target; on a failure the
    targets already replaced are put back, so `data` is as it was."""
    import os
    import shutil
    import tempfile

    data.mkdir(parents=True, exist_ok=True)
    _recover_interrupted_ships(data)
    stage = Path(tempfile.mkdtemp(prefix=f".ship-{os.getpid()}-", dir=data))
    moved: list[tuple[Path, Path | None]] = []  # (target, where its previous version waits)
    try:
        (stage / "targets.json").write_text(json.dumps(list(sources)))  # what a recovery may put back
        for rel, src in sources.items():
            (stage / "new" / rel).parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, stage / "new" / rel)
        for rel in sources:
            dst, backup = data / rel, None
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.exists():
                backup = stage / "old" / rel
                backup.parent.mkdir(parents=True, exist_ok=True)
                os.replace(dst, backup)
            moved.append((dst, backup))
            os.replace(stage / "new" / rel, dst)
    except BaseException:
        for dst, backup in reversed(moved):
            if dst.is_dir():
                shutil.rmtree(dst)
            elif dst.exists():
                dst.unlink()
            if backup is not None:
                os.replace(backup, dst)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return [data / rel for rel in sources]

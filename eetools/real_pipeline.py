"""The paper's pipeline on a real language model: ``eetools reproduce --model smollm2-135m``.

The same stages as `eetools.pipeline.reproduce` (calibration and Fig. 4, Fig. 3's KL sweep, RL over seeds
for Fig. 2 left, evaluation, Fig. 2 right), with what a real chat model needs instead of the tiny
reasoner's choices: self-distillation on the model's own greedy answers (a reasoning-gym task has no
written reasoning), activation checkpointing, a coherence judge for free text (the base model's
likelihood, `ReferenceLikelihoodJudge`), and a lambda = 0 control beside every RL run, so that what the
exit reward does is measured against RL without it at the same steps.

Every stage writes its outputs into its own folder under ``out`` and is skipped when they are there; the
training inside a stage resumes from its checkpoints. Run it again after an interruption to go on.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import pandas as pd

from eetools import tasks as task_lib
from eetools.core.options import validate_config
from eetools.io.checkpoints import atomic_write
from eetools.io.paths import check_writable


@dataclass
class RealReproduceConfig:
    """Settings of ``eetools reproduce --model NAME`` for a real (hub, folder or GGUF-preset) model."""

    LIMITS: ClassVar[dict] = {
        "calib_kl_factor": "> 0",
        "kl_factors": "> 0",
        "calib_steps": ">= 0",
        "fig3_steps": ">= 0",
        "batch_size": ">= 1",
        "max_new_tokens": ">= 1",
        "n_seeds": ">= 1",
        "lams": ">= 0",
        "rl_steps": ">= 0",
        "rl_k": ">= 2",
        "rl_prompts": ">= 1",
        "calib_lr": "> 0",
        "calib_adapter_lr": ">= 0",
        "rl_lr": "> 0",
        "rl_head_lr": ">= 0",
        "eval_n": ">= 1",
    }
    model: str = "smollm2-135m"
    """The base model: a preset, an HF folder, a .gguf file or a hub name."""
    task: str = "gym:basic_arithmetic/add1"
    """The RL task (its rewards) and the first calibration and evaluation task."""
    other_tasks: list[str] = field(default_factory=lambda: ["gym:gcd/2x20"])
    """Further tasks whose prompts calibration also uses and on which the calibrated model is evaluated."""
    quick: bool = False
    """A smoke version (a few steps of each stage, 2 seeds, 16 examples): minutes on 2 cores."""
    seed: int = 0
    exit_layers: list[int] = field(default_factory=lambda: [16, 18, 20, 22, 24, 26, 28])
    """Exitable layers (every 2nd block of the upper half of SmolLM2's 30, where its logit lens starts to agree)."""
    head: str = "linear"
    """Exit head kind; "linear" keeps a shipped exit model small (an MLP head of d_model 576 is 2.7 MB)."""
    calib_kl_factor: float = 64.0
    kl_factors: list[float] = field(default_factory=lambda: [4.0, 16.0])
    """Other KL factors for Fig. 3 (short calibrations; the main one is added)."""
    calib_steps: int = 50
    calib_lr: float = 3e-3
    """Calibration's learning rate of the exit heads."""
    calib_adapter_lr: float = 3e-5
    """Calibration's learning rate of the LoRA adapters: small, so the model's own text stays as it was."""
    fig3_steps: int = 10
    batch_size: int = 4
    max_new_tokens: int = 32
    """Length cap of the model's greedy answers (calibration) and of RL rollouts."""
    n_seeds: int = 3
    lams: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.5])
    """RL exit-reward weights; the smallest (0) is the control (the same RL without the reward for exiting)."""
    ship_lam: float | None = 0.5
    """The lambda of the shipped RL model and of the headline contrast (None: the largest of `lams`). 0.5:
    on SmolLM2 it kept accuracy at the control's (1.5 saved more layers and lost 1.7 points over 3 seeds)."""
    rl_steps: int = 12
    rl_k: int = 4
    rl_prompts: int = 2
    rl_lr: float = 1e-4
    """RL's learning rate of the LoRA adapters."""
    rl_head_lr: float = 1e-3
    """RL's learning rate of the exit heads."""
    eval_n: int = 200

    def calibration_options(self) -> dict:
        """The `calibrate` options every calibration of this pipeline shares (`benchmarks/bench_real.py` times a
        step with them): batch, the model's own greedy answers, activation checkpointing, the two rates."""
        return dict(
            batch_size=self.batch_size,
            continuations="greedy",
            max_new_tokens=self.max_new_tokens,
            activation_checkpointing=True,
            lr=self.calib_lr,
            adapter_lr=self.calib_adapter_lr,
        )


def _quick(cfg: RealReproduceConfig) -> RealReproduceConfig:
    if not cfg.quick:
        return cfg
    return RealReproduceConfig(
        **{
            **asdict(cfg),
            "calib_steps": 3,
            "fig3_steps": 1,
            "kl_factors": [16.0],
            "n_seeds": 2,
            "rl_steps": 2,
            "eval_n": 16,
            "max_new_tokens": min(cfg.max_new_tokens, 32),
        }
    )


def _done(folder: Path, *names: str) -> bool:
    return all((folder / n).exists() for n in names)


def reproduce_real(cfg: RealReproduceConfig, out: Path, *, device="cpu", dtype=None, progress=True) -> Path:
    """Every stage of the paper's pipeline on `cfg.model`; returns ``out/summary.json``."""
    from eetools.analysis.evaluation import coherence_by_kl_factor, evaluate
    from eetools.analysis.judges import ReferenceLikelihoodJudge
    from eetools.io.models import load_exit_model, load_model
    from eetools.pipeline import _fresh_ee, run_calibrate
    from eetools.train.calibration import CalibrationConfig, calibrate
    from eetools.train.rl import run_sweep
    from eetools.views.figures import rl_dynamics_figure
    from eetools.views.tokens import color_tokens

    validate_config(cfg)
    for name in [cfg.task, *cfg.other_tasks]:
        task_lib.get(name)  # an unknown task fails before the model loads
    if len(set(cfg.lams)) != len(cfg.lams) or len(cfg.lams) < 2:
        raise ValueError(
            f"lams {cfg.lams}: RL needs the control (the smallest, usually 0) and at least one other lambda, each "
            f"once; e.g. --lams 0 1.5"
        )
    if cfg.ship_lam is not None and cfg.ship_lam not in cfg.lams:
        raise ValueError(f"ship_lam {cfg.ship_lam:g} is not one of lams {cfg.lams}: add it to --lams or leave it out")
    calib_task = "+".join(dict.fromkeys([cfg.task, *cfg.other_tasks]))
    cfg = _quick(cfg)
    out = check_writable(out)
    out.mkdir(parents=True, exist_ok=True)
    timings, t0 = {}, time.time()
    fresh = lambda: load_model(cfg.model, device=device, dtype=dtype)  # noqa: E731  (a fresh base per exit model)

    def lap(name: str) -> None:
        timings[name] = time.time() - t0 - sum(timings.values())

    calib = dict(cfg.calibration_options(), seed=cfg.seed, checkpoint_every=10)
    # 1. the main calibration on the model's own greedy answers, and Fig. 4
    cal_dir = out / "calibrated"
    if not _done(cal_dir, "model/exit_config.json", "fig4_tv.txt"):
        run_calibrate(
            CalibrationConfig(kl_factor=cfg.calib_kl_factor, steps=cfg.calib_steps, **calib),
            cal_dir,
            model=cfg.model,
            task=calib_task,
            layers=cfg.exit_layers,
            head=cfg.head,
            device=device,
            dtype=dtype,
            progress=progress,
        )
    calibrated = lambda: load_exit_model(cal_dir / "model", model=fresh())  # noqa: E731
    lap("calibration_s")
    # 2. Fig. 3: coherence (the base model's likelihood of the text, normalised to its own) per KL factor
    judge_prompts = [e.prompt for e in task_lib.get(calib_task).sample(8, seed="judge")]
    if not _done(out, "fig3.csv", "fig3.json"):
        models = {cfg.calib_kl_factor: calibrated()}
        for k in cfg.kl_factors:
            if k == cfg.calib_kl_factor:
                continue
            models[k] = m = _fresh_ee(cfg.model, cfg.exit_layers, cfg.head, device, dtype, seed=cfg.seed)
            calibrate(
                m,
                calib_task,
                kl_factor=k,
                steps=cfg.fig3_steps,
                checkpoint_dir=out / "fig3" / f"k{k:g}",
                progress=progress,
                **calib,
            )
        judge = ReferenceLikelihoodJudge(models[cfg.calib_kl_factor]).fit(judge_prompts, cfg.max_new_tokens)
        fig3 = coherence_by_kl_factor(models, calib_task, n=min(cfg.eval_n, 64), seed=cfg.seed, judge=judge)
        atomic_write(out / "fig3.json", fig3.figure().write_json)
        atomic_write(out / "fig3.csv", lambda p: fig3.df.to_csv(p, index=False))
    lap("fig3_s")
    # 3. RL over seeds, with the exit reward (lam > 0) and without it (lam = 0, the control)
    seeds = [cfg.seed + i for i in range(cfg.n_seeds)]
    if not _done(out, "rl_history.csv"):
        sweep = run_sweep(
            calibrated,
            cfg.task,
            seeds=seeds,
            lams=tuple(cfg.lams),
            steps=cfg.rl_steps,
            k=cfg.rl_k,
            prompts_per_step=cfg.rl_prompts,
            max_new_tokens=cfg.max_new_tokens,
            temperature=0.0,
            lr=cfg.rl_lr,
            head_lr=cfg.rl_head_lr,
            eval_every=0,
            progress=progress,
            checkpoint_root=out / "rl",
        )
        atomic_write(out / "rl_history.csv", lambda p: sweep.history.to_csv(p, index=False))
    history = pd.read_csv(out / "rl_history.csv")
    for lam, g in history.groupby("lam"):
        fig = rl_dynamics_figure(g, metrics=("accuracy", "compute", "length"))
        fig.update_layout(title=f"RL on {cfg.task}, lambda = {lam:g} ({g['run'].nunique()} seeds)")
        fig.write_json(out / f"fig2_left_lam{lam:g}.json")
    lap("rl_s")
    # 4. evaluation on held-out examples: base, calibrated, oracle bound, and RL with and without the exit reward
    rl_dir = lambda lam, s=cfg.seed: out / "rl" / f"lam{lam}_beta0.25_seed{s}" / "model"  # noqa: E731
    if not _done(out, "evaluation.csv", "per_example.csv"):
        parts, per = [], []
        for name in dict.fromkeys([cfg.task, *cfg.other_tasks]):  # base, calibrated and the oracle bound
            ev = evaluate(calibrated(), name, n=cfg.eval_n, seed=cfg.seed, progress=progress)
            parts.append(ev.summary.assign(system=ev.summary.system.replace({"model": "calibrated"}), task=name))
            per.append(ev.per_example.assign(system=ev.per_example.system.replace({"model": "calibrated"}), task=name))
        for lam in cfg.lams:  # every seed's RL model, on the same examples with the same exit-sampling seed
            for s in seeds:
                e = evaluate(
                    load_exit_model(rl_dir(lam, s), model=fresh()),
                    cfg.task,
                    n=cfg.eval_n,
                    seed=cfg.seed,
                    compare=False,
                    progress=progress,
                )
                parts.append(e.summary.assign(system=f"rl_lam{lam:g}", task=cfg.task, seed=s))
                per.append(e.per_example.assign(system=f"rl_lam{lam:g}", task=cfg.task, seed=s))
        atomic_write(out / "per_example.csv", lambda p: pd.concat(per, ignore_index=True).to_csv(p, index=False))
        atomic_write(out / "evaluation.csv", lambda p: pd.concat(parts, ignore_index=True).to_csv(p, index=False))
    # 5. Fig. 2 right: one held-out prompt's tokens coloured by exit layer, calibrated and after RL
    task = task_lib.get(cfg.task)
    prompt = task.test_split()[0].prompt
    for name, path in (("calibrated", cal_dir / "model"), ("rl", rl_dir(_ship_lam(asdict(cfg))))):
        r = load_exit_model(path, model=fresh()).generate(prompt, cfg.max_new_tokens, temperature=0, seed=cfg.seed)
        html = str(color_tokens(r, title=name))
        atomic_write(out / f"fig2_right_{name}.html", lambda p, html=html: Path(p).write_text(html))
    lap("eval_s")
    timings["total_s"] = time.time() - t0
    per_example = pd.read_csv(out / "per_example.csv")
    summary = {
        "config": asdict(cfg),
        "timings": timings,
        "fig4_tv": float((cal_dir / "fig4_tv.txt").read_text()),
        "evaluation": pd.read_csv(out / "evaluation.csv").to_dict(orient="records"),
        "rl_vs_control": rl_contrast(per_example, [min(cfg.lams), _ship_lam(asdict(cfg))], seed=cfg.seed),
        "rl_vs_control_by_lam": {
            f"lam{lam:g}": {
                f"seed{cfg.seed}": rl_contrast(per_example, [min(cfg.lams), lam], seed=cfg.seed),
                "mean_of_seeds": rl_contrast(per_example, [min(cfg.lams), lam]),
            }
            for lam in cfg.lams
            if lam != min(cfg.lams)
        },
    }
    atomic_write(out / "summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2)))
    return out / "summary.json"


def rl_contrast(per_example: pd.DataFrame, lams, seed: int | None = None) -> dict:
    """RL with the largest lambda minus the smallest (the control) on the same held-out examples (paired):
    layers saved, accuracy and completion length, each a mean difference with a 95 % interval.

    `seed`: the RL runs of that seed only (the shipped model against its own control); None: each
    example's value averaged over every seed first, so the interval is over examples of the method's
    mean effect, not one run's luck.
    """
    if seed is not None and "seed" in per_example.columns:
        per_example = per_example[per_example.seed.isna() | (per_example.seed == seed)]

    def rows(lam: float) -> pd.DataFrame:
        g = per_example[per_example.system == f"rl_lam{lam:g}"]
        return g.groupby("example")[[c for c in ("compute", "correct", "length") if c in g.columns]].mean()

    a, b = rows(max(lams)), rows(min(lams))
    both = a.index.intersection(b.index)
    out = {}
    for col, name in (("compute", "layers_saved"), ("correct", "accuracy"), ("length", "length")):
        if col not in a.columns:
            continue
        d = a.loc[both, col].astype(float) - b.loc[both, col].astype(float)
        if col == "compute":
            d = -d  # layers saved = 1 - compute
        se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
        out[name] = {"diff": float(d.mean()), "ci95": [float(d.mean() - 1.96 * se), float(d.mean() + 1.96 * se)]}
    out["n"] = len(both)
    return out


SHIPPED = (
    "summary.json",
    "evaluation.csv",
    "per_example.csv",
    "rl_history.csv",
    "fig3.csv",
    "fig3.json",
    "calibrated/fig4.csv",
    "calibrated/fig4.json",
    "calibrated/fig4_tv.txt",
    "calibrated/calibration_history.csv",
    "fig2_right_calibrated.html",
    "fig2_right_rl.html",
)
"""What `eetools ship` copies from a real-model run into ``data/results/<model>/`` (and each lambda's Fig. 2 left)."""


def _ship_lam(config: dict) -> float:
    lam = config.get("ship_lam")
    return max(config["lams"]) if lam is None else float(lam)


def ship_sources(out: Path, config: dict, hint: str) -> dict[str, Path]:
    """What `eetools.pipeline.ship` copies from a real-model run: the calibrated model and the seed-0 RL model
    with `ship_lam` (default the largest lambda) as ``models/<model>-calibrated`` and ``models/<model>-rl`` (each with a
    ``recipe.json``: the settings and the command that made it), and the results as ``results/<model>/``."""
    from eetools.io.exit_checkpoint import verify_files

    name, lam = Path(config["model"]).name, _ship_lam(config)
    models = {
        f"models/{name}-calibrated": out / "calibrated" / "model",
        f"models/{name}-rl": out / "rl" / f"lam{lam}_beta0.25_seed{config['seed']}" / "model",
    }
    results = list(SHIPPED) + [f"fig2_left_lam{x:g}.json" for x in config["lams"]]
    missing = [str(m) for m in models.values() if not (m / "exit_config.json").is_file()]
    missing += [str(out / n) for n in results if not (out / n).is_file()]
    if missing:
        raise FileNotFoundError(f"cannot ship {out}: it lacks {', '.join(missing)}; {hint}")
    for m in models.values():
        verify_files(m)
    stage = out / "ship"
    sources: dict[str, Path] = {}
    for rel, src in models.items():
        # a copy of the model with its recipe beside it (the run's own folder is left as it was)
        dst = stage / Path(rel).name
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
        what = (
            "calibration"
            if rel.endswith("calibrated")
            else f"calibration, then RL with lambda = {lam:g}, seed {config['seed']}"
        )
        recipe = {"made_by": f"eetools reproduce --model {config['model']}", "what": what, "config": config}
        (dst / "recipe.json").write_text(json.dumps(recipe, indent=2))
        sources[rel] = dst
    return {**sources, **{f"results/{name}/{Path(n).name}": out / n for n in results}}


def ship(out: Path, data: Path | None = None) -> list[Path]:
    """`eetools.pipeline.ship` for a real-model run: its models (with recipes) and results into ``data/``."""
    from eetools.io.checkpoints import load_json
    from eetools.io.paths import data_dir
    from eetools.pipeline import _replace_all

    out, data = Path(out), Path(data) if data else data_dir()
    hint = f"run `eetools reproduce --model NAME --out {out}` to the end first (nothing in data/ was changed)"
    if not (out / "summary.json").is_file():
        raise FileNotFoundError(f"cannot ship {out}: it has no summary.json; {hint}")
    return _replace_all(data, ship_sources(out, load_json(out / "summary.json")["config"], hint))

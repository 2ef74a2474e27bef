"""Logit lens vs tuned readout, side by side on the same held-out tokens: KL, top-1 agreement, oracle bound.

Tunes a `TunedLens` (`eetools.train.tune_readout`: KL from the final distribution, the model frozen)
on one model's text and measures both readouts on held-out text the lens never saw, with the
base model (adapters off) at full depth: per exitable layer the mean ``KL(final || readout)`` and
the top-1 agreement with the final argmax (`depth_necessity`), and the oracle-exit bound
(`oracle_exits(..., base=True)`: per token the earliest exitable layer whose readout's argmax is
the final one). Writes ``<out>/results.json``, ``<out>/per_layer.csv``, the tuned readout
(``<out>/readout``, `save_readout`) and its training history.

    # SmolLM2-135M-Instruct on its own greedy chat answers (scripts/smollm2_answers.py writes them)
    python scripts/smollm2_answers.py --out runs/smollm2-answers --heldout-per-dataset 8
    python scripts/tuned_readout_bound.py smollm2 --answers runs/smollm2-answers --out runs/tuned-readout/smollm2

    # equal accuracy on SmolLM2: the shipped calibrated exits on add1 at thresholds, read out through the
    # logit lens and through a lens tuned on the exit model (its exit layers, the same answers)
    python scripts/tuned_readout_bound.py smollm2 --answers runs/smollm2-answers --out runs/tuned-readout/smollm2-eq \\
        --no-bound --steps 90 --batch-size 4 --lr 3e-3 --tradeoff 0.5 0.1 0.03 0.01 0.003 0.001

    # the tiny reasoner: tuned on addition's training examples, measured on the base model's greedy
    # answers to the test split (the text the 65.8 % oracle bound of docs/experiments.md is measured on)
    python scripts/tuned_readout_bound.py tiny --out runs/tuned-readout/tiny
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

import eetools as ee
from eetools.analysis.probes.oracle import depth_necessity, oracle_exits
from eetools.core.lenses import LogitLens
from eetools.io.exit_checkpoint import save_readout
from eetools.train import tune_readout

SMOLLM2_SETS = {"every 4th (4..28)": list(range(4, 29, 4)), "shipped (16..28 step 2)": list(range(16, 29, 2))}
TINY_SETS = {"every layer (1..7)": list(range(1, 8))}


def read_answers(path: Path) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["prompt"], r["answer"]) for r in rows if r["answer"]]


def measure(model, exit_sets: dict, readouts: dict, heldout, batch_size: int, chunk: int = 16):
    """Per exit set and readout: the per-layer table and the oracle bound on `heldout`.

    `depth_necessity` and `oracle_exits` keep every token's vocabulary-sized readouts at every
    exitable layer, so the held-out sequences go through them `chunk` at a time (a few GB at most
    on SmolLM2) and the per-layer means are weighted by each chunk's tokens.
    """
    per_layer, bounds = [], []
    for set_name, layers in exit_sets.items():
        em = ee.attach_exit_heads(model, layers=layers, head="linear", seed=0)  # heads unused: oracle and depth only
        for name, r in readouts.items():
            depth, oracle = [], []
            for c in range(0, len(heldout), chunk):
                part = heldout[c : c + chunk]
                depth.append(depth_necessity(em, part, base=True, batch_size=batch_size, readout=r).df)
                o = oracle_exits(em, part, base=True, batch_size=batch_size, readout=r).df
                o["seq"] += c
                oracle.append(o)
            d = pd.concat(depth)
            w = d["n_tokens"]
            d = (
                d[["agreement", "nll", "kl"]]
                .mul(w, axis=0)
                .groupby(d["layer"])
                .sum()
                .div(w.groupby(d["layer"]).sum(), axis=0)
                .reset_index()
            )
            d["n_tokens"] = int(w.sum()) // len(layers)
            d.insert(0, "readout", name)
            d.insert(0, "exit_set", set_name)
            per_layer.append(d)
            o = pd.concat(oracle, ignore_index=True)
            saved = 1 - o["oracle_layer"] / em.n_layers
            bounds.append(
                {
                    "exit_set": set_name,
                    "exit_layers": layers,
                    "readout": name,
                    "layers_saved_per_token": float(saved.mean()),
                    "layers_saved_per_sequence": float(saved.groupby(o["seq"]).mean().mean()),
                    "n_tokens": len(o),
                    "n_sequences": int(o["seq"].nunique()),
                }
            )
            print(bounds[-1], flush=True)
    return pd.concat(per_layer, ignore_index=True), bounds


def tiny_heldout(n: int, batch_size: int):
    """The base tiny reasoner, addition, and its greedy answers to the first `n` test prompts (cut as `evaluate` cuts them)."""
    from eetools.core.rule import ExitRule

    model = ee.load_model()  # the base model: no adapters
    em = ee.attach_exit_heads(model, layers=TINY_SETS["every layer (1..7)"], seed=0)
    task = ee.tasks.get("addition", tokenizer=em)
    exs = task.test_split()[:n]
    texts = []
    with torch.no_grad():
        for i in range(0, len(exs), batch_size):
            prompts = [e.prompt for e in exs[i : i + batch_size]]
            texts += list(em.generate(prompts, task.max_new_tokens, rule=ExitRule(mode="off"), temperature=0.0).text)
    return model, task, [(e.prompt, task.cut(e, t)) for e, t in zip(exs, texts)]


def readout_tradeoff(
    train,
    steps: int,
    bs: int,
    lr: float,
    thresholds,
    n: int,
    out: Path,
    recal: int = 0,
    kl_factor: float = 64.0,
    start: str = "tiny-reasoner/rl-lam6",
    rl_steps: int = 0,
    arms: tuple = ("logit", "tuned"),
    retune: bool = False,
    task: str = "addition",
    rules: dict | None = None,
) -> list[dict]:
    """`start` (default `tiny-reasoner/rl-lam6`) on `task` with `rules` (default rl-lam6's (patience 1, lens floor 0.9,
    thresholded exits) read out through the logit lens and through a lens tuned on it (adapters on, as it
    decodes): accuracy and layers saved per threshold on addition's test split. With `recal` > 0 each
    arm's heads are first calibrated `recal` more steps (k = `kl_factor`) against its own readout
    (calibration's targets read through the exit readout), so the tuned arm's heads learn where the tuned
    readout already agrees. With `rl_steps` > 0 each arm is then trained by RL with rl-lam6's recipe
    (addition+tom, greedy rollouts, lambda 6, adapters at 2.5e-4, heads at 1e-3, seed 0) against its own
    readout: from `tiny-reasoner/calibrated` with 60 steps, the logit arm is rl-lam6's own run. `retune`: the
    tuned arm's lens is tuned again (the same steps) on the model RL left, whose adapters have moved.

    On SmolLM2 (`start` ``smollm2-135m/calibrated``, `task` its preset's ``gym:basic_arithmetic/add1``, `rules`
    ``{}``: plain thresholds) the tuned arm's lens is tuned on the exit model (adapters on) at its exit layers,
    on `train` (the model's own chat answers), and both arms use the same heads: only the exited tokens'
    readout differs."""
    rules = dict(patience=1, min_confidence=0.9) if rules is None else rules
    from eetools.train.calibration import calibrate
    from eetools.train.rl import train_rl

    rows = []
    for name in arms:
        em = ee.load_exit_model(start)
        if name == "tuned":
            tune_readout(
                em, train, steps=steps, batch_size=bs, lr=lr, checkpoint_dir=out / f"checkpoint-{start.split('/')[-1]}"
            )
        if recal:
            calibrate(em, "addition", kl_factor=kl_factor, steps=recal, seed=0, progress=False)
            name = f"{name}+cal{recal}"
        if rl_steps:
            train_rl(
                em,
                "addition+tom",
                steps=rl_steps,
                temperature=0.0,
                lam=6.0,
                lr=2.5e-4,
                head_lr=1e-3,
                eval_every=0,
                seed=0,
                progress=False,
                checkpoint_dir=out / f"rl-{name}",
            )
            name = f"{name}+rl{rl_steps}"
            if retune and name.startswith("tuned"):
                tune_readout(em, train, steps=steps, batch_size=bs, lr=lr, checkpoint_dir=out / f"checkpoint-{name}")
                name = f"{name}+retuned"
        t = ee.tradeoff(em, task, thresholds=thresholds, n=n, sample=False, progress=False, **rules)
        for r in t.df.to_dict("records"):
            rows.append({"readout": name, **r})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", choices=["smollm2", "tiny"])
    ap.add_argument("--answers", type=Path, default=Path("runs/smollm2-answers"), help="smollm2: train/heldout.jsonl")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=None, help="default: smollm2 300, tiny 300")
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: smollm2 4, tiny 16)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--positions", default="all", choices=["all", "continuation"])
    ap.add_argument("--n-train", type=int, default=2000, help="tiny: training examples drawn from the task")
    ap.add_argument("--n-heldout", type=int, default=500, help="tiny: test prompts (the shipped evaluation's 500)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--tradeoff",
        type=float,
        nargs="*",
        default=None,
        help="also accuracy / layers saved at these thresholds, logit lens vs a lens tuned on --start (tiny: "
        "rl-lam6 by default, with its rules; smollm2: smollm2-135m/calibrated, plain thresholds)",
    )
    ap.add_argument(
        "--recalibrate", type=int, default=0, help="tiny --tradeoff: calibrate each arm's heads this many steps"
    )
    ap.add_argument("--kl-factor", type=float, default=64.0, help="KL factor of --recalibrate")
    ap.add_argument(
        "--start", default=None, help="--tradeoff: the exit model both arms start from (default: see --tradeoff)"
    )
    ap.add_argument(
        "--task", default="gym:basic_arithmetic/add1", help="smollm2 --tradeoff: the task (the preset's first)"
    )
    ap.add_argument("--n", type=int, default=200, help="smollm2 --tradeoff: test examples (the preset's eval_n)")
    ap.add_argument(
        "--no-bound", action="store_true", help="--tradeoff only: skip the base model's lens and the bound table"
    )
    ap.add_argument("--arms", nargs="+", default=["logit", "tuned"], choices=["logit", "tuned"])
    ap.add_argument("--retune", action="store_true", help="tiny --tradeoff --rl: tune the lens again after RL")
    ap.add_argument(
        "--rl", type=int, default=0, help="tiny --tradeoff: RL steps per arm (rl-lam6's recipe), after --recalibrate"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    if args.which == "smollm2":
        train = read_answers(args.answers / "train.jsonl")
        model, exit_sets, steps, bs = None, SMOLLM2_SETS, args.steps or 300, args.batch_size or 4
        if not args.no_bound:
            model = ee.load_model("smollm2-135m")
            heldout = read_answers(args.answers / "heldout.jsonl")
    else:
        model, task, heldout = tiny_heldout(args.n_heldout, 50)
        exit_sets = TINY_SETS
        train = [(e.prompt, e.reasoning) for e in task.sample(args.n_train, seed=1)]
        steps, bs = args.steps or 300, args.batch_size or 16
    t_data = time.time() - t0
    summary = {"model": args.which, "seconds": {"data": round(t_data, 1)}}
    if not args.no_bound:
        bound = bound_table(args, model, exit_sets, train, heldout, steps, bs)
        summary["seconds"].update(bound.pop("seconds"))
        summary.update(bound)
    if args.tradeoff:
        t3 = time.time()
        tiny = args.which == "tiny"
        summary["tradeoff"] = readout_tradeoff(
            train,
            steps,
            bs,
            args.lr,
            args.tradeoff,
            args.n_heldout if tiny else args.n,
            args.out,
            recal=args.recalibrate,
            kl_factor=args.kl_factor,
            start=args.start or ("tiny-reasoner/rl-lam6" if tiny else "smollm2-135m/calibrated"),
            rl_steps=args.rl,
            arms=tuple(args.arms),
            retune=args.retune,
            task="addition" if tiny else args.task,
            rules=None if tiny else {},
        )
        summary["seconds"]["tradeoff"] = round(time.time() - t3, 1)
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


def bound_table(args, model, exit_sets, train, heldout, steps: int, bs: int) -> dict:
    """A lens tuned on the base model at every layer of `exit_sets`, then both readouts measured on `heldout`:
    ``per_layer.csv`` and the summary's training record and oracle bounds."""
    layers = sorted({l for s in exit_sets.values() for l in s})
    t1 = time.time()
    res = tune_readout(
        model,
        train,
        layers=layers,
        steps=steps,
        batch_size=bs,
        lr=args.lr,
        positions=args.positions,
        checkpoint_dir=args.out / "checkpoint",
        start=args.which,
    )
    t_train = time.time() - t1
    save_readout(model, res.readout, args.out / "readout", tuning={"steps": steps, "batch_size": bs, "lr": args.lr})
    res.history.to_csv(args.out / "tune_history.csv", index=False)

    t2 = time.time()
    per_layer, bounds = measure(model, exit_sets, {"logit": LogitLens(), "tuned": res.readout}, heldout, 8)
    t_eval = time.time() - t2
    per_layer.to_csv(args.out / "per_layer.csv", index=False)
    print(per_layer.to_string())
    return {
        "tuned_layers": layers,
        "train": {
            "sequences": len(train),
            "steps": steps,
            "batch_size": bs,
            "lr": args.lr,
            "positions": args.positions,
            "tokens_seen": int(res.history["tokens"].sum()),
            "final_loss": float(res.history["loss"].iloc[-1]),
            "seconds": round(t_train, 1),
        },
        "heldout_sequences": len(heldout),
        "bounds": bounds,
        "seconds": {"train": round(t_train, 1), "eval": round(t_eval, 1)},
    }


if __name__ == "__main__":
    main()

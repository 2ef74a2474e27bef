"""RL step time with 2 processes (torchrun, gloo) against 1 process, the same global batch, on the CPU.

One RL step = 8 prompts x K=8 rollouts, 80 new tokens (greedy tokens, sampled exits, as
``eetools reproduce`` trains), from the shipped ``tiny-reasoner/calibrated`` exit model.
Each variant runs in a fresh process (or pair of processes) and reports the median time of
a few steps after a warm-up step; rank 0 times, after a barrier, so waiting at the
gradient all-reduce counts.

- ``ddp_step_ratio``: 2 processes x 1 thread / 1 process x 2 threads (both use 2 cores;
  below 1 means data parallelism beats intra-op threads);
- ``ddp_step_ratio_1thread``: 2 processes x 1 thread / 1 process x 1 thread (the speed-up
  from a second process alone; 0.5 would be perfect scaling).

The three variants run one after another in each of ``--rounds`` rounds (default 3), and each
ratio is the median over rounds of the ratio within a round: on a shared machine a single round
moves by 20 % and more (0.65-0.88 in three rounds on 2026-12-02). With fewer than 2 idle cores the numbers say nothing about
data parallelism (and the 2-thread process can slow down many times over, its threads
spinning while they wait for a core); `measure` warns when the load average says so.

With ``--phases`` each variant also reports where its step goes (rank 0's seconds per step in
decoding the rollouts, the loss's teacher-forced passes, the backward, gathering the history
columns and the gradient all-reduce): what a second process divides and what it does not.

    python benchmarks/bench_ddp.py [--quick] [--phases] [--rounds N]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROLLOUT = dict(k=8, prompts_per_step=8, max_new_tokens=80, temperature=0.0)
TIMEOUT_S = 600


PHASES = {
    "decode": ("eetools.core.model", "EarlyExitModel.generate"),
    "passes": ("eetools.train.rl", "rl_terms"),
    "backward": ("torch", "Tensor.backward"),
    "gather": ("eetools.train.rl", "_gather_columns"),
    "all_reduce": ("eetools.train.distributed", "all_reduce_gradients"),
}


def _timed_phases() -> dict[str, float]:
    """Wrap each phase's function so that its seconds add up in the returned dict (this process only)."""
    import importlib

    spent = collections.defaultdict(float)
    for phase, (module, name) in PHASES.items():
        owner = importlib.import_module(module)
        *path, attr = name.split(".")
        for part in path:
            owner = getattr(owner, part)
        inner = getattr(owner, attr)

        def timed(*a, _inner=inner, _phase=phase, **k):
            t = time.perf_counter()
            try:
                return _inner(*a, **k)
            finally:
                spent[_phase] += time.perf_counter() - t

        setattr(owner, attr, timed)
    return spent


def _worker(threads: int, steps: int, phases: bool = False) -> None:
    """Time `steps` RL steps in this process (a rank under torchrun); rank 0 prints a JSON line."""
    import eetools
    from eetools.train import distributed
    from eetools.train.rl import train_rl

    torch.set_num_threads(threads)
    distributed.setup("cpu")
    spent = _timed_phases() if phases else {}
    ee = eetools.load_exit_model("tiny-reasoner/calibrated")
    train_rl(ee, "addition", steps=1, eval_every=0, progress=False, seed=0, **ROLLOUT)  # warm-up
    spent.clear()
    times = []
    for i in range(steps):  # seed i+1, step 0: the same global batch in every variant
        distributed.barrier()
        t = time.perf_counter()
        train_rl(ee, "addition", steps=1, eval_every=0, progress=False, seed=i + 1, **ROLLOUT)
        times.append(time.perf_counter() - t)
    if distributed.is_main():
        print(
            json.dumps(
                {"step_s": statistics.median(times), "times": times, "phases": {k: v / steps for k, v in spent.items()}}
            ),
            flush=True,
        )
    distributed.teardown()


def _launch(processes: int, threads: int, steps: int, phases: bool = False) -> dict:
    """``{"step_s": median seconds per RL step, "phases": {...}}`` of `processes` processes with `threads` threads each."""
    me = os.path.abspath(__file__)
    worker = [me, "--worker", "--threads", str(threads), "--steps", str(steps)] + (["--phases"] if phases else [])
    if processes == 1:
        cmd = [sys.executable, *worker]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(processes),
            *worker,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)  # a launcher's variables would make the single process wait for peers
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def measure(quick: bool = False, phases: bool = False, rounds: int | None = None) -> dict:
    """``{"ddp_step_ratio": t(2 proc x 1 thread) / t(1 proc x 2 threads), "ddp_step_ratio_1thread": ...}``,
    medians over `rounds` rounds (1 with `quick`, else 3) of the ratios within each round, with
    ``ddp_step_ratio_min`` / ``_max`` over rounds; with `phases`, also ``phase_<phase>_s_<variant>``
    (rank 0's seconds per step in each phase, medians over rounds)."""
    steps = 2 if quick else 4
    busy = os.getloadavg()[0]
    if busy > 0.5:
        print(
            f"bench_ddp: load average {busy:.1f} before starting; with other work on the cores the ratios are "
            "not a measure of data parallelism",
            file=sys.stderr,
        )
    rounds = rounds or (1 if quick else 3)
    variants = {"1proc_2threads": (1, 2), "2proc_1thread": (2, 1), "1proc_1thread": (1, 1)}
    runs = [{name: _launch(p, th, steps, phases) for name, (p, th) in variants.items()} for _ in range(rounds)]
    med = statistics.median
    ratio = [r["2proc_1thread"]["step_s"] / r["1proc_2threads"]["step_s"] for r in runs]
    out = {
        "ddp_step_ratio": med(ratio),
        "ddp_step_ratio_1thread": med(r["2proc_1thread"]["step_s"] / r["1proc_1thread"]["step_s"] for r in runs),
        "ddp_step_ratio_min": min(ratio),
        "ddp_step_ratio_max": max(ratio),
        "rounds": rounds,
        **{f"rl_step_s_{name}": med(r[name]["step_s"] for r in runs) for name in variants},
    }
    for name in variants:
        for phase in sorted(runs[0][name].get("phases", {})):
            out[f"phase_{phase}_s_{name}"] = med(r[name]["phases"][phase] for r in runs)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--phases", action="store_true", help="also time each phase of the step")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of the three variants (default 3, --quick 1)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        _worker(a.threads, a.steps, a.phases)
    else:
        for k, v in measure(a.quick, a.phases, a.rounds).items():
            print(f"{k:28s} {v:.3f}")

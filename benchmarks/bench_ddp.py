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

The variants run one after another, not interleaved: on a shared machine, rerun before
trusting a small difference. With fewer than 2 idle cores the numbers say nothing about
data parallelism (and the 2-thread process can slow down many times over, its threads
spinning while they wait for a core); `measure` warns when the load average says so.

    python benchmarks/bench_ddp.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROLLOUT = dict(k=8, prompts_per_step=8, max_new_tokens=80, temperature=0.0)
TIMEOUT_S = 600


def _worker(threads: int, steps: int) -> None:
    """Time `steps` RL steps in this process (a rank under torchrun); rank 0 prints a JSON line."""
    import eetools
    from eetools import distributed
    from eetools.rl import train_rl

    torch.set_num_threads(threads)
    distributed.setup("cpu")
    ee = eetools.load_exit_model("tiny-reasoner/calibrated")
    train_rl(ee, "addition", steps=1, eval_every=0, progress=False, seed=0, **ROLLOUT)  # warm-up
    times = []
    for i in range(steps):  # seed i+1, step 0: the same global batch in every variant
        distributed.barrier()
        t = time.perf_counter()
        train_rl(ee, "addition", steps=1, eval_every=0, progress=False, seed=i + 1, **ROLLOUT)
        times.append(time.perf_counter() - t)
    if distributed.is_main():
        print(json.dumps({"step_s": statistics.median(times), "times": times}), flush=True)
    distributed.teardown()


def _launch(processes: int, threads: int, steps: int) -> float:
    """Median seconds per RL step of `processes` processes with `threads` threads each."""
    me = os.path.abspath(__file__)
    worker = [me, "--worker", "--threads", str(threads), "--steps", str(steps)]
    if processes == 1:
        cmd = [sys.executable, *worker]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               *worker]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)  # a launcher's variables would make the single process wait for peers
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])["step_s"]


def measure(quick: bool = False) -> dict:
    """``{"ddp_step_ratio": t(2 proc x 1 thread) / t(1 proc x 2 threads), "ddp_step_ratio_1thread": ...}``."""
    steps = 2 if quick else 4
    busy = os.getloadavg()[0]
    if busy > 0.5:
        print(f"bench_ddp: load average {busy:.1f} before starting; with other work on the cores the ratios are "
              "not a measure of data parallelism", file=sys.stderr)
    one_2t = _launch(1, 2, steps)
    two_1t = _launch(2, 1, steps)
    one_1t = _launch(1, 1, steps)
    return {"ddp_step_ratio": two_1t / one_2t, "ddp_step_ratio_1thread": two_1t / one_1t,
            "rl_step_s_1proc_2threads": one_2t, "rl_step_s_2proc_1thread": two_1t, "rl_step_s_1proc_1thread": one_1t}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        _worker(a.threads, a.steps)
    else:
        for k, v in measure(a.quick).items():
            print(f"{k:28s} {v:.3f}")

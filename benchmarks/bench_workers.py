"""Seconds per training step of `eetools reproduce`'s stages: 2 spawned workers x 1 thread / 1 process x 2 threads.

    python benchmarks/bench_workers.py [--quick] [--rounds N]

`reproduce` trains in ``--workers 2`` processes (`distributed.spawn`, gloo, each batch cut into 2 shards, one per
process). This times each stage's step both ways on the same global batches, rounds alternated, and prints the
median ratio per stage (< 1: the workers are faster; keys ``workers_calib_step_ratio`` (addition+tom, the main
calibration), ``workers_fig3_step_ratio`` (addition, Fig. 3's calibrations), ``workers_rl_step_ratio`` (RL on
addition+tom)). Each process runs one micro-batch: a worker its shard, the one process the whole batch at once.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

STAGES = ("calib", "fig3", "rl")


def _steps(stage: str, steps: int) -> float:
    """Seconds per step of `steps` steps of `stage` in this process (a rank of a group, or alone), after a warm-up."""
    import eetools
    from eetools.pipeline import _fresh_ee
    from eetools.train import distributed
    from eetools.train.calibration import calibrate
    from eetools.train.rl import train_rl

    if stage == "rl":
        ee = eetools.load_exit_model("tiny-reasoner/calibrated")
        run = lambda n, seed: train_rl(  # noqa: E731
            ee, "addition+tom", steps=n, eval_every=0, progress=False, seed=seed, temperature=0.0
        )
    else:
        ee = _fresh_ee(seed=0)
        task, k = ("addition+tom", 64.0) if stage == "calib" else ("addition", 16.0)
        run = lambda n, seed: calibrate(  # noqa: E731
            ee, task, kl_factor=k, steps=n, seed=seed, progress=False
        )
    run(1, 0)
    distributed.barrier()
    t = time.perf_counter()
    run(steps, 1)
    return (time.perf_counter() - t) / steps


def _worker(stage: str, steps: int, out: str) -> None:
    from eetools.train import distributed

    dt = _steps(stage, steps)
    if distributed.is_main():
        Path(out).write_text(json.dumps(dt))


def run(quick: bool = False, rounds: int | None = None) -> dict:
    from eetools.train import distributed

    rounds = rounds or (1 if quick else 2)
    steps = {"calib": 2 if quick else 6, "fig3": 4 if quick else 20, "rl": 1 if quick else 4}
    threads = torch.get_num_threads()
    out = {}
    for stage in STAGES:
        ratios = []
        for _ in range(rounds):
            with tempfile.TemporaryDirectory() as d:
                f = os.path.join(d, "t.json")
                distributed.spawn(_worker, (stage, steps[stage], f), workers=2, threads=1)
                two = json.loads(Path(f).read_text())
            torch.set_num_threads(2)
            try:
                one = _steps(stage, steps[stage])
            finally:
                torch.set_num_threads(threads)
            ratios.append(two / one)
            print(f"{stage}: workers {two:.3f} s / one process {one:.3f} s a step", file=sys.stderr, flush=True)
        out[f"workers_{stage}_step_ratio"] = statistics.median(ratios)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    print(json.dumps(run(args.quick, args.rounds), indent=2))


if __name__ == "__main__":
    main()

"""Seconds per calibration step of the shipped model, timed as ``calib_step_s`` of bench_train.py.

For comparing source trees one process at a time (a ``git archive`` export on PYTHONPATH; the
module is found under its old name ``eetools.calibration`` on trees before the package split):

    OMP_NUM_THREADS=1 PYTHONPATH=TREE python benchmarks/calib_step_time.py [--rounds 3]

Prints the tree it ran and one ``calib_step_s`` per round (``calibrate(..., steps=2)`` / 2 after a
one-step warm-up: batch 8, 4 exit samples, LoRA on, addition).
"""

from __future__ import annotations

import argparse
import importlib
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    import eetools

    try:
        calibration = importlib.import_module("eetools.calibration")
    except ModuleNotFoundError:
        calibration = importlib.import_module("eetools.train.calibration")
    print(calibration.__file__, f"threads {torch.get_num_threads()}")
    torch.manual_seed(0)
    ee = eetools.attach_exit_heads(eetools.load_model(device="cpu"))
    calibration.calibrate(ee, "addition", steps=1, progress=False)  # warm-up
    times = []
    for _ in range(a.rounds):
        t = time.perf_counter()
        calibration.calibrate(ee, "addition", steps=2, seed=1, progress=False)
        times.append((time.perf_counter() - t) / 2)
    print("calib_step_s", " ".join(f"{x:.3f}" for x in times))


if __name__ == "__main__":
    main()

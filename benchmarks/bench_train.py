"""Calibration and RL step time and peak memory on the shipped model, in one run.

- ``calib_step_s``: seconds per calibration step (batch 8, 4 exit samples, LoRA on), addition;
- ``rl_step_s``: seconds per RL step (8 prompts x K=8 rollouts, 80 new tokens), addition,
  from the calibrated preset (target <= 3 s on CPU);
- ``peak_mem_mb``: peak memory while training: resident set size on CPU, or
  ``torch.cuda.max_memory_allocated`` on a GPU.

    python benchmarks/bench_train.py [--quick] [--device cpu|cuda] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import main  # noqa: E402


def _peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def run(quick: bool = False, device: str = "cpu", dtype: str = "float32") -> dict:
    import eetools
    from eetools.calibration import calibrate
    from eetools.rl import train_rl

    steps = 2 if quick else 4
    torch.manual_seed(0)
    ee = eetools.attach_exit_heads(eetools.load_model(device=device, dtype=dtype))
    calibrate(ee, "addition", steps=1, progress=False)  # warm-up (LoRA injection, first allocations)
    t = time.perf_counter()
    calibrate(ee, "addition", steps=steps, seed=1, progress=False)
    calib = (time.perf_counter() - t) / steps
    ee = eetools.load_exit_model("tiny-reasoner/calibrated", model=eetools.load_model(device=device, dtype=dtype))
    train_rl(ee, "addition", steps=1, eval_every=0, progress=False, temperature=0)
    t = time.perf_counter()
    train_rl(ee, "addition", steps=steps, eval_every=0, progress=False, temperature=0, seed=1)
    rl = (time.perf_counter() - t) / steps
    return {"calib_step_s": calib, "rl_step_s": rl, "peak_mem_mb": _peak_mb(device)}


if __name__ == "__main__":
    main(run)

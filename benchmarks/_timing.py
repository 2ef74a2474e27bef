"""Side-by-side timing helpers: interleaved repeats, median, one process."""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _sync() -> None:
    """Wait for queued GPU work, so a call's time includes its kernels."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timings(fns: dict, repeats: int = 5, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each call of each function, `repeats` rounds, calls interleaved within a round."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            _sync()
            t = time.perf_counter()
            f()
            _sync()
            times[k].append(time.perf_counter() - t)
    return times


def compare(fns: dict, repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved so machine noise hits all alike."""
    return {k: statistics.median(v) for k, v in timings(fns, repeats, warmup).items()}


def paired_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of ``time[a] / time[b]``: each ratio compares two calls made back to back,
    so load that drifts between rounds (a shared machine) cancels; steadier than a ratio of medians."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def main(run) -> None:
    """Command line of a benchmark module: ``[--quick] [--device cpu|cuda] [--dtype float32|bfloat16]``."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    for k, v in run(a.quick, a.device, a.dtype).items():
        print(f"{k:28s} {v:.3f}")

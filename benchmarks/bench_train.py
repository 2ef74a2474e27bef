"""Calibration and RL step time and peak memory on the shipped model, in one run.

- ``calib_step_s``: seconds per calibration step (batch 8, 4 exit samples, LoRA on), addition;
- ``calib_streamed_vs_onepass``: time of one calibration step's forward and backward (the batch of
  ``calib_step_s``) streamed (``one_pass_elements=0``: one exit sample at a time, losses over
  position chunks, as for hub models) / in one pass (the default on this model), alternated in one
  process; ``calib_streamed_vs_onepass_mixture`` the same on an addition+tom batch (long traces);
- ``calib_bridge_vs_fast_mixture``: time of an addition+tom calibration step with the training forwards on
  the bridge's path (``fast_forwards=False``) / on the HF modules with fused attention (the default,
  `eetools.core.fast.bypass.hooked`), alternated in one process;
- ``rl_step_s``: seconds per RL step (8 prompts x K=8 rollouts, 80 new tokens), addition,
  from the calibrated preset (target <= 3 s on CPU);
- ``rl_step_mixture_s``: the same on the addition+tom mixture (long ToM reasoning), as ``reproduce`` runs it;
- ``rl_terms_chunked_vs_one_pass``: time of the RL loss and its backward on one mixture rollout batch,
  length-sorted chunks / one padded pass (both running every rollout's prompt);
- ``rl_terms_shared_vs_chunked``: the same, each distinct prompt run once for its k rollouts (the
  default) / chunks running every rollout's prompt;
- ``decode_compact_vs_full``: time of generating that batch with finished rows leaving it (the
  default) / every row kept to the end;
- ``decode_distinct_prefill_vs_every_row``: generating it with each distinct prompt prefilled once
  (the default) / every row prefilled;
- ``peak_mem_mb``: peak memory while training: resident set size on CPU, or
  ``torch.cuda.max_memory_allocated`` on a GPU.

    python benchmarks/bench_train.py [--quick] [--device cpu|cuda] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import functools
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import compare, main, paired_ratio, timings  # noqa: E402


def _peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def run(quick: bool = False, device: str = "cpu", dtype: str = "float32") -> dict:
    import eetools
    from eetools.train.calibration import calibrate
    from eetools.train.rl import train_rl

    steps = 2 if quick else 4
    torch.manual_seed(0)
    ee = eetools.attach_exit_heads(eetools.load_model(device=device, dtype=dtype))
    calibrate(ee, "addition", steps=1, progress=False)  # warm-up (LoRA injection, first allocations)
    t = time.perf_counter()
    calibrate(ee, "addition", steps=steps, seed=1, progress=False)
    calib = (time.perf_counter() - t) / steps
    paths = _calibration_paths(ee, quick)
    ee = eetools.load_exit_model("tiny-reasoner/calibrated", model=eetools.load_model(device=device, dtype=dtype))
    train_rl(ee, "addition", steps=1, eval_every=0, progress=False, temperature=0)
    t = time.perf_counter()
    train_rl(ee, "addition", steps=steps, eval_every=0, progress=False, temperature=0, seed=1)
    rl = (time.perf_counter() - t) / steps
    t = time.perf_counter()
    train_rl(ee, "addition+tom", steps=1 if quick else 2, eval_every=0, progress=False, temperature=0, seed=1)
    mixture = (time.perf_counter() - t) / (1 if quick else 2)
    return {
        "calib_step_s": calib,
        **paths,
        "rl_step_s": rl,
        "rl_step_mixture_s": mixture,
        **_mixture_ratios(ee, quick),
        "peak_mem_mb": _peak_mb(device),
    }


def _calibration_paths(ee, quick: bool) -> dict:
    """A calibration step streamed / in one pass, alternated (paired ratios: load drift cancels)."""
    from eetools import tasks
    from eetools.train.calibration import CalibrationConfig, calibration_step

    out = {}
    for key, task in (("calib_streamed_vs_onepass", "addition"), ("calib_streamed_vs_onepass_mixture", "addition+tom")):
        source = tasks.get(task)
        fns = {
            "streamed": functools.partial(calibration_step, ee, source, CalibrationConfig(one_pass_elements=0), 0),
            "one_pass": functools.partial(calibration_step, ee, source, CalibrationConfig(), 0),
        }
        out[key] = paired_ratio(timings(fns, repeats=3 if quick else 7), "streamed", "one_pass")
    step = functools.partial(calibration_step, ee, tasks.get("addition+tom"), CalibrationConfig(), 0)

    def on(fast: bool):
        def f():
            ee.fast_forwards = fast
            step()

        return f

    times = timings({"bridge": on(False), "fast": on(True)}, repeats=3 if quick else 7)
    out["calib_bridge_vs_fast_mixture"] = paired_ratio(times, "bridge", "fast")
    ee.fast_forwards = True
    for p in ee.trainable_parameters():
        p.grad = None
    return out


def _mixture_ratios(ee, quick: bool) -> dict:
    """Chunked RL loss vs one pass, and decoding with vs without dropping finished rows, side by side."""
    from eetools import tasks
    from eetools.core import generation
    from eetools.core.encoding import CHUNK_ROWS
    from eetools.train.rl import rl_terms

    task = tasks.get("addition+tom")
    group = [e for e in task.sample(4 if quick else 8, seed=0) for _ in range(8)]
    prompts = [e.prompt for e in group]
    rollout = ee.generate(prompts, task.max_new_tokens, mode="sample", temperature=0, skip="compute", seed=0)
    reward = torch.tensor([task.score(e, tasks.cut_at_answer(c)) for e, c in zip(group, rollout.text)])

    def loss(chunk_rows, share_prompts):
        def f():
            objective, _ = rl_terms(
                ee, rollout, reward, 8, 1.5, 0.25, token_term=False, chunk_rows=chunk_rows, share_prompts=share_prompts
            )
            objective.backward()

        return f

    def decode(compact, distinct=True):
        def f():
            keep, rows = generation._Decoder._drop_finished, generation.distinct_rows
            if not compact:  # every row kept to the end: the decoder's behaviour before rows could leave
                generation._Decoder._drop_finished = lambda self, done, n_done: None
            if not distinct:  # every row prefilled, duplicates included
                generation.distinct_rows = lambda r: None
            try:
                ee.generate(prompts, task.max_new_tokens, mode="sample", temperature=0, skip="compute", seed=0)
            finally:
                generation._Decoder._drop_finished, generation.distinct_rows = keep, rows

        return f

    n = 1 if quick else 3
    t = compare(
        {
            "shared": loss(CHUNK_ROWS, True),
            "chunked": loss(CHUNK_ROWS, False),
            "one_pass": loss(None, False),
            "compact": decode(True),
            "full": decode(False),
            "every_prefill": decode(True, distinct=False),
        },
        repeats=n,
        warmup=0,
    )
    for p in ee.trainable_parameters():
        p.grad = None
    return {
        "rl_terms_chunked_vs_one_pass": t["chunked"] / t["one_pass"],
        "rl_terms_shared_vs_chunked": t["shared"] / t["chunked"],
        "decode_compact_vs_full": t["compact"] / t["full"],
        "decode_distinct_prefill_vs_every_row": t["compact"] / t["every_prefill"],
    }


if __name__ == "__main__":
    main(run)

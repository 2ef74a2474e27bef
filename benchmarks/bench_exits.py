"""Exit-model overheads on the shipped model, measured side by side in one run.

- hook_overhead: teacher-forced forward with heads attached and no exits / plain bridge forward
  (target <= 1.15);
- sample_vs_generate_b{1,32}: tokens/s of `EarlyExitModel.generate(mode="sample", skip="compute")`
  with the calibrated shipped heads over tokens/s of `bridge.generate` (KV-cached, sampling),
  batch 1 and 32 (target >= 1.0); ``_masked``: the same with the masked (reference) path;
  ``_no_exits``: the fast path with exits off (``mode="off"``): the heads' and hooks' own cost.

Each ratio is the median over rounds of two calls made back to back (`_timing.paired_ratio`),
so load from other work on a shared machine that changes between rounds cancels out.

    python benchmarks/bench_exits.py [--quick] [--device cpu|cuda] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import main, paired_ratio, timings  # noqa: E402


def run(quick: bool = False, device: str = "cpu", dtype: str = "float32") -> dict:
    import eetools

    torch.manual_seed(0)
    bridge = eetools.load_model(device=device, dtype=dtype)
    ee = eetools.attach_exit_heads(bridge)
    b, n = (4, 64) if quick else (8, 128)
    toks = torch.randint(4, bridge.cfg.d_vocab, (b, n), device=device)
    no_exit = torch.full_like(toks, ee.n_layers)
    with torch.no_grad():
        t = timings(
            {"plain": lambda: bridge(toks), "heads": lambda: ee.prescribed_forward(toks, no_exit)},
            repeats=3 if quick else 15,
        )
    out = {"hook_overhead": paired_ratio(t, "heads", "plain")}
    new = 16 if quick else 48
    prompt = eetools.tasks.get("addition").sample(1, seed=0)[0].prompt
    # its own bridge: the calibrated model's LoRA adapters must not slow down the plain one
    calibrated = eetools.load_exit_model(
        "tiny-reasoner/calibrated", model=eetools.load_model(device=device, dtype=dtype)
    )
    for batch in (1, 32):
        prompts = [prompt] * batch

        def ours(skip, mode="sample"):
            return lambda: calibrated.generate(prompts, new, mode=mode, seed=0, skip=skip)

        def theirs():
            return bridge.generate(
                prompts if batch > 1 else prompt,
                max_new_tokens=new,
                do_sample=True,
                stop_at_eos=False,
                verbose=False,
                prepend_bos=True,
            )

        # ours may stop early at EOS: compare tokens per second, counting what each produced
        n_ours = float(ours("compute")().mask.sum())
        n_off = float(ours("compute", "off")().mask.sum())
        tt = timings(
            {"compute": ours("compute"), "mask": ours("mask"), "off": ours("compute", "off"), "theirs": theirs},
            repeats=2 if quick else 9,
        )
        tokens = n_ours / (batch * new)  # ours / theirs tokens per call
        out[f"sample_vs_generate_b{batch}"] = tokens / paired_ratio(tt, "compute", "theirs")
        out[f"sample_vs_generate_b{batch}_masked"] = tokens / paired_ratio(tt, "mask", "theirs")
        out[f"sample_vs_generate_b{batch}_no_exits"] = n_off / (batch * new) / paired_ratio(tt, "off", "theirs")
    return out


if __name__ == "__main__":
    main(run)

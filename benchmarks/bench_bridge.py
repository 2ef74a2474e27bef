"""Tokens/s of the TransformerLens bridge forward vs the raw HF forward of the shipped model.

python benchmarks/bench_bridge.py [--quick] [--device cpu|cuda] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import compare, main  # noqa: E402


def run(quick: bool = False, device: str = "cpu", dtype: str = "float32") -> dict:
    from transformers import AutoModelForCausalLM

    import eetools
    from eetools.io.models import shipped_model_dir

    torch.manual_seed(0)
    bridge = eetools.load_model(device=device, dtype=dtype)
    hf = AutoModelForCausalLM.from_pretrained(shipped_model_dir(), dtype=getattr(torch, dtype)).to(device).eval()
    b, n = (4, 64) if quick else (8, 128)
    toks = torch.randint(4, bridge.cfg.d_vocab, (b, n), device=device)
    with torch.no_grad():
        t = compare({"bridge": lambda: bridge(toks), "hf": lambda: hf(toks)}, repeats=3 if quick else 7)
    return {
        "bridge_tokens_per_s": b * n / t["bridge"],
        "hf_tokens_per_s": b * n / t["hf"],
        "bridge_vs_hf_speed": t["hf"] / t["bridge"],
    }


if __name__ == "__main__":
    main(run)

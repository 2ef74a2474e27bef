"""The scale issue's GPU numbers: a Qwen3-4B-shaped model's calibration, RL step and decode.

Random weights with Qwen3-4B's shapes (36 blocks, d_model 2560, GQA 32/8 heads of 128, MLP 9728,
vocabulary 151,936), built offline from a config, default exit layers, LoRA of calibration's
default rank, activation checkpointing on (the setting README recommends for hub models):

- ``calib_{rows}x{tokens}_gib`` / ``_s``: peak memory (``max_memory_allocated`` above the loaded
  model, GiB) and seconds of one calibration step (`calibration_step`, 4 exit samples) of `rows`
  sequences of `tokens` tokens, one sequence per micro-batch;
- ``rl_{prompts}x{k}x{new}_gib`` / ``_s``: the same for one RL step: `k` rollouts of `new`
  sampled tokens for each of `prompts` prompts (exits sampled, real skipping), the RLOO objective
  (`rl_terms`, rewards alternating 1/0) and its backward;
- ``decode_b{batch}_skip{rate}_tps``: greedy tokens/s with every generated token exiting where
  `rate` % of the blocks are skipped (`bench_skip.exit_model_at`), ``decode_b{batch}_off_tps`` the
  same path with exits off, ``decode_b{batch}_bridge_tps`` `bridge.generate` and
  ``decode_b{batch}_hf_tps`` HF ``generate``; ``decode_b1_speedup_50`` = skip50 / off (target
  >= 1.5) and ``decode_b{batch}_off_vs_bridge`` = off / bridge (target >= 1).

Targets (issue 29): calibration at 4,096 tokens and the RL step each within 80 GB.

    python benchmarks/bench_gpu_scale.py [--shape 4b|test] [--device cuda] [--dtype bfloat16] [--json F]

``--shape test`` is a 4-block toy of the same code path, small enough for a CPU (tests use it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import _sync  # noqa: E402
from estimate_memory import _text, qwen3_config  # noqa: E402

SHAPES = {
    # the sizes of each measurement; the model's shape is estimate_memory's of the same name
    "4b": dict(calib=(8, 4096), rl=(8, 8, 1024), new=64),
    "test": dict(calib=(2, 48), rl=(2, 2, 8), new=4),
}
RATES = (0, 25, 50, 75)


def build(shape: str, device: str, dtype: str):
    """A random bridge of `shape` and its HF model; no weights downloaded or written."""
    from transformers import Qwen3ForCausalLM

    import eetools
    from eetools.io.tokenizer import build_tokenizer

    cfg, tok = qwen3_config(shape), build_tokenizer()
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 4B model's init on the CPU takes minutes
        hf = Qwen3ForCausalLM(cfg).to(dtype=getattr(torch, dtype)).eval()
    folder = tempfile.mkdtemp(prefix=f"qwen3-{shape}-shaped-")
    cfg.save_pretrained(folder)
    tok.save_pretrained(folder)
    bridge = eetools.load_model(folder, device=device, dtype=dtype, hf_model=hf)
    bridge.cfg.default_prepend_bos = True
    return bridge, hf


def _start(device: str) -> float:
    _sync()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**30
    return 0.0


def _stop(device: str, base: float, t0: float) -> tuple[float, float]:
    _sync()
    peak = torch.cuda.max_memory_allocated() / 2**30 - base if device.startswith("cuda") else float("nan")
    return peak, time.perf_counter() - t0


def calibration(bridge, shape: str, device: str) -> dict:
    """Peak GiB and seconds of one calibration step on `rows` x `tokens` (one sequence per micro-batch)."""
    import eetools
    from eetools.core.adapters import remove_lora
    from eetools.tasks.base import Example
    from eetools.train.calibration import CalibrationConfig, _trainable_parameters, calibration_step

    rows, tokens = SHAPES[shape]["calib"]
    ee = eetools.attach_exit_heads(bridge)
    cfg = CalibrationConfig(batch_size=rows, micro_batches=rows, activation_checkpointing=True)
    _trainable_parameters(ee, cfg)
    prompt = "Q: 48213+9175\n"
    examples = [Example("bench", prompt, _text(tokens - len(prompt) - 1, i), "0", {}) for i in range(rows)]
    base, t0 = _start(device), time.perf_counter()
    calibration_step(ee, examples, cfg, 0)
    gib, secs = _stop(device, base, t0)
    remove_lora(ee)  # the next part adds its own
    return {f"calib_{rows}x{tokens}_gib": gib, f"calib_{rows}x{tokens}_s": secs}


def rl(bridge, shape: str, device: str) -> dict:
    """Peak GiB and seconds of one RL step: rollouts with sampled exits, the RLOO objective, its backward."""
    import eetools
    from eetools.core.adapters import add_lora, remove_lora
    from eetools.train.calibration import CalibrationConfig
    from eetools.train.rl import RLConfig, rl_terms

    prompts, k, new = SHAPES[shape]["rl"]
    cfg = RLConfig(k=k, prompts_per_step=prompts, activation_checkpointing=True)
    ee = eetools.attach_exit_heads(bridge)
    r = CalibrationConfig().lora_r
    add_lora(ee, r=r, alpha=2 * r, seed=0)
    for p in ee.trainable_parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        for h in ee.heads:
            h.net[-1].bias.fill_(-2.0)  # some exits
    rewards = torch.tensor([float(i % 2) for i in range(prompts * k)])
    base, t0 = _start(device), time.perf_counter()
    rollout = ee.generate(
        [f"Q: {i}+{i}\n" for i in range(prompts) for _ in range(k)], new, rule=cfg.exit_rule(), skip="compute", seed=0
    )
    objective, _ = rl_terms(ee, rollout, rewards, k, cfg.lam, cfg.beta, checkpoint_blocks=True)
    objective.backward()
    gib, secs = _stop(device, base, t0)
    remove_lora(ee)
    tag = f"rl_{prompts}x{k}x{new}"
    return {f"{tag}_gib": gib, f"{tag}_s": secs, f"{tag}_tokens": float(rollout.mask.sum())}


def decode(bridge, hf, shape: str, device: str, repeats: int = 2) -> dict:
    """Greedy tokens/s at batch 1 and 32: exits skipping 0/25/50/75 % of the blocks, exits off, bridge, HF."""
    from _timing import compare
    from bench_skip import exit_model_at

    new, prompt, out = SHAPES[shape]["new"], "Q: 48213+9175\n", {}
    for batch in (1, 32):
        prompts = [prompt] * batch
        ids = bridge.to_tokens(prompts, prepend_bos=True).to(device)
        fns = {
            "bridge": lambda: bridge.generate(
                prompts if batch > 1 else prompt,
                max_new_tokens=new,
                do_sample=False,
                stop_at_eos=False,
                verbose=False,
                prepend_bos=True,
            ),
            "hf": lambda: hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False
            ),
        }
        counts = {"bridge": batch * new, "hf": batch * new}
        for rate in RATES:
            ee = exit_model_at(bridge, rate)
            fns[f"skip{rate}"] = lambda ee=ee: ee.generate(prompts, new, temperature=0, seed=0, skip="compute")
            counts[f"skip{rate}"] = float(fns[f"skip{rate}"]().mask.sum())  # a random model may write EOS
            if rate == 0:
                fns["off"] = lambda ee=ee: ee.generate(prompts, new, temperature=0, mode="off")
                counts["off"] = float(fns["off"]().mask.sum())
        t = compare(fns, repeats=repeats)
        for key, secs in t.items():
            out[f"decode_b{batch}_{key}_tps"] = counts[key] / secs
        out[f"decode_b{batch}_off_vs_bridge"] = out[f"decode_b{batch}_off_tps"] / out[f"decode_b{batch}_bridge_tps"]
        out[f"decode_b{batch}_speedup_50"] = out[f"decode_b{batch}_skip50_tps"] / out[f"decode_b{batch}_off_tps"]
    return out


def run(shape: str = "4b", device: str = "cuda", dtype: str = "bfloat16", parts=("calib", "rl", "decode")) -> dict:
    bridge, hf = build(shape, device, dtype)
    out: dict[str, float] = {}
    steps = {
        "calib": lambda: calibration(bridge, shape, device),
        "rl": lambda: rl(bridge, shape, device),
        "decode": lambda: decode(bridge, hf, shape, device),
    }
    for part in parts:
        try:
            out.update(steps[part]())
        except torch.OutOfMemoryError as e:  # a measurement in itself: say so and go on
            print(f"{part}: out of memory ({str(e).splitlines()[0]})", file=sys.stderr)
            out[f"{part}_oom"] = 1.0
        for p in bridge.parameters():  # the next part starts from a frozen base again
            p.grad = None
        print(json.dumps({k: round(v, 3) for k, v in out.items()}), file=sys.stderr, flush=True)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="4b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--parts", nargs="+", default=["calib", "rl", "decode"], choices=["calib", "rl", "decode"])
    ap.add_argument("--json", default=None, help="also write the results to this file")
    a = ap.parse_args()
    res = run(a.shape, a.device, a.dtype, a.parts)
    for k, v in res.items():
        print(f"{k:32s} {v:.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)

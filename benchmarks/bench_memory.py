"""Extra peak memory of a calibration step and an RL step against a plain LoRA fine-tuning step (issue 29).

Model: a random Qwen3-0.6B-shaped bridge cut to 8 blocks (d_model 1024, vocabulary 151,936; see
`bench_skip.qwen3_06b_shaped`), default exit layers (1..7), LoRA of calibration's default rank.

- ``calib_mem_vs_sft_{256,1024,4096}``: one calibration step (1 sequence of that many tokens, 4
  exit samples: `calibration_sums` and its backward) / one peft LoRA step with cross-entropy on
  the same sequence;
- ``rl_mem_vs_sft_{256,1024}``: one RL step (one prompt, 2 rollouts of that many new tokens:
  generation, `rl_terms` and its backward) / one LoRA step on two sequences of the rollouts' shape;
- each with ``activation_checkpointing`` at its config's default (on for calibration, off for RL);
  ``--ckpt`` / ``--no-ckpt`` set it for both (``..._ckpt`` / ``..._nockpt`` keys).

Each number is measured in a fresh process: on CPU the peak resident set during the step minus
the resident set after loading (the peak is reset first through ``/proc/self/clear_refs``, else
``ru_maxrss``); on CUDA ``torch.cuda.max_memory_allocated`` above the memory allocated before.

    python benchmarks/bench_memory.py [--quick] [--device cpu|cuda] [--dtype float32|bfloat16] [--ckpt|--no-ckpt]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
PROMPT_TOKENS = 16


def _rss_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _baseline(device: str) -> float:
    """Memory now, after freeing what loading left behind, with the peak reset to it."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set (VmHWM) to the current one
    except OSError:
        pass
    return _rss_mb("VmRSS")


def _peak(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return _rss_mb("VmHWM")


def _sft_step(rows: int, tokens: int, device: str, dtype: str) -> float:
    """Extra MB of one peft LoRA step (cross-entropy) on `rows` random sequences of `tokens` tokens."""
    from bench_skip import qwen3_config
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3ForCausalLM

    from eetools.core.adapters import DEFAULT_TARGETS
    from eetools.train.calibration import CalibrationConfig

    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(qwen3_config(n_layers=8)).to(device=device, dtype=getattr(torch, dtype))
    hf.config._attn_implementation = "eager"  # as the bridge runs it
    r = CalibrationConfig().lora_r
    targets = [t for t in DEFAULT_TARGETS if t.endswith("_proj")]
    model = get_peft_model(hf, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0))
    ids = torch.randint(0, 151_936, (rows, tokens), device=device)
    base = _baseline(device)
    model(input_ids=ids, labels=ids).loss.backward()
    return _peak(device) - base


def _calib_step(tokens: int, device: str, dtype: str, ckpt: bool | None) -> float:
    from bench_skip import qwen3_06b_shaped

    import eetools
    from eetools.train.calibration import CalibrationConfig, _trainable_parameters, calibration_sums

    cfg = CalibrationConfig()
    ckpt = cfg.activation_checkpointing if ckpt is None else ckpt
    opt = {"checkpoint_blocks": True} if ckpt else {}  # none: the call runs on code from before the option too
    ee = eetools.attach_exit_heads(qwen3_06b_shaped(device, dtype, n_layers=8))
    _trainable_parameters(ee, cfg)
    torch.manual_seed(0)
    ids = torch.randint(0, 151_936, (1, tokens), device=device)
    attn = torch.ones_like(ids)
    predict = torch.zeros_like(ids, dtype=torch.bool)
    predict[0, PROMPT_TOKENS - 1 : -1] = True
    base = _baseline(device)
    gen = torch.Generator().manual_seed(0)
    n = predict.sum().float()
    if os.environ.get("BENCH_CALIB_ONE_GRAPH"):  # the path before the per-chunk backward (and code before it)
        kl, nll, _ = calibration_sums(ee, ids, attn, predict, cfg.kl_factor, cfg.exit_samples, gen, **opt)
        (kl / n + nll / n).backward()
    else:  # as `calibration_step` runs it: each student chunk's backward in turn
        calibration_sums(
            ee, ids, attn, predict, cfg.kl_factor, cfg.exit_samples, gen, backward_scale=(1 / n, 1 / n), **opt
        )
    return _peak(device) - base


def _rl_step(tokens: int, device: str, dtype: str, ckpt: bool | None) -> float:
    from bench_skip import qwen3_06b_shaped

    import eetools
    from eetools.core.adapters import add_lora
    from eetools.train.calibration import CalibrationConfig
    from eetools.train.rl import RLConfig, rl_terms

    cfg = RLConfig(k=2)
    opt = {"checkpoint_blocks": True} if (cfg.activation_checkpointing if ckpt is None else ckpt) else {}
    ee = eetools.attach_exit_heads(qwen3_06b_shaped(device, dtype, n_layers=8))
    r = CalibrationConfig().lora_r
    add_lora(ee, r=r, alpha=2 * r)
    for p in ee.trainable_parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        for h in ee.heads:
            h.net[-1].bias.fill_(-1.0)  # some exits
    base = _baseline(device)
    rollout = ee.generate(["Q: 12+34\n"] * 2, tokens, rule=cfg.exit_rule(), skip="compute", seed=0)
    objective, _ = rl_terms(ee, rollout, torch.tensor([1.0, 0.0]), 2, cfg.lam, cfg.beta, **opt)
    objective.backward()
    print(f"rollout tokens {rollout.mask.sum(1).tolist()}", file=sys.stderr)
    return _peak(device) - base


def _measure(kind: str, tokens: int, device: str, dtype: str, ckpt: bool | None = None) -> float:
    """Extra MB of one step of `kind`, in a fresh process."""
    cmd = [sys.executable, __file__, "--worker", kind, "--tokens", str(tokens), "--device", device, "--dtype", dtype]
    flag = [] if ckpt is None else ["--ckpt" if ckpt else "--no-ckpt"]
    out = subprocess.run(cmd + flag, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"{kind} {tokens}: failed (rc {out.returncode}) {out.stderr[-400:]}", file=sys.stderr)
        return float("nan")
    mb = json.loads(out.stdout.strip().splitlines()[-1])["extra_mb"]
    print(f"{kind:5s} {tokens:5d} ckpt={ckpt!s:5s} extra {mb:8.0f} MB", file=sys.stderr, flush=True)
    return mb


def run(quick: bool = False, device: str = "cpu", dtype: str = "float32", ckpt: bool | None = None) -> dict[str, float]:
    tag = "" if ckpt is None else "_ckpt" if ckpt else "_nockpt"
    out = {}
    for n in (256,) if quick else (256, 1024, 4096):
        out[f"calib_mem_vs_sft_{n}{tag}"] = _measure("calib", n, device, dtype, ckpt) / _measure(
            "sft1", PROMPT_TOKENS + n, device, dtype
        )
    for n in (256,) if quick else (256, 1024):
        out[f"rl_mem_vs_sft_{n}{tag}"] = _measure("rl", n, device, dtype, ckpt) / _measure(
            "sft2", PROMPT_TOKENS + n, device, dtype
        )
    return out


def _worker(a) -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if a.worker.startswith("sft"):
        mb = _sft_step(int(a.worker[3:]), a.tokens, a.device, a.dtype)
    elif a.worker == "calib":
        mb = _calib_step(a.tokens, a.device, a.dtype, a.ckpt)
    else:
        mb = _rl_step(a.tokens, a.device, a.dtype, a.ckpt)
    print(json.dumps({"extra_mb": mb}))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument(
        "--ckpt",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="activation checkpointing in calibration and RL (default: each config's default)",
    )
    ap.add_argument("--worker", default=None)
    ap.add_argument("--tokens", type=int, default=256)
    a = ap.parse_args()
    if a.worker:
        _worker(a)
    else:
        for k, v in run(a.quick, a.device, a.dtype, a.ckpt).items():
            print(f"{k:28s} {v:.3f}")

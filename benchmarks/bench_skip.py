"""Decode wall-clock with real compute skipping vs masking vs no exits, side by side in one run.

Every generated token exits at a prescribed layer (heads set to fire there and nowhere
else), so a share 0 %, 25 %, 50 % or 75 % of the blocks is skipped for every generated token.
Batch 1, greedy tokens, KV cache. Two models:

- ``tiny``: the shipped tiny reasoner (8 blocks, d_model 128);
- ``qwen3_0.6b``: a randomly initialised model with Qwen3-0.6B's shapes (28 blocks, d_model
  1024, GQA 16/8 heads of 128, MLP 3072, vocabulary 151,936), built offline from a config.

Keys: ``skip_speedup_{rate}`` = masked time / skipping time per generated token on the
Qwen3-0.6B-shaped model (target >= 1.3 at 50 %, >= 1.0 at 0 %), the fast path as `generate`
runs it: skipping, and the HF modules called without the bridge's wrappers (`eetools.core.fast.bypass`);
``skip_only_speedup_{rate}``: the same with a hook attached, so the decode stays on the bridge's
components and only the skipping differs from the masked path; ``skip_vs_plain_{rate}`` =
time per token with no exits (``mode="off"``) / with skipping; ``layers_saved_{rate}``: what
the run saved (the first generated token never exits); the ``tiny_`` variants are the same
on the shipped model. ``kv_only_speedup_{rate}`` = the fast path with exited blocks skipped component by component
(`_RowSkip` only) / with a block every row has exited computing its keys and values alone
(`_KVOnly`, the default). ``qwen3_sample_vs_generate_b1``: exit sampling tokens/s over
``bridge.generate`` tokens/s on the Qwen3-0.6B-shaped model, batch 1, heads set to draw exits
saving ``qwen3_sample_layers_saved`` of the blocks (see `sampling_vs_generate`; the shipped
model's figure is bench_exits' ``sample_vs_generate_b1``).

    python benchmarks/bench_skip.py [--quick] [--device cpu|cuda] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import compare, main, paired_ratio, timings  # noqa: E402

RATES = (0, 25, 50, 75)


def qwen3_config(n_layers: int = 28):
    """A transformers `Qwen3Config` with Qwen3-0.6B's shapes and the eetools tokenizer's special ids."""
    from transformers import Qwen3Config

    from eetools.io.tokenizer import build_tokenizer

    tok = build_tokenizer()
    return Qwen3Config(
        vocab_size=151_936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=n_layers,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=4096 + 512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def qwen3_06b_shaped(device: str = "cpu", dtype: str = "float32", n_layers: int = 28):
    """A random bridge with Qwen3-0.6B's shapes; no weights downloaded or written."""
    from transformers import Qwen3ForCausalLM

    import eetools
    from eetools.io.tokenizer import build_tokenizer

    tok = build_tokenizer()
    cfg = qwen3_config(n_layers)
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(cfg).to(dtype=getattr(torch, dtype)).eval()
    folder = tempfile.mkdtemp(prefix="qwen3-0.6b-shaped-")
    cfg.save_pretrained(folder)
    tok.save_pretrained(folder)
    bridge = eetools.load_model(folder, device=device, dtype=dtype, hf_model=hf.to(device))
    bridge.cfg.default_prepend_bos = True
    return bridge


def exit_model_at(bridge, rate: int):
    """Heads that send every generated token out at the layer that skips `rate` % of the blocks."""
    import eetools

    L = int(bridge.cfg.n_layers)
    layer = max(1, min(L - 1, round(L * (100 - rate) / 100))) if rate else L // 2
    ee = eetools.attach_exit_heads(bridge, layers=[layer])
    with torch.no_grad():
        ee.heads[0].net[-1].weight.zero_()
        ee.heads[0].net[-1].bias.fill_(30.0 if rate else -30.0)  # always / never exit
    return ee


@contextlib.contextmanager
def _kv_only(on: bool):
    """With `on` False, blocks every row has exited skip per component (`_RowSkip`), not as a whole (`_KVOnly`)."""
    from eetools.core.fast import skipping

    support = skipping.kv_only_support
    if not on:
        skipping.kv_only_support = lambda layer: False
    try:
        yield
    finally:
        skipping.kv_only_support = support


def measure(bridge, new_tokens: int, repeats: int, prefix: str = "") -> dict:
    """Seconds per generated token for skip / mask / off at each rate, and their ratios."""
    prompt = "Q: 48213+9175\n"
    out = {}
    for rate in RATES:
        ee = exit_model_at(bridge, rate)

        def run(bypass: bool = True, kv_only: bool = True, **kw):
            # a hook that changes nothing keeps the decode on the bridge's components (`eetools.core.fast.bypass`)
            noop = [] if bypass else [("blocks.0.hook_resid_pre", lambda resid, hook: None)]

            def call():
                with ee.model.hooks(fwd_hooks=noop), _kv_only(kv_only):
                    return ee.generate(prompt, new_tokens, temperature=0, seed=0, **kw)

            return call

        r = ee.generate(prompt, new_tokens, temperature=0, seed=0, skip="compute")
        saved = 1 - r.batch_compute
        # the no-exit run writes other tokens and may stop at EOS at another length: compare per token
        n = {
            "compute": float(r.mask.sum()),
            "off": float(ee.generate(prompt, new_tokens, temperature=0, mode="off").mask.sum()),
        }
        n["mask"] = n["compute"]  # same tokens as with skipping (tested)
        n["compute_bridge"] = n["compute_components"] = n["compute"]
        t = compare(
            {
                "compute": run(skip="compute"),
                "compute_bridge": run(False, skip="compute"),
                "compute_components": run(kv_only=False, skip="compute"),
                "mask": run(skip="mask"),
                "off": run(mode="off"),
            },
            repeats=repeats,
        )
        per = {k: t[k] / n[k] for k in t}
        out[f"{prefix}skip_speedup_{rate}"] = per["mask"] / per["compute"]
        out[f"{prefix}skip_only_speedup_{rate}"] = per["mask"] / per["compute_bridge"]
        out[f"{prefix}skip_vs_plain_{rate}"] = per["off"] / per["compute"]
        out[f"{prefix}kv_only_speedup_{rate}"] = per["compute_components"] / per["compute"]
        out[f"{prefix}layers_saved_{rate}"] = float(saved)
    return out


def sampling_vs_generate(bridge, new_tokens: int, repeats: int, c: float = 0.12) -> dict:
    """Exit sampling (``mode="sample"``, ``skip="compute"``) against `bridge.generate`, tokens/s, batch 1.

    The heads (default exit layers) have zero weights and a bias giving every layer the same
    conditional exit probability `c`, so exits are drawn, not prescribed, and save about
    ``qwen3_sample_layers_saved`` of the blocks (0.12: 30 % in expectation on 28 blocks, about the
    shipped heads' share with sampled exits; 24 tokens draw it with a spread of about 6 points).
    What it measures is the exit machinery's cost against what skipping saves on a model whose
    blocks cost more than the Python around them.
    """
    import math

    import eetools

    ee = eetools.attach_exit_heads(bridge)
    with torch.no_grad():
        for h in ee.heads:
            h.net[-1].weight.zero_()
            h.net[-1].bias.fill_(math.log(c / (1 - c)))
    prompt = "Q: 48213+9175\n"

    def ours():
        return ee.generate(prompt, new_tokens, mode="sample", seed=0, skip="compute")

    def theirs():
        return bridge.generate(
            prompt, max_new_tokens=new_tokens, do_sample=True, stop_at_eos=False, verbose=False, prepend_bos=True
        )

    r = ours()
    t = timings({"ours": ours, "theirs": theirs}, repeats=repeats)
    # ours stops at EOS (a random model may write it): compare tokens per second
    return {
        "qwen3_sample_vs_generate_b1": float(r.mask.sum()) / new_tokens / paired_ratio(t, "ours", "theirs"),
        "qwen3_sample_layers_saved": 1 - r.batch_compute,
    }


def run(quick: bool = False, device: str = "cpu", dtype: str = "float32") -> dict:
    import eetools

    out = measure(eetools.load_model(device=device, dtype=dtype), 16 if quick else 48, 3 if quick else 5, "tiny_")
    big = qwen3_06b_shaped(device, dtype, n_layers=8 if quick else 28)
    out.update(measure(big, 8 if quick else 24, 2 if quick else 3))
    out.update(sampling_vs_generate(big, 8 if quick else 24, 2 if quick else 5))
    del big
    return out


if __name__ == "__main__":
    main(run)

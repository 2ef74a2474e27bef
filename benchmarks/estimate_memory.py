"""Peak tensor memory of a calibration step and an RL step for a Qwen3 shape, without allocating the model.

The real eetools code runs under `torch._subclasses.fake_tensor.FakeTensorMode`: every tensor has its
shape, dtype and device but no data, so a 4B-shaped model's calibration step "runs" on a laptop in
seconds. A `TorchDispatchMode` on top (`PeakMemory`) counts the bytes of every storage an operation
creates while it is alive (weakref finalizers on the storages, each storage once, views and in-place
results not counted again) and keeps the peak: the *tensor* memory of the step above what was alive
before it, as ``torch.cuda.max_memory_allocated`` would count it. Not counted: the CUDA caching
allocator's rounding and fragmentation, attention kernels' workspaces, the CUDA context (~0.5 GiB).

Data-dependent values (a sequence's length read back with ``int(...)``, ``torch.unique`` of the
prompts, masks) are computed for real: tensors made from the real token ids and masks keep a real
"shadow" copy as long as they stay small (`SHADOW_ELEMENTS`), so every length, chunk and branch the
code takes is the one a real run would take. A value that depends on the model's (fake) numbers has
no real copy; it gets the branch that keeps most memory (``bool`` -> True, e.g. "some position exits
at this layer"; floats -> 0.0, only read by the step's statistics) and is listed in the output.

Fake tensors are CPU tensors here (a CPU-only torch cannot make fake CUDA tensors of every kind); the
bytes are the same, and the bridge runs its eager attention on both devices.

- ``weights``: the base model's parameters (each storage once; tied embeddings once).
- ``calib RxT``: one `calibration_step` of R sequences of T tokens, one per micro-batch,
  `exit_samples` 4, default exit layers, LoRA of calibration's rank, activation checkpointing on
  (`--no-ckpt` turns it off), as `benchmarks/bench_gpu_scale.py` runs it.
- ``rl PxKxN``: `rl_terms` and its backward, as `rl_step` runs them, on P prompts x K rollouts of N
  new tokens every one of which runs to the cap (the worst case), each token's exit drawn
  uniformly from the exit layers and no exit. The rollouts are built directly (a decode of 64 x 1,024 tokens under fake tensors would
  only add the KV cache, computed exactly instead): ``decode`` = K and V of every block for every
  rollout's prompt and new tokens. The cache is freed before the loss runs, so the step's peak is
  the larger of the two.

    python benchmarks/estimate_memory.py [--shape 0.6b|1.7b|4b|8b] [--dtype bfloat16] [--tokens 1024 2048 4096]
        [--rows 1] [--rl 8 8 1024] [--rl-micro-batches 1 2 4] [--no-ckpt] [--json F]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import os
import random
import sys
import tempfile
import traceback
import weakref
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.weak import WeakIdKeyDictionary
from tqdm.auto import tqdm

GIB = 2**30
VOCAB = 151_936
PROMPT = "Q: 48213+9175\n"
SHADOW_ELEMENTS = 2**22
"""Largest result (elements) computed for real beside its fake tensor: ids, masks, lengths, exit layers."""

SHAPES = {
    # Qwen3 shapes (config.json of each hub model): blocks, d_model, MLP width, query / key-value heads, head size
    "0.6b": dict(layers=28, d=1024, mlp=3072, heads=16, kv=8, head_dim=128, tied=True),
    "1.7b": dict(layers=28, d=2048, mlp=6144, heads=16, kv=8, head_dim=128, tied=True),
    "4b": dict(layers=36, d=2560, mlp=9728, heads=32, kv=8, head_dim=128, tied=True),
    "8b": dict(layers=36, d=4096, mlp=12288, heads=32, kv=8, head_dim=128, tied=False),
    # bench_memory.py's model: Qwen3-0.6B cut to 8 blocks (the validation against measured peaks)
    "0.6b-8": dict(layers=8, d=1024, mlp=3072, heads=16, kv=8, head_dim=128, tied=True),
    # a toy of the same code path (tests)
    "test": dict(layers=4, d=64, mlp=128, heads=4, kv=2, head_dim=16, tied=True),
}


def qwen3_config(shape: str):
    """A transformers `Qwen3Config` of `shape` with the eetools tokenizer's special ids."""
    from transformers import Qwen3Config

    from eetools.io.tokenizer import build_tokenizer

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    s, tok = SHAPES[shape], build_tokenizer()
    return Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=s["d"],
        intermediate_size=s["mlp"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv"],
        head_dim=s["head_dim"],
        max_position_embeddings=16_384,
        tie_word_embeddings=s["tied"],
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def qwen3_parameter_bytes(shape: str, dtype: torch.dtype) -> int:
    """Bytes of a Qwen3 model's parameters from its shape alone (the unembedding once if tied)."""
    s = SHAPES[shape]
    d, q, kv = s["d"], s["heads"] * s["head_dim"], s["kv"] * s["head_dim"]
    block = (
        d * q + 2 * d * kv + q * d + 2 * s["head_dim"] + 3 * d * s["mlp"] + 2 * d
    )  # attention, q/k norms, MLP, norms
    embed = VOCAB * d * (1 if s["tied"] else 2)
    return (embed + s["layers"] * block + d) * torch.tensor([], dtype=dtype).element_size()


def kv_cache_bytes(shape: str, dtype: torch.dtype, rows: int, tokens: int) -> int:
    """K and V of every block for `rows` sequences of `tokens` tokens: 2 x layers x kv heads x head size x bytes x tokens."""
    s = SHAPES[shape]
    per_token = 2 * s["layers"] * s["kv"] * s["head_dim"] * torch.tensor([], dtype=dtype).element_size()
    return per_token * rows * tokens


class PeakMemory(TorchDispatchMode):
    """Live and peak bytes of the storages created under it, with real shadows of small data-dependent tensors.

    Use inside a `FakeTensorMode` (entered after it, so that it sees every operation first). A storage
    an operation returns that none of its inputs had is new: its bytes count until it is freed.
    """

    def __init__(self, fake_mode: FakeTensorMode | None):
        super().__init__()
        self.fake = fake_mode
        self.live = self.peak = 0
        self.shadow = WeakIdKeyDictionary()  # fake tensor -> a real tensor of the same values
        self.guesses: collections.Counter = collections.Counter()  # (call site, guess) -> times

    def reset_peak(self) -> int:
        """Start a new peak from the bytes alive now; returns them."""
        self.peak = self.live
        return self.live

    # -- shadows ---------------------------------------------------------------------------------
    def _real(self, t: torch.Tensor) -> torch.Tensor | None:
        r = self.shadow.get(t) if isinstance(t, FakeTensor) else t
        if r is None or getattr(r.untyped_storage(), "_ee_stale", False):
            return None
        return r

    def _guess(self, t: torch.Tensor):
        """A value the fake numbers cannot give: the branch that keeps most memory."""
        site = next(
            (
                f"{os.path.relpath(f.filename)}:{f.lineno}"
                for f in reversed(traceback.extract_stack())
                if "/eetools/" in f.filename
                or (
                    f.filename.endswith("estimate_memory.py")
                    and f.name not in ("_guess", "_guess_shape", "__torch_dispatch__")
                )
            ),
            "?",
        )
        if t.dtype == torch.bool:
            value = True
        elif t.dtype.is_floating_point:
            value = 0.0
        else:
            raise RuntimeError(f"an integer read back from model outputs at {site}: the estimate cannot guess it")
        self.guesses[(site, value)] += 1
        return value

    def _guess_shape(self, func, args, kwargs, inputs, reals):
        """An operation whose result's size depends on fake numbers (a boolean mask of sampled exits):
        run it on stand-ins, masks all True and numbers 0, so its result has the largest size it can have."""
        if any(x.numel() > SHADOW_ELEMENTS for x, r in zip(inputs, reals) if r is None):
            raise RuntimeError(f"{func} needs the values of a large fake tensor: the estimate cannot guess them")
        self._guess(torch.empty(0, dtype=torch.bool))
        with unset_fake_temporarily():
            stand_in = {
                id(x): r
                if r is not None
                else torch.ones(x.shape, dtype=x.dtype)
                if x.dtype == torch.bool
                else torch.zeros(x.shape, dtype=x.dtype)
                for x, r in zip(inputs, reals)
            }
            swap = lambda x: stand_in.get(id(x), x) if isinstance(x, torch.Tensor) else x
            real_out = func(*tree_map(swap, args), **tree_map(swap, kwargs))
        out = tree_map(lambda r: self.fake.from_tensor(r) if isinstance(r, torch.Tensor) else r, real_out)
        self._count([x for x in tree_leaves(out) if isinstance(x, torch.Tensor)], inputs)
        return out

    # -- accounting ------------------------------------------------------------------------------
    def _count(self, outs, args) -> None:
        seen = {id(a.untyped_storage()) for a in args if isinstance(a, torch.Tensor)}
        for t in outs:
            if not isinstance(t, torch.Tensor) or isinstance(t, FakeTensor) != (self.fake is not None):
                continue
            st = t.untyped_storage()
            if id(st) in seen:
                continue
            seen.add(id(st))
            if getattr(st, "_ee_counted", False):
                continue
            st._ee_counted = True
            n = st.nbytes()
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(st, self._free, n)

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        if self.fake is None:  # counting a real run (the estimate's check)
            out = func(*args, **kwargs)
            self._count([x for x in tree_leaves(out) if isinstance(x, torch.Tensor)], inputs)
            return out
        if func is torch.ops.aten._local_scalar_dense.default:
            real = self._real(args[0])
            if real is None:
                return self._guess(args[0])
            with unset_fake_temporarily():
                return real.item()
        reals = [self._real(x) for x in inputs]
        known = all(r is not None for r in reals)
        try:
            out = func(*args, **kwargs)
        except (
            torch._subclasses.fake_tensor.DynamicOutputShapeException,
            torch._subclasses.fake_tensor.DataDependentOutputException,
        ):
            if not known:
                return self._guess_shape(func, args, kwargs, inputs, reals)
            out = None  # e.g. torch.unique of the prompts: its size comes from the real values below
        leaves = [x for x in tree_leaves(out) if isinstance(x, torch.Tensor)]
        small = out is None or sum(x.numel() for x in leaves) <= SHADOW_ELEMENTS
        if known and small:
            mapping = {id(x): r for x, r in zip(inputs, reals)}
            swap = lambda x: mapping.get(id(x), x) if isinstance(x, torch.Tensor) else x
            with unset_fake_temporarily():
                real_out = func(*tree_map(swap, args), **tree_map(swap, kwargs))
            if out is None:
                out = tree_map(lambda r: self.fake.from_tensor(r) if isinstance(r, torch.Tensor) else r, real_out)
                leaves = [x for x in tree_leaves(out) if isinstance(x, torch.Tensor)]
            for f, r in zip(leaves, [x for x in tree_leaves(real_out) if isinstance(x, torch.Tensor)]):
                if isinstance(f, FakeTensor):
                    self.shadow[f] = r
        else:  # values unknown: a tensor it writes to no longer has a valid real copy
            for arg, a in zip(func._schema.arguments, args):
                if arg.alias_info is not None and arg.alias_info.is_write and isinstance(a, torch.Tensor):
                    r = self.shadow.get(a) if isinstance(a, FakeTensor) else a
                    if r is not None:
                        r.untyped_storage()._ee_stale = True  # written by an operation of unknown values
        self._count(leaves, inputs)
        return out


@contextlib.contextmanager
def _swap_fallback():
    """Let `nn.Module.to` convert fake parameters (local to this script, never in eetools).

    `Module._apply` always swaps fake parameters for their converted copies
    (`torch.utils.swap_tensors`), and the swap refuses a tensor that has a weak reference, which
    every fake `nn.Parameter` has (the fake mode's memo). The conversion is a no-op or a dtype
    change of data that does not exist, so setting ``.data`` instead is equivalent.
    """
    original = torch.utils.swap_tensors

    def swap(t1, t2):
        try:
            original(t1, t2)
        except RuntimeError as e:
            if "weakref" not in str(e):
                raise
            t1.data = t2.data

    torch.utils.swap_tensors = swap
    try:
        yield
    finally:
        torch.utils.swap_tensors = original


@dataclass
class MeteredExitModel:
    """An `EarlyExitModel` (of fake tensors, or real ones for the estimate's check), its fake mode and its memory counter."""

    ee: object
    mode: FakeTensorMode | None
    meter: PeakMemory
    shape: str
    dtype: torch.dtype
    weights: int
    """Bytes of the base model's parameters, each storage once."""
    built: int
    """Bytes alive after building the bridge and attaching the heads (weights, buffers, heads)."""

    @contextlib.contextmanager
    def running(self):
        with self.mode or contextlib.nullcontext(), self.meter, _swap_fallback():
            yield


def exit_model(shape: str, dtype: str | torch.dtype = "bfloat16", fake: bool = True) -> MeteredExitModel:
    """A bridge of `shape` built from its config with eetools' default exit heads: fake tensors, or real
    random weights with ``fake=False`` (small shapes only: the check of the estimate against a real run)."""
    import eetools
    from eetools.io.tokenizer import build_tokenizer

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    cfg = qwen3_config(shape)
    folder = tempfile.mkdtemp(prefix=f"qwen3-{shape}-shaped-")
    cfg.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    meter = PeakMemory(mode)
    with mode or contextlib.nullcontext(), meter, _swap_fallback():
        from transformers import Qwen3ForCausalLM

        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # made in `dtype`: no float32 copy to convert
        try:
            torch.manual_seed(0)
            hf = Qwen3ForCausalLM(cfg).eval()
        finally:
            torch.set_default_dtype(default)
        bridge = eetools.load_model(folder, device="cpu", dtype=dtype, hf_model=hf)
        bridge.cfg.default_prepend_bos = True
        storages = {id(p.untyped_storage()): p.untyped_storage().nbytes() for p in bridge.parameters()}
        ee = eetools.attach_exit_heads(bridge)
    return MeteredExitModel(ee, mode, meter, shape, dtype, sum(storages.values()), meter.live)


def _text(n: int, seed: int) -> str:
    """`n` characters the char-level tokenizer maps to `n` tokens (as bench_gpu_scale writes them)."""
    rng = random.Random(seed)
    return "".join(rng.choice("0123456789+= abcdefghij\n") for _ in range(n))


def calibration_peak(fm: MeteredExitModel, rows: int, tokens: int, ckpt: bool = True) -> int:
    """Peak bytes above the loaded model of one `calibration_step` of `rows` x `tokens`, one row per micro-batch."""
    from eetools.tasks.base import Example
    from eetools.train import calibration
    from eetools.train.calibration import CalibrationConfig, _trainable_parameters, calibration_step

    cfg = CalibrationConfig(batch_size=rows, micro_batches=rows, activation_checkpointing=ckpt)
    examples = [Example("bench", PROMPT, _text(tokens - len(PROMPT) - 1, i), "0", {}) for i in range(rows)]
    encode = calibration.encode_examples

    def encode_for_real(*a, **k):  # token ids and masks are real tensors, so lengths and chunks are the real ones
        with unset_fake_temporarily():
            return encode(*a, **k)

    with fm.running():
        _trainable_parameters(fm.ee, cfg)  # LoRA added here: part of the step's memory, as on a GPU
        gc.collect()  # what earlier steps left in reference cycles is not part of this one
        base = fm.meter.reset_peak()
        calibration.encode_examples = encode_for_real
        try:
            calibration_step(fm.ee, examples, cfg, 0)
        finally:
            calibration.encode_examples = encode
        peak = fm.meter.peak - base
        for p in fm.ee.trainable_parameters():  # as the optimizer's zero_grad leaves them for the next step
            p.grad = None
        return peak


def fake_rollout(fm: MeteredExitModel, prompts: int, k: int, new: int, seed: int = 0):
    """A `Rollout` of `prompts` x `k` rollouts of `new` tokens each (all of them to the cap), exits drawn at random.

    Real (small) tensors: token ids, masks and exit layers decide the loss's chunks and lengths.
    """
    from eetools.core.rollout import Rollout
    from eetools.train.rl import RLConfig

    ee, g = fm.ee, torch.Generator().manual_seed(seed)
    L, layers = ee.n_layers, list(ee.exit_layers)
    with unset_fake_temporarily():
        tok = ee.model.tokenizer
        text = [f"Q: {i}+{i}\n" for i in range(prompts) for _ in range(k)]
        enc = [tok(t, add_special_tokens=False)["input_ids"] for t in text]
        p = max(map(len, enc)) + 1
        ptok = torch.full((len(enc), p), tok.pad_token_id, dtype=torch.long)
        pmask = torch.zeros_like(ptok)
        for i, ids in enumerate(enc):  # left-padded, <bos> first
            ptok[i, p - len(ids) - 1 :] = torch.tensor([tok.bos_token_id, *ids])
            pmask[i, p - len(ids) - 1 :] = 1
        b = len(enc)
        choices = torch.tensor([*layers, L])
        exits = choices[torch.randint(0, len(choices), (b, new), generator=g)]
        exits[:, 0] = L  # the first generated token is always predicted at full depth
        return Rollout(
            prompts=text,
            prompt_tokens=ptok,
            prompt_mask=pmask,
            tokens=torch.randint(0, VOCAB, (b, new), generator=g),
            mask=torch.ones(b, new, dtype=torch.bool),
            exit_layers=exits,
            token_logprobs=torch.zeros(b, new),
            exit_logprobs=torch.zeros(b, new),
            exit_probs=torch.full((b, new, len(layers)), 0.5),
            text=[""] * b,
            str_tokens=[[] for _ in range(b)],
            prompt_str_tokens=[[] for _ in range(b)],
            n_layers=L,
            layers=layers,
            rule=RLConfig().exit_rule(),
        )


def rl_peak(fm: MeteredExitModel, prompts: int, k: int, new: int, ckpt: bool = True) -> tuple[int, int]:
    """``(loss bytes, decode bytes)``: peak above the loaded model of `rl_terms` and its backward on a
    rollout batch of `prompts` x `k` x `new` tokens, and the KV cache of decoding it."""
    from eetools.core.adapters import add_lora, lora_layers
    from eetools.train.calibration import CalibrationConfig
    from eetools.train.rl import RLConfig, rl_terms

    cfg = RLConfig(k=k, prompts_per_step=prompts, activation_checkpointing=ckpt)
    rollout = fake_rollout(fm, prompts, k, new)
    with unset_fake_temporarily():
        rewards = torch.tensor([float(i % 2) for i in range(prompts * k)])
    decode = kv_cache_bytes(fm.shape, fm.dtype, prompts * k, rollout.prompt_tokens.shape[1] + new)
    with fm.running():
        if not lora_layers(fm.ee):
            r = CalibrationConfig().lora_r
            add_lora(fm.ee, r=r, alpha=2 * r, seed=0)
        for p in fm.ee.trainable_parameters():
            p.requires_grad_(True)
        gc.collect()  # what earlier steps left in reference cycles is not part of this one
        base = fm.meter.reset_peak()
        objective, per = rl_terms(
            fm.ee, rollout, rewards, k, cfg.lam, cfg.beta, checkpoint_blocks=ckpt, exit_cost=cfg.exit_cost, cap=new
        )
        if bool((per["adv"] != 0).any()):  # as `rl_step` runs it
            (objective / (prompts * k)).backward()
        loss = fm.meter.peak - base
    for p in fm.ee.trainable_parameters():
        p.grad = None
    return loss, decode


def estimate(
    shape: str = "4b",
    dtype: str = "bfloat16",
    tokens=(1024, 2048, 4096),
    rows: int = 1,
    rl=(8, 8, 1024),
    rl_micro_batches=(1, 2, 4),
    ckpt: bool = True,
    progress: bool = True,
) -> dict[str, float]:
    """GiB of the weights, of each calibration step and of each RL step of `shape` (see the module docstring)."""
    fm = exit_model(shape, dtype)
    out = {"weights_gib": fm.weights / GIB, "loaded_gib": fm.built / GIB}
    prompts, k, new = rl
    bad = [m for m in rl_micro_batches if m < 1 or prompts % m]
    if bad:
        raise ValueError(f"--rl-micro-batches {bad} do not divide the {prompts} prompts of --rl; give divisors of it")
    jobs = [("calib", t) for t in tokens] + [("rl", m) for m in rl_micro_batches]
    for kind, n in tqdm(jobs, desc=f"estimate {shape}", disable=not progress):
        if kind == "calib":
            out[f"calib_{rows}x{n}_gib"] = calibration_peak(fm, rows, n, ckpt) / GIB
        else:
            loss, decode = rl_peak(fm, prompts // n, k, new, ckpt)
            tag = f"rl_{prompts}x{k}x{new}_mb{n}"
            out[f"{tag}_loss_gib"], out[f"{tag}_decode_gib"] = loss / GIB, decode / GIB
            out[f"{tag}_gib"] = max(loss, decode) / GIB
    for (site, value), times in sorted(fm.meter.guesses.items()):
        print(f"guessed {value!r} for a value of the fake model's numbers at {site} ({times}x)", file=sys.stderr)
    return out


def main(argv=None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="4b")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--tokens", type=int, nargs="*", default=[1024, 2048, 4096], help="calibration sequence lengths")
    ap.add_argument(
        "--rows",
        type=int,
        default=1,
        help="calibration sequences per step, one per micro-batch (the peak of 8 is that of 1)",
    )
    ap.add_argument("--rl", type=int, nargs=3, default=[8, 8, 1024], metavar=("PROMPTS", "K", "NEW"))
    ap.add_argument("--rl-micro-batches", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--ckpt", action=argparse.BooleanOptionalAction, default=True, help="activation checkpointing")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    a = ap.parse_args(argv)
    if a.rows < 1 or any(t < len(PROMPT) + 2 for t in a.tokens) or min(a.rl) < 1:
        ap.error(f"--rows and --rl must be >= 1 and --tokens >= {len(PROMPT) + 2}")
    res = estimate(a.shape, a.dtype, tuple(a.tokens), a.rows, tuple(a.rl), tuple(a.rl_micro_batches), a.ckpt)
    for key, v in res.items():
        print(f"{key:36s} {v:8.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()

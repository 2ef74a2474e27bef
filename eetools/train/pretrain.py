"""Train the tiny reasoner from scratch on a mixture of eetools' tasks.

The model is a Hugging Face `Qwen3ForCausalLM` (the paper's model family) with a
character-level tokenizer. Training runs on the HF model directly (it is what the
bridge wraps); the result is saved with `save_pretrained` so that
`eetools.load_model(folder)` boots it through TransformerLens like any hub model.

Reproducible from a seed: batch `s` is drawn from the tasks with seed ``(seed, s)``, so
the data position is the step. Checkpoints (weights, optimizer, scheduler, step, RNG
states) are written atomically every `checkpoint_every` steps and a rerun with the same
`out` folder resumes from the last one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from eetools import tasks as task_lib
from eetools.core.options import validate_config
from eetools.io.checkpoints import load_tensors, save_json, save_tensors
from eetools.io.tokenizer import build_tokenizer
from eetools.train.loop import TrainLoop
from eetools.train.state import RunFiles


@dataclass
class PretrainConfig:
    """Configuration of `pretrain` (every field is a command-line option of ``eetools pretrain``)."""

    # what each field may be, beyond its type (`eetools.core.options.validate_config`)
    LIMITS: ClassVar[dict] = {
        "steps": ">= 1",
        "batch_sizes": ">= 1",
        "lr": "> 0",
        "weight_decay": ">= 0",
        "n_layers": ">= 1",
        "d_model": ">= 1",
        "n_heads": ">= 1",
        "n_kv_heads": ">= 1",
        "d_mlp": ">= 1",
        "n_ctx": ">= 1",
        "checkpoint_every": ">= 1: steps between checkpoints",
        "threads": ">= 1: torch CPU threads",
    }
    out: str = "runs/pretrain"
    """Folder for checkpoints and the final HF-format model (``<out>/model``)."""
    tasks: list[str] = field(default_factory=lambda: ["addition", "tom"])
    """Tasks of the mixture; batches cycle through them in turn."""
    steps: int = 3600
    """Optimizer steps."""
    batch_sizes: dict[str, int] = field(default_factory=lambda: {"addition": 32, "tom": 16})
    """Sequences per step, per task (ToM stories are ~4x longer than sums)."""
    lr: float = 2e-3
    """Peak learning rate of the one-cycle schedule (AdamW)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    seed: int = 0
    """Seed of the initial weights and of the data stream."""
    n_layers: int = 8
    """Number of transformer blocks."""
    d_model: int = 128
    """Residual stream width."""
    n_heads: int = 4
    """Attention heads (head_dim = d_model / n_heads)."""
    n_kv_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    d_mlp: int = 384
    """MLP hidden width."""
    n_ctx: int = 512
    """Context length."""
    checkpoint_every: int = 250
    """Steps between checkpoints."""
    threads: int = 2
    """torch CPU threads (fixed for reproducibility)."""
    init: str = ""
    """Start from this HF-format model folder instead of random weights (continued training)."""
    grow: bool = False
    """With ``init`` from a shallower model of the same width: insert identity blocks to reach
    ``n_layers`` (see `grow_blocks`), so training continues from the same function with more depth."""


def model_config(cfg: PretrainConfig, tokenizer):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.d_model // cfg.n_heads,
        max_position_embeddings=cfg.n_ctx,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def encode_batch(examples: list[task_lib.Example], tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``<bos> prompt reasoning <eos>`` ids, attention mask and loss mask.

    The loss covers every real next-token (prompt included: predicting the story teaches
    who is in the room), never padding.
    """
    seqs = [tokenizer(e.text)["input_ids"] + [tokenizer.eos_token_id] for e in examples]
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask, mask.clone()


def batch_for_step(cfg: PretrainConfig, step: int) -> list[task_lib.Example]:
    name = cfg.tasks[step % len(cfg.tasks)]
    return task_lib.get(name).sample(cfg.batch_sizes.get(name, 32), seed=cfg.seed * 1_000_003 + step)


def grow_blocks(state: dict[str, torch.Tensor], n_old: int, n_new: int) -> dict[str, torch.Tensor]:
    """A Qwen3 state dict with ``n_new - n_old`` identity blocks inserted, spread evenly.

    Each new block is a copy of the block before it with ``o_proj`` and ``down_proj``
    zeroed: it adds nothing to the residual stream, so the grown model computes exactly
    what the old one did (depth growth as in Net2Net / "stacking"), and training gives the
    new blocks something to do. For 8 -> 12 the new blocks follow old blocks 1, 3, 5 and 7.
    """
    if not 0 < n_old <= n_new:
        raise ValueError(f"can only grow {n_old} blocks to at least as many, got {n_new}")
    extra = n_new - n_old
    after = {round((j + 1) * n_old / extra) - 1 for j in range(extra)} if extra else set()
    if len(after) != extra:
        raise ValueError(f"cannot spread {extra} new blocks over {n_old} (at most one after each); grow in stages")
    order = [(i, fresh) for i in range(n_old) for fresh in ((False, True) if i in after else (False,))]
    grown = {k: v for k, v in state.items() if not k.startswith("model.layers.")}
    for j, (i, fresh) in enumerate(order):
        prefix = f"model.layers.{i}."
        for k, v in state.items():
            if k.startswith(prefix):
                name = k[len(prefix) :]
                zero = fresh and name in ("self_attn.o_proj.weight", "mlp.down_proj.weight")
                grown[f"model.layers.{j}.{name}"] = torch.zeros_like(v) if zero else v.clone()
    return grown


def _load_init(model, folder: Path, grow: bool = False) -> None:
    """Load ``--init`` weights, refusing a model of another shape instead of half-loading it."""
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(
            f"--init {folder}: no model.safetensors there; pass an HF-format model "
            f"folder such as <out>/model of an earlier `eetools pretrain`"
        )
    state = load_tensors(weights)
    if grow:
        n_old = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("model.layers."))
        state = grow_blocks(state, n_old, model.config.num_hidden_layers)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(
            f"--init {folder} does not fit the configured model (match --n-layers, "
            f"--d-model, --n-heads, --n-kv-heads, --d-mlp to its config.json): "
            f"{str(e).splitlines()[-1].strip()}"
        ) from None
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise ValueError(
            f"--init {folder} does not fit the configured model (match --n-layers and the "
            f"other sizes to its config.json, or pass --grow to add blocks): missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.tie_weights()


def check_shape(cfg: PretrainConfig, tokenizer=None) -> None:
    """Refuse, before training, a model shape attention cannot use or a context the tasks' sequences overflow."""
    if cfg.d_model % cfg.n_heads:
        raise ValueError(f"d_model ({cfg.d_model}) must be a multiple of n_heads ({cfg.n_heads}): heads split d_model")
    if cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(
            f"n_heads ({cfg.n_heads}) must be a multiple of n_kv_heads ({cfg.n_kv_heads}): each key/value head "
            f"serves n_heads / n_kv_heads query heads; e.g. --n-kv-heads 1"
        )
    tokenizer = tokenizer or build_tokenizer()
    for name in cfg.tasks:
        longest = max(len(tokenizer(e.text).input_ids) + 2 for e in task_lib.get(name).sample(64, seed="n_ctx"))
        if longest > cfg.n_ctx:
            raise ValueError(
                f"n_ctx {cfg.n_ctx} is shorter than {name}'s sequences (up to about {longest} tokens); "
                f"use --n-ctx {2 ** math.ceil(math.log2(longest))} or more"
            )


def pretrain(cfg: PretrainConfig, progress: bool = True, device: str = "cpu", dtype: str | None = None) -> Path:
    """Train (or resume) and save the model; returns the HF-format model folder.

    Weights and optimizer state stay float32 on `device`; ``dtype="bfloat16"`` runs the
    forward under autocast (mixed precision), the usual choice on a GPU.
    """
    from transformers import Qwen3ForCausalLM

    validate_config(cfg)
    for name in cfg.tasks:
        task_lib.get(name)  # an unknown task fails here, not at its first batch
    check_shape(cfg)
    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    torch.set_num_threads(cfg.threads)
    device = torch.device(device)
    amp = getattr(torch, dtype) if dtype else None
    out = Path(cfg.out)
    tokenizer = build_tokenizer()
    torch.manual_seed(cfg.seed)
    model = Qwen3ForCausalLM._from_config(model_config(cfg, tokenizer), attn_implementation="sdpa")
    if cfg.init:
        _load_init(model, Path(cfg.init), grow=cfg.grow)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.05)
    files = RunFiles(
        out / "checkpoint",
        cfg,
        resumable=("out", "checkpoint_every"),
        save_model=lambda folder: save_tensors(model.state_dict(), folder / "model.safetensors"),
        load_model=lambda folder: model.load_state_dict(load_tensors(folder / "model.safetensors"), strict=True),
        meta={"kind": "pretrain"},
    )
    # trainer.json keeps the last step's loss, not the history
    loop = TrainLoop(
        list(model.parameters()),
        opt,
        cfg,
        files,
        name="pretraining",
        desc="pretrain",
        scheduler=sched,
        progress=progress,
        records=lambda history: {"loss": history[-1]["loss"]} if history else {},
    )
    loop.resume()
    model.train()
    loop.run(
        functools.partial(pretrain_step, model, tokenizer, cfg, device, amp),
        postfix=lambda row: {"loss": f"{row['loss']:.4f}", "task": cfg.tasks[(row["step"] - 1) % len(cfg.tasks)]},
    )
    final = out / "model"
    model.eval().to("cpu")
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    write_model_card(final, cfg)
    return final


def pretrain_step(model, tokenizer, cfg: PretrainConfig, device: torch.device, amp, step: int) -> tuple[dict, bool]:
    """Next-token loss of step `step`'s batch, its backward and gradient clipping; the history row, and True."""
    ids, attn, lmask = (t.to(device) for t in encode_batch(batch_for_step(cfg, step), tokenizer))
    with torch.autocast(device.type, dtype=amp, enabled=amp not in (None, torch.float32)):
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    )
    m = lmask[:, 1:].reshape(-1).float()
    loss = (nll * m).sum() / m.sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    return {"step": step + 1, "loss": loss.item()}, True


def write_model_card(folder: Path, cfg: PretrainConfig) -> None:
    """``eetools_model.json``: how the model was trained; also tells `load_model` to prepend <bos>."""
    save_json(
        {"trained_by": "eetools pretrain", "config": dataclasses.asdict(cfg), "prepend_bos": True, "tasks": cfg.tasks},
        Path(folder) / "eetools_model.json",
    )

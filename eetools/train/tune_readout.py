"""Tuning a readout: `tune_readout` trains a `TunedLens` by the tuned-lens recipe, the model frozen.

Belrose et al. 2023 (AlignmentResearch/tuned-lens): for each layer ``l`` the translator's readout
``unembed(ln_final(h_l + A_l h_l + b_l))`` is trained to match the model's own final distribution
``q``: the loss is ``KL(q || lens_l)``, averaged over the trained positions and then over layers.
The model itself is frozen (no gradient reaches it; its parameters do not even track one while
the lens trains), so the lens learns to read the residual the model already has; the translators
start at zero, i.e. at the logit lens. Each step runs the model once without exits (adapters as
they are) capturing the residual entering every tuned layer, and reads the final distribution out
of the last block's residual.

Runs on the project's one training loop (`eetools.train.loop.TrainLoop`: resume, progress,
atomic checkpoints holding the readout with the base model's fingerprint, `save_readout`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from eetools.core.encoding import encode_sequences
from eetools.core.lens import _split, capturing, lens_logits
from eetools.core.lenses import TunedLens
from eetools.core.options import validate_config
from eetools.train.loop import TrainLoop
from eetools.train.state import RunFiles

ROWS_PER_CHUNK = 256
"""Positions read out (vocabulary-sized) at a time in the loss: its backward runs per chunk and layer."""


@dataclass
class TuneReadoutConfig:
    """Settings of `tune_readout` (each field is an ``eetools tune-lens`` option)."""

    LIMITS: ClassVar[dict] = {
        "steps": ">= 0",
        "batch_size": ">= 1",
        "lr": "> 0",
        "weight_decay": ">= 0",
        "checkpoint_every": ">= 1: steps between checkpoints",
        "positions": ("all", "continuation"),
        "schedule": ("linear", "constant"),
    }
    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 8
    """Sequences per step (taken in order from the data, cycling)."""
    lr: float = 1e-3
    """Adam learning rate of the translators."""
    schedule: str = "linear"
    """Learning rate over the steps: "linear" (decays to zero by the last step, as tuned-lens does) or "constant"."""
    weight_decay: float = 0.0
    """AdamW weight decay (towards the logit lens: the translators start at zero)."""
    positions: str = "all"
    """Which positions train the lens: "all" (every real token of each sequence) or "continuation" (those predicting a continuation token, as exits do)."""
    seed: int = 0
    """Seed of the data order (the translators start at zero either way)."""
    checkpoint_every: int = 50
    """Steps between checkpoints (when checkpoint_dir is given)."""


@dataclass
class TuneReadoutResult:
    """A tuned readout and its training history (one row per step: loss, and KL per layer)."""

    readout: TunedLens
    history: pd.DataFrame
    config: TuneReadoutConfig = field(default_factory=TuneReadoutConfig)


def _pairs(data) -> list[tuple[str, str]]:
    """``(prompt, continuation)`` pairs from strings (a whole text, continuation empty), pairs or `Example`s."""
    out = []
    for i, d in enumerate(data):
        if isinstance(d, str):
            out.append((d, ""))
        elif isinstance(d, (tuple, list)) and len(d) == 2 and all(isinstance(x, str) for x in d):
            out.append((d[0], d[1]))
        elif hasattr(d, "prompt") and hasattr(d, "reasoning"):
            out.append((d.prompt, d.reasoning))
        else:
            raise TypeError(
                f"data item {i} is a {type(d).__name__}: give texts (str), (prompt, continuation) pairs or Examples"
            )
    if not out:
        raise ValueError("tune_readout needs data: no texts, pairs or examples were given")
    return out


@contextlib.contextmanager
def _frozen(bridge):
    """The bridge's parameters track no gradient inside (restored after): only the translators learn."""
    was = [(p, p.requires_grad) for p in bridge.parameters()]
    for p, _ in was:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in was:
            p.requires_grad_(r)


@torch.no_grad()
def lens_batch(model, ids: Int[Tensor, "b pos"], attn: Tensor, rows: tuple[Tensor, Tensor], layers: Sequence[int]):
    """``({layer: residual entering it [n, d_model]}, final log-probs [n, vocab])`` at `rows` of one plain forward."""
    _, bridge = _split(model)
    L = int(bridge.cfg.n_layers)
    with capturing(model, [*layers, L], rows=rows, norm_shortcut=True) as store:
        bridge(ids, attention_mask=attn, return_type="logits")
        store = dict(store)
    final = (
        torch.cat(
            [
                lens_logits(model, store[L][s : s + ROWS_PER_CHUNK]).float().log_softmax(-1)
                for s in range(0, len(rows[0]), ROWS_PER_CHUNK)
            ]
        )
        if len(rows[0])
        else store[L].new_zeros(0, int(bridge.cfg.d_vocab))
    )
    return {l: store[l] for l in layers}, final


def lens_kl(
    model, lens: TunedLens, resid: Float[Tensor, "n d_model"], layer: int, final: Float[Tensor, "n vocab"]
) -> Float[Tensor, " n"]:
    """``KL(final || lens at layer)`` per row (differentiable in the lens)."""
    lp = lens_logits(model, lens.translate(resid, layer)).float().log_softmax(-1)
    return (final.exp() * (final - lp)).sum(-1)


def tune_step(model, lens: TunedLens, pairs, cfg: TuneReadoutConfig, step: int) -> tuple[dict, bool]:
    """One step: the batch's residuals and final distribution (no gradient), then each layer's KL, backward per chunk."""
    n = len(pairs)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + (step * cfg.batch_size) // n))
    batch = [pairs[int(order[(step * cfg.batch_size + i) % n])] for i in range(cfg.batch_size)]
    ids, attn, predict = encode_sequences(model, [p for p, _ in batch], [c for _, c in batch])
    if cfg.positions == "all":
        predict = attn.bool().clone()
        predict[torch.arange(len(batch)), attn.sum(1) - 1] = False  # the last token predicts nothing here
    rows = predict.nonzero(as_tuple=True)
    resid, final = lens_batch(model, ids, attn, rows, lens.layers)
    n_rows, m = len(rows[0]), len(lens.layers)
    row = {"step": step + 1, "loss": 0.0, "tokens": n_rows}
    for l in lens.layers:
        total = 0.0
        for s in range(0, n_rows, ROWS_PER_CHUNK):
            kl = lens_kl(model, lens, resid[l][s : s + ROWS_PER_CHUNK], l, final[s : s + ROWS_PER_CHUNK])
            (kl.sum() / (n_rows * m)).backward()
            total += float(kl.detach().sum())
        row[f"kl_{l}"] = total / max(n_rows, 1)
        row["loss"] += row[f"kl_{l}"] / m
    return row, n_rows > 0


def readout_run_files(ckpt, model, lens: TunedLens, cfg: TuneReadoutConfig, start: str | None) -> RunFiles | None:
    """The `RunFiles` of tuning a readout (the lens in ``model/``, `save_readout`); None without a folder."""
    from eetools.io.exit_checkpoint import load_readout, save_readout

    if ckpt is None:
        return None

    def load(folder: Path) -> None:
        lens.load_state_dict(load_readout(folder / "model", model).state_dict())

    return RunFiles(
        Path(ckpt),
        cfg,
        save_model=lambda folder: save_readout(
            model,
            lens,
            folder / "model",
            tuning={"recipe": "KL(final || lens), model frozen", **dataclasses.asdict(cfg)},
        ),
        load_model=load,
        meta={"data": None, "kind": "tune-lens", "start": start},
    )


def tune_readout(
    model,
    data,
    *,
    layers: Sequence[int] | None = None,
    steps: int = 200,
    batch_size: int = 8,
    lr: float = 1e-3,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    start: str | None = None,
    attach: bool = True,
    **options,
) -> TuneReadoutResult:
    """Train a `TunedLens` for `model` on `data` by the tuned-lens recipe (see the module doc).

    Args:
        model: an `EarlyExitModel` (the lens is tuned at its exitable layers, and becomes its exit
            readout with `attach`) or a bare bridge (give `layers`).
        data: texts (every position trains), ``(prompt, continuation)`` pairs or `Example`s, e.g. the
            model's own greedy answers to chat prompts (``scripts/smollm2_answers.py``).
        layers: the layers to tune (default: the exitable layers).
        steps, batch_size, lr: optimisation (Adam; translators start at the logit lens).
        checkpoint_dir: where to write checkpoints; an existing one is resumed.
        start: the base model's name or folder, recorded in the checkpoint (another's is refused).
        attach: make the tuned lens `model`'s exit readout (an `EarlyExitModel` only).
        **options: other `TuneReadoutConfig` fields (schedule, weight_decay, positions, seed, checkpoint_every).

    Returns:
        A `TuneReadoutResult`: the lens and the history (``loss``, ``kl_<layer>`` per step).
    """
    unknown = set(options) - {f.name for f in dataclasses.fields(TuneReadoutConfig)}
    if unknown:
        raise TypeError(f"tune_readout() got unknown options {sorted(unknown)}")
    cfg = TuneReadoutConfig(steps=steps, batch_size=batch_size, lr=lr, **options)
    validate_config(cfg)
    ee, bridge = _split(model)
    if layers is None:
        if ee is None:
            raise ValueError(
                "tune_readout on a bare bridge needs layers=[...] (an EarlyExitModel tunes its exit layers)"
            )
        layers = ee.exit_layers
    L = int(bridge.cfg.n_layers)
    layers = [int(l) for l in layers]
    if not layers or any(not 0 <= l < L for l in layers):
        raise ValueError(f"layers must be within 0..{L - 1} (the residual entering those blocks), got {layers}")
    pairs = _pairs(data)
    device = next(bridge.parameters()).device
    lens = TunedLens(int(bridge.cfg.d_model), layers).to(device)
    opt = torch.optim.AdamW(lens.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = (
        torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(0.0, 1 - i / max(cfg.steps, 1)))
        if cfg.schedule == "linear"
        else None
    )
    files = readout_run_files(checkpoint_dir, model, lens, cfg, start)
    loop = TrainLoop(
        list(lens.parameters()),
        opt,
        cfg,
        files,
        name="tune-lens",
        desc="tune lens",
        progress=progress,
        scheduler=scheduler,
    )
    with _frozen(bridge):
        loop.resume()
        history = loop.run(
            functools.partial(tune_step, model, lens, pairs, cfg), postfix=lambda row: {"kl": f"{row['loss']:.3f}"}
        )
    if attach and ee is not None:
        ee.set_readout(lens)
    return TuneReadoutResult(readout=lens, history=pd.DataFrame(history), config=cfg)

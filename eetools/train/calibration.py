"""Stage 1: calibrating exit heads by self-distillation (docs/method.md section 6).

For each training sequence the teacher (base model: no exits, adapters off) gives final
log-probs ``q_t`` and the logit lens ``p_{l,t}`` at each exitable layer. The conditional
exit target is ``c*_{l,t} = 2 - 2*sigmoid(k * KL(q_t || p_{l,t}))`` (1 when the early
readout already matches the final one), stick-broken into a target distribution over
exits. `exit_samples` exit prescriptions are drawn from it per sequence; the student
(adapters on) runs in prescribed mode, and the loss is the mean over generated tokens of
``KL(student_t || teacher_t)`` plus the mean ``-log pi_student(sampled exit)``.

Under torchrun each process takes its shards of a step's sequences (`eetools.train.distributed`):
the exit prescriptions of shard ``g`` are drawn with ``shard_seed(seed * 7919 + step, g)``,
both loss terms are divided by the *global* number of positions they average over, and
gradients are averaged across processes, so the update is the one-process update of the
same global batch. ``micro_batches`` splits a process's share further (less memory); a run
is fixed by its seed and its number of shards (processes x micro_batches).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from eetools import tasks as task_lib
from eetools.core.encoding import CHUNK_ROWS, encode_sequences
from eetools.core.heads import exit_log_probs, stick_breaking
from eetools.core.options import validate_config
from eetools.train import distributed
from eetools.train.loop import TrainLoop, param_groups
from eetools.train.state import exit_run_files

LOGIT_ROWS = 64
"""Rows x positions per vocabulary-sized readout in the training losses: calibration and RL read the
residuals out (final norm, unembedding, log-softmax) this many at a time and reduce them to a value
per position at once, so no tensor of every position's vocabulary is kept."""


ONE_PASS_ELEMENTS = 2**24
"""Default `CalibrationConfig.one_pass_elements` (16.8 M: 64 MiB per float32 copy)."""


def position_spans(n_pos: int, n_rows: int, per_span: int | None = LOGIT_ROWS) -> list[slice]:
    """Slices of ``range(n_pos)`` holding about `per_span` rows x positions each (None: one span)."""
    step = n_pos if per_span is None else max(1, per_span // max(n_rows, 1))
    return [slice(s, min(s + step, n_pos)) for s in range(0, n_pos, max(step, 1))]


def one_pass_size(ee_model, rows: int, positions: int, exit_samples: int) -> int:
    """Vocabulary entries a calibration step of ``rows x positions`` reads out when it reads every position at once.

    ``rows * positions * vocab * ((m+1) + exit_samples)``: the teacher's log-probs at the `m`
    exitable layers and at the end, and the student's for every exit sample (all of them alive
    when the caller runs one backward; one sample's rows at a time with `backward_scale`).
    `calibration_sums` reads positions out at once when this is at most its `one_pass_elements`;
    the student's block activations do not depend on that choice. The shipped tiny reasoner
    (vocabulary 79, 7 exitable layers) at 8 sequences x 68 tokens: 0.5 M; a Qwen3 vocabulary
    (151,936) with 7 exitable layers: 1.8 M per token of one sequence, so 10 tokens exceed 2**24.
    """
    vocab = int(ee_model.model.cfg.d_vocab)
    return rows * positions * vocab * (len(ee_model.exit_layers) + 1 + exit_samples)


def exit_targets(
    teacher_logprobs: Float[Tensor, "batch pos vocab"],
    early_logprobs: Float[Tensor, "batch n_exit pos vocab"],
    kl_factor: float,
) -> Float[Tensor, "batch pos n_exit_plus_1"]:
    """Target exit distribution per position (last entry = no exit).

    ``D = KL(teacher || early)``, ``c* = 2 - 2*sigmoid(kl_factor * D)``, then stick-breaking.
    KL = 0 gives a certain exit at the first exitable layer; infinite KL gives no exit.
    """
    q = teacher_logprobs.unsqueeze(1)
    return targets_from_kl((q.exp() * (q - early_logprobs)).sum(-1), kl_factor)


def targets_from_kl(
    kl: Float[Tensor, "batch n_exit pos"], kl_factor: float
) -> Float[Tensor, "batch pos n_exit_plus_1"]:
    """`exit_targets` from the per-position ``KL(teacher || early)`` at each exitable layer."""
    if not (kl_factor > 0 and math.isfinite(kl_factor)):
        raise ValueError(f"kl_factor must be a finite number > 0, got {kl_factor}")
    cond = 2 - 2 * torch.sigmoid(kl_factor * kl.clamp(min=0))
    return stick_breaking(cond.transpose(1, 2))


@torch.no_grad()
def streamed_targets(
    ee_model, ids: Int[Tensor, "b pos"], attn: Tensor, kl_factor: float, per_span: int | None = LOGIT_ROWS
):
    """`exit_targets` of the base model (adapters off, no exits) and its final logits, streamed.

    One forward per group of rows of similar length (`length_groups`, each cut to its longest
    sequence) keeps the residuals at the exitable layers (``d_model`` wide); each chunk of
    positions (`per_span` rows x positions, `position_spans`; None: all at once) is read out
    through the final norm and unembedding, log-softmaxed in float32 and reduced to its KL at
    once. The early readouts are the exit readout's (``ee_model.readout(h, l)``: a tuned lens's
    translator at ``l``, or the logit lens), so the targets say where that readout already
    matches the final layer. Returns ``(target [b, pos, m+1], logits [b, pos, vocab])``, the
    logits in the model's dtype (as the model made them).
    """
    layers = ee_model.exit_layers
    b, t = ids.shape
    logits, kl = None, torch.zeros(b, len(layers), t, device=ids.device)
    lengths = attn.sum(1)
    for rows in length_groups(lengths):  # right-padded: each group cut to its longest sequence
        w = max(int(lengths[rows].max()), 1)
        final, _, early = ee_model.final_residual(ids[rows, :w], attn[rows, :w], capture=layers, base=True)
        for sl in position_spans(w, len(rows), per_span):
            z = ee_model.readout(final[:, sl])
            if logits is None:  # positions past a row's group width stay 0: padding, read by no loss
                logits = z.new_zeros(b, t, z.shape[-1])
            logits[rows, sl] = z
            q = z.float().log_softmax(-1)
            for i, l in enumerate(layers):
                kl[rows, i, sl] = kl_student_teacher(q, ee_model.readout(early[l][:, sl], l).float().log_softmax(-1))
    return targets_from_kl(kl, kl_factor), logits


GROUP_COST_POSITIONS = 128
"""What one more forward costs, in rows x positions of work (its set-up: hooks, attention switch), for `length_groups`."""


def length_groups(lengths: Int[Tensor, " b"], cost: int | None = None) -> list[Tensor]:
    """Rows in groups of similar length whose padded work (rows x longest) plus `cost` per group is least.

    The rows are sorted by length (longest first) and cut where that pays: a batch mixing addition
    (~45 tokens) and theory-of-mind stories (~300) runs as two forwards instead of one padded to the
    longest story. Exact, by dynamic programming over the cut points of the sorted rows; `cost`
    defaults to `GROUP_COST_POSITIONS`.
    """
    cost = GROUP_COST_POSITIONS if cost is None else cost
    order = lengths.argsort(descending=True, stable=True)
    ls = [int(x) for x in lengths[order]]
    n = len(ls)
    best, cut = [0] + [None] * n, [0] * (n + 1)  # best[j]: least cost of the first j sorted rows
    for j in range(1, n + 1):
        for i in range(j):  # rows i..j-1 in one group, padded to ls[i]
            c = best[i] + (j - i) * ls[i] + cost
            if best[j] is None or c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def kl_student_teacher(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """Per-position ``KL(student || teacher)`` from log-probs ``[..., vocab]``."""
    return (student_logprobs.exp() * (student_logprobs - teacher_logprobs)).sum(-1)


@dataclass
class CalibrationConfig:
    """Settings of `calibrate` (each field is an ``eetools calibrate`` option)."""

    # what each field may be, beyond its type (`eetools.core.options.validate_config`)
    LIMITS: ClassVar[dict] = {
        "kl_factor": "> 0: k of the exit target 2 - 2 sigmoid(k KL)",
        "exit_samples": ">= 1",
        "steps": ">= 0",
        "batch_size": ">= 1",
        "lr": "> 0",
        "adapter_lr": ">= 0: 0 means the same as lr",
        "lora_r": ">= 1",
        "continuations": ("reasoning", "greedy"),
        "max_new_tokens": ">= 1",
        "checkpoint_every": ">= 1: steps between checkpoints",
        "micro_batches": ">= 1",
        "one_pass_elements": ">= 0: 0 always streams",
    }
    kl_factor: float = 64.0
    """k in c* = 2 - 2 sigmoid(k KL): larger k, rarer exits, text closer to the base model (64 keeps the tiny reasoner's accuracy; 1 does not)."""
    exit_samples: int = 4
    """Exit prescriptions sampled from the target distribution per sequence."""
    steps: int = 500
    """Optimizer steps."""
    batch_size: int = 8
    """Sequences per step (each replicated exit_samples times)."""
    lr: float = 3e-3
    """AdamW learning rate (exit heads, and adapters unless `adapter_lr` is set)."""
    adapter_lr: float = 0.0
    """AdamW learning rate of the LoRA adapters; 0: the same as `lr`. A real model's text drifts under adapters trained at the heads' rate (SmolLM2-135M: one-digit addition from 0.75 to 0.19 accuracy after 3 steps at 3e-3); its pipeline uses 3e-5."""
    lora: bool = True
    """Train LoRA adapters on the base weights too (base weights stay frozen)."""
    lora_r: int = 4
    """LoRA rank."""
    seed: int = 0
    """Seed of the data stream, of the exit sampling and of the initial LoRA adapters (``eetools calibrate`` also initialises fresh exit heads from it)."""
    continuations: str = "reasoning"
    """Where continuations come from: "reasoning" (the task's written reasoning) or "greedy" (teacher generation)."""
    max_new_tokens: int = 96
    """Length cap of greedy teacher continuations."""
    checkpoint_every: int = 50
    """Steps between checkpoints (when checkpoint_dir is given)."""
    micro_batches: int = 1
    """Micro-batches per process per step, run one after another with gradients accumulated (less memory). Exit sampling is seeded per micro-batch: processes x micro_batches fixes a run."""
    activation_checkpointing: bool = False
    """Recompute the blocks' attention and MLP in the backward instead of keeping their activations (less memory, about a third more compute of the blocks); the same loss and gradients. Turn it on for hub models and long traces: with it a step's extra memory stays near a LoRA fine-tuning step's on the same tokens (1.10x at 256 tokens, 1.56x without; docs/speed.md). Off by default: the tiny reasoner does not need it, and it costs time."""
    one_pass_elements: int = ONE_PASS_ELEMENTS
    """Largest micro-batch whose log-probs are read out for every position at once, in vocabulary entries (`one_pass_size`: rows x positions x vocabulary x (exit layers + 1 + exit_samples)). Up to it, the teacher's and student's log-probs are computed in one pass and kept for the backward (fewer, larger operations: faster on small vocabularies such as the tiny reasoner's); above it they are streamed over chunks of positions and the student's recomputed in the backward (memory like fine-tuning's). The same loss and gradients up to float rounding; 0 always streams."""


@dataclass
class CalibrationResult:
    """A calibrated model and its training history (one row per step)."""

    ee_model: object
    history: pd.DataFrame
    config: CalibrationConfig = field(default_factory=CalibrationConfig)


def _examples_for_step(source, cfg: CalibrationConfig, step: int) -> list:
    if isinstance(source, task_lib.Task):
        return source.sample(cfg.batch_size, seed=cfg.seed * 1_000_003 + step)
    n = len(source)
    return [source[(step * cfg.batch_size + i) % n] for i in range(cfg.batch_size)]


def encode_examples(ee_model, examples: list, cfg: CalibrationConfig, step: int):
    """Token ids, attention mask and prediction mask of `examples` (`Example`s or prompt strings)."""
    if examples and isinstance(examples[0], str):
        prompts, conts = list(examples), None
    else:
        prompts = [e.prompt for e in examples]
        conts = [e.reasoning for e in examples] if cfg.continuations == "reasoning" else None
    if conts is None:
        with ee_model.adapters_disabled():
            r = ee_model.generate(
                prompts, cfg.max_new_tokens, mode="off", temperature=0, seed=cfg.seed + step, heads=False
            )
        conts = r.text
    return encode_sequences(ee_model, prompts, conts)


def _exitable(predict: Tensor) -> Tensor:
    """Positions that may exit: those that predict a continuation token, except the prompt's last."""
    exitable = predict.clone()
    exitable[torch.arange(predict.shape[0]), predict.float().argmax(1)] = False
    return exitable


def _counts(predict: Tensor, exit_samples: int) -> Tensor:
    """``[positions averaged by the KL term, positions averaged by the exit term]`` of a batch."""
    return torch.stack([predict.sum(), _exitable(predict).sum()]).float() * exit_samples


def calibration_sums(
    ee_model,
    ids: Int[Tensor, "b pos"],
    attn: Tensor,
    predict: Tensor,
    kl_factor: float,
    exit_samples: int,
    generator: torch.Generator,
    chunk_rows: int | None = CHUNK_ROWS,
    checkpoint_blocks: bool = False,
    backward_scale: tuple | None = None,
    one_pass_elements: int = ONE_PASS_ELEMENTS,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The two loss terms of one batch *summed* over their positions, and the sums behind the statistics.

    Sums add up across shards; dividing by the global counts (``sums["n_predict"]``,
    ``sums["n_exit"]``) gives the loss of the whole batch (see `calibration_step`).

    The student runs on the sequences sorted by length, `chunk_rows` at a time, each chunk cut to
    its own longest sequence (see `_student_chunks`); ``chunk_rows=None`` is one padded pass.
    Vocabulary-sized tensors exist a chunk of `LOGIT_ROWS` positions at a time (`streamed_targets`,
    `_student_kl`), except the teacher's final logits, kept once in the model's dtype and indexed
    by every exit sample. `checkpoint_blocks`: activation checkpointing (`checkpointed_blocks`).

    `backward_scale` ``(a, b)``: run the backward of ``a * kl_sum + b * nll_sum`` here, one student
    chunk at a time (the sums are additive, so the gradients are those of one backward of the
    whole), and return the sums detached. Then only one chunk's graph is alive at a time, and a
    chunk holds at most the batch's own number of rows (one exit sample's worth), so the student's
    activations are those of one forward of the batch whatever `exit_samples` is.

    `one_pass_elements`: when `one_pass_size` of the batch is at most this, the teacher's and the
    student's log-probs are read out for all positions at once and the student's kept for the
    backward, instead of `LOGIT_ROWS` rows x positions at a time and recomputed (fewer, larger
    operations: faster where the vocabulary is small). The student's chunks of rows, and so its
    block activations, are the same either way; so are the sums, up to float rounding
    (tests/unit/test_memory_paths.py).

    Returns:
        ``(kl_sum, nll_sum, sums)``: the summed ``KL(student || teacher)`` and exit NLL
        (differentiable unless `backward_scale`), and a dict of detached sums for `calibration_stats`.
    """
    L, layers = ee_model.n_layers, ee_model.exit_layers
    b, t = ids.shape
    per_span = None if one_pass_size(ee_model, b, t, exit_samples) <= one_pass_elements else LOGIT_ROWS
    target, teacher_logits = streamed_targets(ee_model, ids, attn, kl_factor, per_span)  # [b,pos,m+1], [b,pos,vocab]
    exitable = _exitable(predict)
    flat = target.reshape(-1, target.shape[-1]).cpu()
    if not bool(torch.isfinite(flat).all()):
        raise FloatingPointError(
            "the base model's log-probs are not finite (NaN or inf in its forward pass), so "
            "there are no exit targets: check its weights, or load it in float32"
        )
    draws = torch.multinomial(flat, exit_samples, replacement=True, generator=generator)  # [b*pos, S]
    layer_of = torch.tensor([*layers, L])
    sampled = layer_of[draws].reshape(b, t, exit_samples).permute(2, 0, 1).to(ids.device)  # [S,b,pos]
    sampled = torch.where(exitable.unsqueeze(0), sampled, torch.full_like(sampled, L))
    rep = lambda x: x.unsqueeze(0).expand(exit_samples, *x.shape).reshape(exit_samples * b, *x.shape[1:])
    flat_s = sampled.reshape(exit_samples * b, t)
    src = torch.arange(exit_samples * b, device=ids.device) % b  # the teacher row of each student row
    pm = rep(predict).float()
    em = rep(exitable).float()
    idx = ee_model.exit_index(flat_s)
    if backward_scale is not None and chunk_rows is not None:
        chunk_rows = min(chunk_rows, b)
    kl = torch.zeros(exit_samples * b, t, device=ids.device)
    logpi = torch.zeros(exit_samples * b, t, len(layers) + 1, device=ids.device)
    kl_sum = nll_sum = torch.zeros((), device=ids.device)
    for rows, w, kl_r, logpi_r in _student_chunks(
        ee_model, rep(ids), flat_s, rep(attn), teacher_logits, src, chunk_rows, checkpoint_blocks, per_span
    ):
        k_s = (kl_r * pm[rows, :w]).sum()
        n_s = -(logpi_r.gather(-1, idx[rows, :w].unsqueeze(-1)).squeeze(-1) * em[rows, :w]).sum()
        if backward_scale is not None:
            (backward_scale[0] * k_s + backward_scale[1] * n_s).backward()
            k_s, n_s = k_s.detach(), n_s.detach()
        kl_sum, nll_sum = kl_sum + k_s, nll_sum + n_s
        kl[rows, :w], logpi[rows, :w] = kl_r.detach(), logpi_r.detach()
    with torch.no_grad():
        e = exitable.float()
        stu = logpi.exp().reshape(exit_samples, b, t, -1)[0]
        sel = [(flat_s == l) & rep(exitable) for l in [*layers, L]]
        sums = {
            "kl": kl_sum.detach(),
            "exit_nll": nll_sum.detach(),
            "n_predict": pm.sum(),
            "n_exit": em.sum(),
            "n_exitable": e.sum(),
            "target": (target * e.unsqueeze(-1)).sum((0, 1)),
            "student": (stu * e.unsqueeze(-1)).sum((0, 1)),
            "sampled": (sampled.float() / L * exitable).sum(),
            "kl_at": torch.stack([kl[s].sum() for s in sel]),
            "n_at": torch.stack([s.sum() for s in sel]).float(),
        }
    return kl_sum, nll_sum, sums


def _student_chunks(
    ee_model,
    ids: Int[Tensor, "n pos"],
    exits: Int[Tensor, "n pos"],
    attn: Tensor,
    teacher_logits: Float[Tensor, "b pos vocab"],
    src: Int[Tensor, " n"],
    chunk_rows: int | None,
    checkpoint_blocks: bool = False,
    per_span: int | None = LOGIT_ROWS,
):
    """Student ``KL(student || teacher)`` per position and exit log-probs, run in length-sorted chunks.

    Yields ``(rows, w, kl [len(rows), w], logpi [len(rows), w, m+1])`` per chunk (differentiable).
    Row `i` is compared with the teacher's row ``src[i]``. Sequences are right-padded, so a chunk
    is cut to its longest sequence `w` (positions beyond it are padding no loss reads): a batch
    mixing short and long tasks stops paying for padding, with the one-pass result up to float
    rounding. The generator runs a chunk's forward only when the previous one is consumed, so a
    caller that runs each chunk's backward keeps one chunk's graph at a time.
    """
    n, t = ids.shape
    lengths = attn.sum(1)
    order = lengths.argsort(descending=True, stable=True)
    for rows in order.split(chunk_rows or n):
        w = max(int(lengths[rows].max()), 1)
        resid, z, _ = ee_model.final_residual(
            ids[rows, :w], attention_mask=attn[rows, :w], exit_at=exits[rows, :w], checkpoint_blocks=checkpoint_blocks
        )
        yield rows, w, _student_kl(ee_model, resid, teacher_logits, src[rows], per_span), exit_log_probs(z)
        del resid, z


def _student_kl(
    ee_model,
    resid: Float[Tensor, "n w d_model"],
    teacher_logits: Tensor,
    src: Tensor,
    per_span: int | None = LOGIT_ROWS,
) -> Tensor:
    """``KL(student || teacher)`` per position ``[n, w]``, `per_span` rows x positions at a time.

    Each chunk runs under `torch.utils.checkpoint`: the backward recomputes its readout and
    log-softmax instead of keeping ``[n, w, vocab]`` float32 tensors for every position.
    ``per_span=None`` (a step small enough for one pass): every position at once, kept for the backward.
    """
    if per_span is None:
        return _kl_chunk(ee_model, resid, teacher_logits, src, slice(0, resid.shape[1]))
    parts = [
        checkpoint(_kl_chunk, ee_model, resid[:, sl], teacher_logits, src, sl, use_reentrant=False)
        for sl in position_spans(resid.shape[1], resid.shape[0], per_span)
    ]
    return torch.cat(parts, 1)


def _kl_chunk(ee_model, resid: Tensor, teacher_logits: Tensor, src: Tensor, sl: slice) -> Tensor:
    student = ee_model.readout(resid).float().log_softmax(-1)
    return kl_student_teacher(student, teacher_logits[src, sl].float().log_softmax(-1))


def calibration_stats(sums: dict[str, Tensor], layers: Sequence[int], n_layers: int, exit_samples: int) -> dict:
    """Loss terms and diagnostics (floats) from the sums of `calibration_sums` (of one batch, or added over shards)."""
    kl = sums["kl"] / sums["n_predict"].clamp(min=1)
    nll = sums["exit_nll"] / sums["n_exit"].clamp(min=1)
    denom = sums["n_exitable"].clamp(min=1)
    tgt_mean, stu_mean = sums["target"] / denom, sums["student"] / denom
    frac = torch.tensor([*layers, n_layers], dtype=torch.float, device=tgt_mean.device) / n_layers
    stats = {
        "loss": (kl + nll).item(),
        "kl": kl.item(),
        "exit_nll": nll.item(),
        "target_compute": float((tgt_mean * frac).sum()),
        "student_compute": float((stu_mean * frac).sum()),
        "sampled_compute": float(sums["sampled"] / (exit_samples * denom)),
    }
    for i, l in enumerate([*layers, n_layers]):
        stats[f"target_p_{l}"] = float(tgt_mean[i])
        stats[f"student_p_{l}"] = float(stu_mean[i])
        n = float(sums["n_at"][i])
        stats[f"kl_at_{l}"] = float(sums["kl_at"][i] / n) if n > 0 else float("nan")
    return stats


def _reduce_sums(sums: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sums over every rank, in one collective."""
    if not distributed.is_distributed():
        return sums
    keys = list(sums)
    flat = distributed.all_reduce_sum(torch.cat([sums[k].reshape(-1).float() for k in keys]))
    out, i = {}, 0
    for k in keys:
        n = sums[k].numel()
        out[k] = flat[i : i + n].view_as(sums[k])
        i += n
    return out


def _check_args(cfg: CalibrationConfig, source) -> None:
    validate_config(cfg)
    if not isinstance(source, task_lib.Task):
        if len(source) == 0:
            raise ValueError(
                "the calibration dataset is empty; give a task name, a Task, or a non-empty list of examples/prompts"
            )
        strings = sum(isinstance(x, str) for x in source)
        others = sorted({type(x).__name__ for x in source if not isinstance(x, (str, task_lib.Example))})
        if others or 0 < strings < len(source):
            raise TypeError(
                f"the calibration dataset mixes kinds ({strings} prompt strings of {len(source)} items"
                f"{', and ' + ', '.join(others) if others else ''}); give a list of `Example`s or a list of "
                f"prompt strings"
            )


def calibrate(
    ee_model,
    task_or_dataset,
    *,
    kl_factor: float = 64.0,
    exit_samples: int = 4,
    steps: int = 500,
    batch_size: int = 8,
    lr: float = 3e-3,
    lora: bool = True,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    start: str | None = None,
    **options,
) -> CalibrationResult:
    """Calibrate the exit heads (and LoRA adapters) of `ee_model` by self-distillation.

    Under ``torchrun`` every process makes the same call: each takes its shards of every
    step's batch, gradients are averaged, only rank 0 writes checkpoints and shows progress,
    and every rank returns the same history (see the module docstring).

    Args:
        ee_model: an `EarlyExitModel`.
        task_or_dataset: a task name, a `Task` (fresh examples every step), or a list of
            `Example`s or prompt strings (prompts get greedy teacher continuations).
        kl_factor: k of the target ``2 - 2 sigmoid(k KL)``.
        exit_samples: exit prescriptions sampled per sequence.
        steps, batch_size, lr: optimisation; `batch_size` is the global batch (all processes).
        lora: also train LoRA adapters (added if the model has none).
        seed: seeds data order, exit sampling and the adapters `lora` adds; a rerun with the same
            number of processes x micro_batches is identical if the heads start the same (attach
            them with ``attach_exit_heads(..., seed=)``).
        checkpoint_dir: where to write checkpoints; an existing one is resumed (every rank
            reads it, so it must be visible to all of them).
        start: the base model's name or folder, recorded in the checkpoint; resuming a run of
            another base model (or an RL run) is refused.
        **options: other `CalibrationConfig` fields (continuations, lora_r, max_new_tokens,
            checkpoint_every, micro_batches, activation_checkpointing).

    Returns:
        A `CalibrationResult` with the history as a DataFrame.
    """
    unknown = set(options) - {f.name for f in dataclasses.fields(CalibrationConfig)}
    if unknown:
        raise TypeError(f"calibrate() got unknown options {sorted(unknown)}")
    ee_model.require_learned_heads("calibrate")
    cfg = CalibrationConfig(
        kl_factor=kl_factor,
        exit_samples=exit_samples,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        lora=lora,
        seed=seed,
        **options,
    )
    source = (
        task_lib.get(task_or_dataset, tokenizer=ee_model)
        if isinstance(task_or_dataset, (str, task_lib.Task))
        else list(task_or_dataset)
    )
    data = source.name if isinstance(source, task_lib.Task) else None  # a dataset: not checked
    _check_args(cfg, source)
    distributed.setup(ee_model.device)
    distributed.check_divisible(cfg.batch_size, cfg.micro_batches, name="batch_size")
    params = _trainable_parameters(ee_model, cfg)
    opt = torch.optim.AdamW(
        param_groups(ee_model, params, head_lr=cfg.lr, adapter_lr=cfg.adapter_lr or cfg.lr), lr=cfg.lr, weight_decay=0.0
    )
    files = exit_run_files(
        checkpoint_dir,
        ee_model,
        cfg,
        shards=distributed.world_size() * cfg.micro_batches,
        data=data,
        data_identity=source.identity if isinstance(source, task_lib.Task) else None,
        kind="calibrate",
        start=start,
    )
    loop = TrainLoop(
        params, opt, cfg, files, name="calibration", desc=f"calibrate k={cfg.kl_factor}", progress=progress
    )
    loop.resume()
    history = loop.run(
        functools.partial(calibration_step, ee_model, source, cfg),
        postfix=lambda row: {"loss": f"{row['loss']:.3f}", "compute": f"{row['student_compute']:.2f}"},
    )
    # provenance, saved with the heads: Fig. 4 and readers need the k the heads were calibrated for
    ee_model.calibration = {"kl_factor": float(cfg.kl_factor), "steps": int(cfg.steps), "data": data}
    return CalibrationResult(ee_model=ee_model, history=pd.DataFrame(history), config=cfg)


def _trainable_parameters(ee_model, cfg: CalibrationConfig) -> list:
    """Heads and adapters (added if `cfg.lora` and the model has none, initialised from `cfg.seed`);
    every other weight frozen."""
    from eetools.core.adapters import add_lora, lora_layers

    if cfg.lora and not lora_layers(ee_model):
        add_lora(ee_model, r=cfg.lora_r, alpha=2 * cfg.lora_r, seed=cfg.seed)
    params = ee_model.trainable_parameters()
    keep = {id(p) for p in params}  # listed once: each listing walks every module of the bridge
    for p in ee_model.model.parameters():
        if p.requires_grad and id(p) not in keep:
            p.requires_grad_(False)
    return params


def calibration_step(ee_model, source, cfg: CalibrationConfig, step: int) -> tuple[dict, bool]:
    """Forward and backward of step `step` (this rank's shards); its history row, and True (a gradient to apply)."""
    examples = _examples_for_step(source, cfg, step)  # the global batch, the same on every rank
    shards = [
        (g, encode_examples(ee_model, part, cfg, step))
        for g, part in distributed.local_shards(examples, cfg.micro_batches, name="batch_size")
    ]
    # both loss terms are means over the global batch's positions: normalise every shard by the global counts
    counts = distributed.all_reduce_sum(sum(_counts(predict, cfg.exit_samples) for _, (_, _, predict) in shards))
    total: dict[str, Tensor] = {}
    for g, (ids, attn, predict) in shards:
        gen = torch.Generator().manual_seed(distributed.shard_seed(cfg.seed * 7_919 + step, g))
        # x world: gradients are averaged over ranks, and the mean of the ranks' shares must be the global loss
        scale = distributed.world_size() / counts.clamp(min=1)
        _, _, sums = calibration_sums(
            ee_model,
            ids,
            attn,
            predict,
            cfg.kl_factor,
            cfg.exit_samples,
            gen,
            checkpoint_blocks=cfg.activation_checkpointing,
            backward_scale=(scale[0], scale[1]),
            one_pass_elements=cfg.one_pass_elements,
        )
        total = {k: total[k] + v for k, v in sums.items()} if total else sums
    stats = calibration_stats(_reduce_sums(total), ee_model.exit_layers, ee_model.n_layers, cfg.exit_samples)
    return {"step": step + 1, **stats}, True

"""Stage 2: lightweight RL with RLOO for early exits (docs/method.md section 7).

For each prompt, `k` rollouts are sampled with exits (mode "sample"). Rollout `i` earns
``R_i = task_i - beta * KL_i - lam * exitcost_i``: the verifier's score, the mean
per-token ``KL(policy || reference)`` (reference = base model, no exits, adapters off),
and the exit cost: by default the mean normalised blocks used per token, or with
``exit_cost="total"`` the blocks used by the whole completion (`exit_costs`). The leave-one-out advantage is
``A_i = R_i - mean_{j != i} R_j`` and the loss
``-mean_i A_i * sum_t [log pi(y_t) + log pi(exit_t)]``: the policy samples both tokens and
exits. Trainable: exit heads and LoRA adapters (the heads alone with
``train_adapters=False``). Rollouts decode with ``skip="compute"``
(exited tokens' later blocks compute only keys and values; the same tokens and exits as the
masked reference up to float rounding), and the loss is recomputed teacher-forced with the
prescribed exits, each prompt run once for its `k` rollouts (see `rl_terms`).

Under torchrun each process takes its shards of a step's prompts (`eetools.train.distributed`),
each prompt with all its `k` rollouts, so RLOO groups stay whole on one process. The
rollouts of shard ``g`` are generated with seed ``shard_seed(seed * 7919 + step, g)``; the
objective is divided by the global number of rollouts and gradients are averaged across
processes, so the update is the one-process update of the same global batch. The history
is computed from every rollout of the step (per-rollout values gathered from all ranks);
held-out evaluations run on rank 0 and are shared with the others.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

from eetools import tasks as task_lib
from eetools.core.adapters import adapter_parameters
from eetools.core.encoding import CHUNK_ROWS
from eetools.core.generation import distinct_rows
from eetools.core.heads import exit_log_probs
from eetools.core.options import validate_config
from eetools.core.rule import UNSET, ExitRule
from eetools.train import distributed
from eetools.train.calibration import kl_student_teacher, position_spans
from eetools.train.loop import TrainLoop, param_groups
from eetools.train.state import exit_run_files

EXIT_COSTS = ("mean", "total")


def exit_costs(rollout, kind: str = "mean", cap: int | None = None) -> Float[Tensor, " batch"]:
    """The exit cost of each rollout: "mean" or "total" normalised blocks used (see `RLConfig.exit_cost`).

    ``used_t = exit_layer_t / L`` for each generated token ``t`` (EOS included, padding not).
    "mean" is ``sum_t used_t / n_tokens`` (`Rollout.compute`); "total" is ``sum_t used_t / cap``
    with `cap` the generation cap (default: the rollout's width), so both lie in [0, 1] and a
    full-depth completion of `cap` tokens costs 1 either way. Under "mean" a completion can lower
    its cost by adding cheap tokens; under "total" every token it adds costs more.
    """
    if kind not in EXIT_COSTS:
        raise ValueError(f"exit cost must be one of {', '.join(EXIT_COSTS)}, got {kind!r}")
    used = ((rollout.exit_layers.float() / rollout.n_layers) * rollout.mask).sum(1)
    if kind == "mean":
        return used / rollout.mask.sum(1).clamp(min=1)  # = rollout.compute
    cap = int(rollout.mask.shape[1]) if cap is None else int(cap)
    if cap < 1:
        raise ValueError(f"the generation cap of a total exit cost must be >= 1, got {cap}")
    return used / cap


class RewardError(RuntimeError):
    """The reward function failed or returned a non-finite value."""


@dataclass
class RLConfig:
    """Settings of `train_rl` (each field is an ``eetools rl`` option)."""

    # what each field may be, beyond its type (`eetools.core.options.validate_config`)
    LIMITS: ClassVar[dict] = {
        "lam": ">= 0",
        "beta": ">= 0",
        "k": ">= 2: RLOO needs at least 2 rollouts per prompt for its leave-one-out baseline",
        "prompts_per_step": ">= 1",
        "steps": ">= 0",
        "lr": "> 0",
        "head_lr": ">= 0: 0 means the same as lr",
        "max_new_tokens": ">= 0: 0 means the task's own cap",
        "temperature": ">= 0: 0 means greedy tokens",
        "eval_every": ">= 0: 0 means never",
        "eval_prompts": ">= 1",
        "checkpoint_every": ">= 1: steps between checkpoints",
        "patience": ">= 0",
        "min_confidence": ">= 0 and < 1",
        "max_entropy": ">= 0",
        "micro_batches": ">= 1",
        "exit_cost": EXIT_COSTS,
    }
    lam: float = 1.5
    """Weight of the exit cost (mean blocks used / L) in the reward."""
    beta: float = 0.25
    """Weight of the KL(policy || reference) penalty in the reward."""
    k: int = 8
    """Rollouts per prompt (RLOO group size, >= 2)."""
    prompts_per_step: int = 8
    """Prompts per step (batch = prompts_per_step * k rollouts)."""
    steps: int = 30
    """Optimizer steps."""
    lr: float = 1e-3
    """AdamW learning rate (LoRA adapters, and exit heads unless `head_lr` is set)."""
    head_lr: float = 0.0
    """AdamW learning rate of the exit heads; 0: the same as `lr` (adapters always use `lr`)."""
    train_adapters: bool = True
    """Train the LoRA adapters with the heads; False: only the exit heads learn, so the token model stays the one RL started from."""
    max_new_tokens: int = 0
    """Generation length cap; 0: the task's `max_new_tokens` (its longest written reasoning fits)."""
    temperature: float = 1.0
    """Token sampling temperature of the rollouts; 0 = greedy tokens, only exits sampled (and trained)."""
    seed: int = 0
    """Seed of prompts and sampling."""
    eval_every: int = 10
    """Steps between held-out evaluations (0: never)."""
    eval_prompts: int = 32
    """Held-out prompts per evaluation (from the task's test split)."""
    checkpoint_every: int = 10
    """Steps between checkpoints (with checkpoint_dir)."""
    patience: int = 0
    """Patience rule on the sampled exits (`generate`'s `patience`): a token may exit at an exitable layer only where the logit lens's top token has held for this many exitable layers before; the rule masks the exit action and the policy gradient uses the masked policy's log-probs. Evaluate the result with the same patience. 0: the heads alone decide."""
    min_confidence: float = 0.0
    """Floor on the logit lens's top probability for a sampled exit (`generate`'s `min_confidence`), a mask like `patience`. 0: no floor."""
    max_entropy: float | None = None
    """Ceiling on the logit lens's entropy (nats) for a sampled exit (`generate`'s `max_entropy`), a mask like `patience`. None: no ceiling."""
    micro_batches: int = 1
    """Micro-batches per process per step (prompts with their k rollouts), run one after another with gradients accumulated (less memory). Rollouts are seeded per micro-batch: processes x micro_batches fixes a run."""
    exit_cost: str = "mean"
    """What the exit cost in the reward measures: "mean" (the paper's: blocks used / L averaged over the completion's tokens, which can fall just by adding easy tokens) or "total" (blocks used / L summed over the completion, divided by the generation cap so it stays in [0, 1]: writing more tokens costs more)."""
    activation_checkpointing: bool = False
    """Recompute the blocks' attention and MLP in the loss's backward instead of keeping their activations (less memory, more compute; each rollout's prompt is then run, not shared); the same loss and gradients."""

    def exit_rule(self, mode: str = "sample") -> ExitRule:
        """The `ExitRule` of the run's rollouts (sampled exits under its lens checks), or of its
        held-out evaluations in `mode`."""
        return ExitRule(
            mode=mode, patience=self.patience, min_confidence=self.min_confidence, max_entropy=self.max_entropy
        )


@dataclass
class RLResult:
    """An RL-trained model, its per-step history and its held-out evaluations."""

    ee_model: object
    history: pd.DataFrame
    evals: pd.DataFrame
    config: RLConfig


def rloo_advantages(rewards: Float[Tensor, "groups k"]) -> Float[Tensor, "groups k"]:
    """Leave-one-out advantages ``R_i - mean_{j != i} R_j``; exactly 0 in a flat group."""
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError("RLOO needs k >= 2 rollouts per prompt (a leave-one-out baseline)")
    others = (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)
    adv = rewards - others
    flat = rewards.max(-1, keepdim=True).values == rewards.min(-1, keepdim=True).values
    return torch.where(flat, torch.zeros_like(adv), adv)


def _task_rewards(task, reward_fn, examples, completions, step, first: int = 0) -> list[float]:
    """Verifier (or `reward_fn`) scores; errors name the sample by its index in the step's global batch."""
    out = []
    fn = reward_fn or task.score
    for i, (e, c) in enumerate(zip(examples, completions), start=first):
        try:
            r = fn(e, c)
        except Exception as err:
            raise RewardError(
                f"reward function raised at step {step}, sample {i} (completion {c[:120]!r}): "
                f"{type(err).__name__}: {err}"
            ) from err
        if r is None or not isinstance(r, (int, float)) or not math.isfinite(float(r)):
            raise RewardError(
                f"reward function returned {r!r} at step {step}, sample {i} "
                f"(completion {c[:120]!r}); rewards must be finite numbers"
            )
        out.append(float(r))
    return out


def rl_terms(
    ee_model,
    rollout,
    task_reward: Tensor,
    k: int,
    lam: float,
    beta: float,
    token_term: bool = True,
    chunk_rows: int | None = CHUNK_ROWS,
    share_prompts: bool = True,
    checkpoint_blocks: bool = False,
    exit_cost: str = "mean",
    cap: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The RLOO objective of a rollout batch ordered as groups of `k`, *summed* over rollouts.

    Returns ``(objective, per_rollout)``: ``-sum_i A_i * sum_t [log pi(y_t) + log pi(exit_t)]``
    (differentiable) and a dict of per-rollout tensors (reward, task, kl, exitcost, adv, and
    each rollout's share of the objective) for `rl_stats`. `token_term=False` (greedy tokens,
    temperature 0) keeps only the sampled exit decisions in the policy gradient: greedy tokens
    are not samples of the policy.

    The policy and reference passes run `chunk_rows` rollouts at a time, the rollouts of one
    prompt together and the longest groups first; each chunk is cut to its own longest prompt
    and completion, so a batch that mixes short and long tasks stops paying for padding. With
    `share_prompts`, each distinct prompt of a chunk runs once and its KV cache (with its
    gradient) is copied to its rollouts, which then run their completions only. Every term is
    per rollout, so this is the one-pass result (``chunk_rows=None, share_prompts=False``) up
    to float rounding. Vocabulary-sized tensors exist `LOGIT_ROWS` positions at a time
    (`_token_terms`). `checkpoint_blocks`: activation checkpointing of the blocks
    (`checkpointed_blocks`); it runs every rollout's prompt (a KV cache cannot be recomputed).
    `exit_cost` and `cap`: the exit cost's kind and generation cap (`exit_costs`).
    """
    device = ee_model.device
    share_prompts = share_prompts and not checkpoint_blocks
    lengths = rollout.prompt_mask.sum(1) + rollout.mask.sum(1)
    exits = rollout.prescribed_exit_layers()
    summed, kls = [], []
    distinct = distinct_rows(torch.cat([rollout.prompt_tokens, rollout.prompt_mask.long()], 1))
    prompt_id = torch.arange(len(lengths)) if distinct is None else distinct[1].cpu()  # rollout -> its prompt
    order = _group_order(prompt_id, lengths)
    for rows in order.split(chunk_rows or len(order)):
        shared = prompt_id[rows] if share_prompts else None
        s, kl = _policy_terms(ee_model, rollout, exits, rows, token_term, shared, checkpoint_blocks)
        summed.append(s)
        kls.append(kl)
    inverse = order.argsort().to(device)
    summed, kl = torch.cat(summed)[inverse], torch.cat(kls)[inverse]
    with torch.no_grad():
        cost = exit_costs(rollout, exit_cost, cap).to(device)
        task_reward = task_reward.to(device)
        reward = task_reward - beta * kl - lam * cost
        adv = rloo_advantages(reward.view(-1, k)).view(-1)
    per_rollout = -(adv * summed)
    return per_rollout.sum(), {
        "reward": reward,
        "task": task_reward,
        "kl": kl,
        "exitcost": cost,
        "adv": adv,
        "objective": per_rollout.detach(),
    }


def _group_order(prompt_id: Tensor, lengths: Tensor) -> Tensor:
    """Rollout indices with the rollouts of one prompt together, longest rows first, groups by their longest row."""
    group_len = torch.zeros(int(prompt_id.max()) + 1, dtype=lengths.dtype).scatter_reduce(
        0, prompt_id, lengths, reduce="amax"
    )
    order = lengths.argsort(descending=True, stable=True)
    order = order[prompt_id[order].argsort(stable=True)]
    return order[group_len[prompt_id[order]].argsort(descending=True, stable=True)]


def _policy_terms(
    ee_model,
    rollout,
    exits: Tensor,
    rows: Tensor,
    token_term: bool,
    prompt_id: Tensor | None,
    checkpoint_blocks: bool = False,
) -> tuple[Tensor, Tensor]:
    """For rollouts `rows`: sum over generated tokens of the sampled log-probs (differentiable), and mean KL to the base model.

    `exits` is ``rollout.prescribed_exit_layers()``; `prompt_id` (each row's prompt) shares
    prompts between rows, None runs every row's prompt.
    """
    device = ee_model.device
    P = rollout.prompt_tokens.shape[1]
    prompt_mask, mask = rollout.prompt_mask[rows], rollout.mask[rows]
    p0 = P - int(prompt_mask.sum(1).max())  # left padding every row of the chunk has
    n = max(int(mask.sum(1).max()), 1)  # the chunk's longest completion
    prompts, pmask = rollout.prompt_tokens[rows, p0:].to(device), prompt_mask[:, p0:].long().to(device)
    tokens = rollout.tokens[rows, :n].to(device)
    attn = torch.cat([pmask, mask[:, :n].long().to(device)], 1)
    exits = exits[rows][:, p0 : P + n].to(device)
    p, mask = P - p0, mask[:, :n].to(device).float()
    distinct = None if prompt_id is None else distinct_rows(prompt_id.to(device))
    passes = (
        None if distinct is None else _shared_prompt_passes(ee_model, prompts, tokens, attn, exits[:, p:], distinct)
    )
    if passes is None:  # one pass over prompt and completion
        seqs = torch.cat([prompts, tokens], 1)
        with torch.no_grad():
            ref = ee_model.final_residual(seqs, attn, base=True)[0][:, p - 1 : -1]
        pol, z, _ = ee_model.final_residual(seqs, attn, exit_at=exits, checkpoint_blocks=checkpoint_blocks)
        pol, z = pol[:, p - 1 : -1], z[:, p - 1 : -1]
    else:
        ref, pol, z = passes
    # the exits' log-probs under the policy that sampled them: masked where a rule (patience, floor) vetoed
    allowed = None if rollout.exit_allowed is None else rollout.exit_allowed[rows, :n].to(device)
    exit_lp = exit_log_probs(z, allowed)
    tok_lp, kl_tok = _token_terms(ee_model, pol, ref, tokens)
    taken = ee_model.exit_index(rollout.exit_layers[rows, :n].to(device))
    ex_lp = exit_lp.gather(-1, taken[..., None]).squeeze(-1)
    ex_lp = torch.cat([torch.zeros_like(ex_lp[:, :1]), ex_lp[:, 1:]], 1)  # first token: no decision
    kl = (kl_tok * mask).sum(1) / mask.sum(1).clamp(min=1)
    return (((tok_lp if token_term else 0.0) + ex_lp) * mask).sum(1), kl


def _token_terms(ee_model, pol: Tensor, ref: Tensor, tokens: Int[Tensor, "b n"]) -> tuple[Tensor, Tensor]:
    """Policy log-prob of each token (differentiable) and ``KL(policy || reference)`` per position (detached).

    `pol` and `ref` are final residuals ``[b, n, d_model]``; they are read out `LOGIT_ROWS`
    positions at a time under `torch.utils.checkpoint`, so no ``[b, n, vocab]`` tensor is kept.
    """
    parts = [
        checkpoint(_token_chunk, ee_model, pol[:, sl], ref[:, sl], tokens[:, sl], use_reentrant=False)
        for sl in position_spans(pol.shape[1], pol.shape[0])
    ]
    return torch.cat([lp for lp, _ in parts], 1), torch.cat([kl for _, kl in parts], 1).detach()


def _token_chunk(ee_model, pol: Tensor, ref: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    lp = ee_model.readout(pol).float().log_softmax(-1)
    with torch.no_grad():
        kl = kl_student_teacher(lp, ee_model.readout(ref).float().log_softmax(-1))
    return lp.gather(-1, tokens[..., None]).squeeze(-1), kl


def _shared_prompt_passes(
    ee_model,
    prompts: Int[Tensor, "b p"],
    tokens: Int[Tensor, "b n"],
    attn: Int[Tensor, "b p_plus_n"],
    exits: Int[Tensor, "b n"],
    distinct,
):
    """Reference and policy final residuals at every completion token, each distinct prompt run once.

    The prompt's KV cache rows are copied to its rollouts (`distinct` = ``(first, inverse)``),
    which then run their completions with the prescribed exits. Returns ``(ref, pol,
    exit_logits)`` at the positions predicting each completion token (``[b, n, d_model]``,
    ``[b, n, d_model]``, ``[b, n, m]``), the values of one pass over prompt and completion;
    None if the model's cache cannot copy rows.
    """
    first, inverse = distinct
    p, n = prompts.shape[1], tokens.shape[1]
    head, rest = prompts[first], tokens[:, :-1]  # the last token predicts nothing we score
    head_attn, rest_attn = attn[first, :p], attn[:, :-1]
    with torch.no_grad():
        cache = DynamicCache()
        h = ee_model.final_residual(head, head_attn, base=True, past_key_values=cache)[0]
        if not hasattr(cache, "batch_select_indices"):
            return None
        parts = [h[:, -1:][inverse]]
        if n > 1:
            cache.batch_select_indices(inverse)
            parts.append(ee_model.final_residual(rest, rest_attn, base=True, past_key_values=cache)[0])
        ref = torch.cat(parts, 1)
    # the policy: prompt positions never exit; the cache keeps the adapters' gradient
    cache = DynamicCache()
    h, z, _ = ee_model.final_residual(
        head, head_attn, exit_at=torch.full_like(head, ee_model.n_layers), past_key_values=cache
    )
    pol, z = [h[:, -1:][inverse]], [z[:, -1:][inverse]]
    if n > 1:
        cache.batch_select_indices(inverse)
        more, more_z, _ = ee_model.final_residual(rest, rest_attn, exit_at=exits[:, : n - 1], past_key_values=cache)
        pol.append(more)
        z.append(more_z)
    return ref, torch.cat(pol, 1), torch.cat(z, 1)


def rl_stats(per_rollout: dict[str, Tensor], k: int) -> dict[str, float]:
    """Loss and reward statistics of a batch from `rl_terms`'s per-rollout values (one batch, or gathered)."""
    adv = per_rollout["adv"]
    return {
        "loss": per_rollout["objective"].mean().item(),
        "reward": per_rollout["reward"].mean().item(),
        "task": per_rollout["task"].mean().item(),
        "kl": per_rollout["kl"].mean().item(),
        "exitcost": per_rollout["exitcost"].mean().item(),
        "adv_mean": adv.mean().item(),
        "adv_std": adv.std().item(),
        "adv_abs_max": adv.abs().max().item(),
        "flat_groups": float((adv.view(-1, k) == 0).all(-1).float().mean()),
    }


def _rollout_columns(ee_model, rollout, per: dict[str, Tensor], scores, coherence) -> dict[str, Tensor]:
    """Per-rollout values of one shard, as float64 columns on the CPU (to be gathered across ranks)."""
    mask = rollout.mask
    used = (rollout.exit_layers.float() / rollout.n_layers * mask).sum(1)
    outcomes = [*ee_model.exit_layers, ee_model.n_layers]
    exits = torch.stack([((rollout.exit_layers == l) & mask).sum(1) for l in outcomes], 1)
    cols = {k: v.detach().cpu().double().reshape(len(rollout), -1) for k, v in per.items()}
    cols.update(
        score=torch.tensor(scores, dtype=torch.float64)[:, None],
        coherence=torch.tensor(coherence, dtype=torch.float64)[:, None],
        used=used.double()[:, None],
        n_tokens=mask.sum(1).double()[:, None],
        exits=exits.double(),
    )
    return cols


def _gather_columns(shards: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """This rank's shards' columns concatenated, then every rank's, in global order (one collective)."""
    keys = list(shards[0])
    widths = [shards[0][key].shape[1] for key in keys]
    local = torch.cat([torch.cat([s[key] for key in keys], 1) for s in shards])
    table = distributed.all_gather_cat(local)
    out, i = {}, 0
    for key, w in zip(keys, widths):
        out[key] = table[:, i : i + w].squeeze(1) if w == 1 else table[:, i : i + w]
        i += w
    return out


def _history_row(ee_model, step: int, cols: dict[str, Tensor], k: int) -> dict:
    row = {
        "step": step + 1,
        **rl_stats(cols, k),
        "accuracy": float((cols["score"] == 1.0).sum()) / len(cols["score"]),
        "compute": float(cols["used"].sum() / cols["n_tokens"].sum().clamp(min=1)),
    }
    row["layers_saved"] = 1 - row["compute"]
    row["length"] = float(cols["n_tokens"].mean())  # generated tokens per rollout (EOS included)
    row["coherence"] = float(cols["coherence"].mean())
    hist = cols["exits"].sum(0)
    for l, f in zip([*ee_model.exit_layers, "full"], (hist / hist.sum().clamp(min=1)).tolist()):
        row[f"exit_p_{l}"] = f
    return row


# statistics of a step that must be finite, else the run stops before the optimizer step
FINITE_STATS = ("loss", "reward", "task", "kl", "exitcost", "adv_mean", "adv_std", "adv_abs_max")


def train_rl(
    ee_model,
    task,
    *,
    lam: float = 1.5,
    beta: float = 0.25,
    k: int = 8,
    prompts_per_step: int = 8,
    steps: int = 30,
    lr: float = 1e-3,
    head_lr: float = 0.0,
    max_new_tokens: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
    eval_every: int = 10,
    eval_prompts: int = 32,
    checkpoint_dir: str | Path | None = None,
    reward_fn: Callable | None = None,
    progress: bool = True,
    checkpoint_every: int = 10,
    micro_batches: int = 1,
    train_adapters: bool = True,
    rule: ExitRule | None = None,
    patience: int = UNSET,
    min_confidence: float = UNSET,
    max_entropy: float | None = UNSET,
    activation_checkpointing: bool = False,
    start: str | None = None,
    exit_cost: str = "mean",
) -> RLResult:
    """RL-train exits with RLOO. See the module docstring for the reward and the loss.

    Under ``torchrun`` every process makes the same call: each takes its shards of every
    step's prompts (`prompts_per_step` is global), gradients are averaged, only rank 0 writes
    checkpoints, evaluates and shows progress, and every rank returns the same result.

    Args:
        ee_model: an `EarlyExitModel` (usually calibrated first).
        task: task name or `Task`; training prompts are fresh samples, evaluation uses the test split.
        reward_fn: optional ``fn(example, completion) -> float`` replacing `task.score`.
        checkpoint_dir: checkpoints every `checkpoint_every` steps; an existing one is resumed
            (every rank reads it, so it must be visible to all of them).
        micro_batches: shards per process per step (see `RLConfig.micro_batches`).
        train_adapters: False trains the exit heads only (the adapters are left as they are).
        patience: exits sampled under the patience rule (see `RLConfig.patience`); the held-out
            evaluations use it too.
        min_confidence: exits sampled under a floor on the lens's confidence, the same way.
        max_entropy: exits sampled under a ceiling on the lens's entropy, the same way.
        activation_checkpointing: recompute the blocks in the backward (less memory, see `RLConfig`).
        exit_cost: "mean" (default) or "total" blocks used in the reward (see `RLConfig.exit_cost`).
        rule: the lens checks as an `ExitRule` instead of the three keywords above (its mode must
            be "sample"; its threshold is not used: held-out thresholded exits use 0.5).
        start: the checkpoint or preset the model was loaded from, recorded in the run's
            checkpoint; resuming a run started from another (or a calibration) is refused.

    Returns:
        `RLResult` with `history` (one row per step) and `evals` (held-out evaluations).
    """
    if isinstance(rule, ExitRule) and rule.mode != "sample":
        raise ValueError(f"RL trains sampled exits: rule.mode must be 'sample', got {rule.mode!r}")
    rule = ExitRule.from_kwargs(
        rule,
        n_exit=len(ee_model.exit_layers),
        patience=patience,
        min_confidence=min_confidence,
        max_entropy=max_entropy,
    )
    cfg = RLConfig(
        lam=lam,
        beta=beta,
        k=k,
        prompts_per_step=prompts_per_step,
        steps=steps,
        lr=lr,
        head_lr=head_lr,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        eval_every=eval_every,
        eval_prompts=eval_prompts,
        checkpoint_every=checkpoint_every,
        micro_batches=micro_batches,
        train_adapters=train_adapters,
        patience=rule.patience,
        min_confidence=rule.min_confidence,
        max_entropy=rule.max_entropy,
        activation_checkpointing=activation_checkpointing,
        exit_cost=exit_cost,
    )
    _check_config(ee_model, cfg)
    task = task_lib.get(task, tokenizer=ee_model)
    distributed.setup(ee_model.device)
    distributed.check_divisible(cfg.prompts_per_step, cfg.micro_batches, name="prompts_per_step")
    params = ee_model.trainable_parameters() if cfg.train_adapters else list(ee_model.heads.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(
        param_groups(ee_model, params, head_lr=cfg.head_lr or cfg.lr, adapter_lr=cfg.lr), lr=cfg.lr, weight_decay=0.0
    )
    files = exit_run_files(
        checkpoint_dir,
        ee_model,
        cfg,
        shards=distributed.world_size() * cfg.micro_batches,
        data=task.name,
        data_identity=task.identity,
        kind="rl",
        start=start,
    )
    evals: list[dict] = []
    loop = TrainLoop(
        params,
        opt,
        cfg,
        files,
        name="RL",
        desc="rl",
        finite=FINITE_STATS,
        progress=progress,
        records=lambda history: {"history": history, "evals": evals},
    )
    evals.extend(loop.resume().get("evals", []))
    if loop.start == 0 and cfg.eval_every:
        evals.append(_evaluate_on_main(ee_model, task, cfg, 0))

    def evaluate(done: int) -> None:
        if cfg.eval_every and done % cfg.eval_every == 0:
            evals.append(_evaluate_on_main(ee_model, task, cfg, done))

    history = loop.run(
        functools.partial(rl_step, ee_model, task, cfg, reward_fn),
        on_step_end=evaluate,
        postfix=lambda row: {
            "acc": f"{row['accuracy']:.2f}",
            "compute": f"{row['compute']:.2f}",
            "reward": f"{row['reward']:.2f}",
        },
    )
    return RLResult(ee_model=ee_model, history=pd.DataFrame(history), evals=pd.DataFrame(evals), config=cfg)


def _check_config(ee_model, cfg: RLConfig) -> None:
    validate_config(cfg)
    ee_model.require_learned_heads("RL-train")


def rl_step(ee_model, task, cfg: RLConfig, reward_fn: Callable | None, step: int) -> tuple[dict, bool]:
    """Rollouts, rewards and backward of step `step` (this rank's shards); its history row, and whether to update.

    Every group flat (no advantage anywhere, on any rank): no signal, the parameters are left alone.
    """
    exs = task.sample(cfg.prompts_per_step, seed=cfg.seed * 1_000_003 + 500_000 + step)  # global, every rank
    shards = [
        _rollout_shard(ee_model, task, cfg, reward_fn, part, g, step)
        for g, part in distributed.local_shards(exs, cfg.micro_batches, name="prompts_per_step")
    ]
    if not cfg.train_adapters:
        # frozen adapters stay out of the optimizer; peft turns their requires_grad back on whenever
        # adapters are re-enabled, so their gradients are dropped at every step instead
        for p in adapter_parameters(ee_model):
            p.grad = None
    cols = _gather_columns(shards)  # every rollout of the step, in global order, on every rank
    return _history_row(ee_model, step, cols, cfg.k), bool((cols["adv"] != 0).any())


def _rollout_shard(
    ee_model, task, cfg: RLConfig, reward_fn: Callable | None, part: list, g: int, step: int
) -> dict[str, Tensor]:
    """Rollouts of global shard `g` (prompts `part`, `k` each), their RLOO objective's backward, their columns."""
    group = [e for e in part for _ in range(cfg.k)]
    rollout = ee_model.generate(
        [e.prompt for e in group],
        cfg.max_new_tokens or task.max_new_tokens,
        rule=cfg.exit_rule(),
        temperature=cfg.temperature,
        skip="compute",
        seed=distributed.shard_seed(cfg.seed * 7_919 + step, g),
    )
    completions = [task.cut(e, t) for e, t in zip(group, rollout.text)]
    task_r = torch.tensor(_task_rewards(task, reward_fn, group, completions, step, first=g * len(group)))
    objective, per = rl_terms(
        ee_model,
        rollout,
        task_r,
        cfg.k,
        cfg.lam,
        cfg.beta,
        token_term=cfg.temperature > 0,
        checkpoint_blocks=cfg.activation_checkpointing,
        exit_cost=cfg.exit_cost,
        cap=cfg.max_new_tokens or task.max_new_tokens,
    )
    if bool((per["adv"] != 0).any()):  # a shard of flat groups adds nothing to the gradient
        # x world / all rollouts: gradients are averaged over ranks into the global mean
        (objective * (distributed.world_size() / (cfg.prompts_per_step * cfg.k))).backward()
    scores = [task.score(e, c) for e, c in zip(group, completions)]
    coherence = [task.coherence(e, c) for e, c in zip(group, completions)]
    return _rollout_columns(ee_model, rollout, per, scores, coherence)


def _evaluate_on_main(ee_model, task, cfg: RLConfig, step: int) -> dict:
    """`_evaluate` on rank 0 only; every rank gets its result (the others wait for it)."""
    return distributed.broadcast_object(_evaluate(ee_model, task, cfg, step) if distributed.is_main() else None)


def _evaluate(ee_model, task, cfg: RLConfig, step: int) -> dict:
    """Held-out: greedy tokens with sampled exits and with threshold exits."""
    exs = task.test_split()[: cfg.eval_prompts]
    out = {"step": step}
    for mode in ("sample", "threshold"):
        r = ee_model.generate(
            [e.prompt for e in exs],
            cfg.max_new_tokens or task.max_new_tokens,
            rule=cfg.exit_rule(mode),
            temperature=0,
            seed=cfg.seed + 12_345,
            skip="compute",
        )
        comp = [task.cut(e, t) for e, t in zip(exs, r.text)]
        out[f"{mode}_accuracy"] = sum(task.score(e, c) == 1.0 for e, c in zip(exs, comp)) / len(exs)
        out[f"{mode}_compute"] = r.batch_compute
        out[f"{mode}_coherence"] = sum(task.coherence(e, c) for e, c in zip(exs, comp)) / len(exs)
    return out


@dataclass
class SweepResult:
    """Histories of several RL runs in one DataFrame (columns run, seed, lam, beta, step, ...)."""

    history: pd.DataFrame
    evals: pd.DataFrame


def run_sweep(
    make_model: Callable[[], object],
    task,
    *,
    seeds=(0, 1, 2),
    lams=(1.5,),
    betas=(0.25,),
    checkpoint_root: str | Path | None = None,
    **kwargs,
) -> SweepResult:
    """Run `train_rl` for every (seed, lam, beta) on a fresh model from `make_model()`; collect histories."""
    hist, evs = [], []
    run = 0
    for lam in lams:
        for beta in betas:
            for seed in seeds:
                ck = None if checkpoint_root is None else Path(checkpoint_root) / f"lam{lam}_beta{beta}_seed{seed}"
                res = train_rl(make_model(), task, lam=lam, beta=beta, seed=seed, checkpoint_dir=ck, **kwargs)
                tag = {"run": run, "seed": seed, "lam": lam, "beta": beta}
                hist.append(res.history.assign(**tag))
                if len(res.evals):
                    evs.append(res.evals.assign(**tag))
                run += 1
    return SweepResult(
        history=pd.concat(hist, ignore_index=True), evals=pd.concat(evs, ignore_index=True) if evs else pd.DataFrame()
    )

"""Turning text into the token batches every part of eetools runs on.

- `encode_prompts`: left-padded prompts for generation (their last tokens line up at the
  right edge, where decoding continues).
- `encode_sequences`: right-padded ``prompt + continuation + <eos>`` for teacher-forced passes
  (calibration, RL's loss, probes, judges), with a mask of the positions that predict the
  continuation.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

CHUNK_ROWS = 16
"""Sequences per teacher-forced pass in training and analysis (longer batches run in length-sorted chunks)."""


def _warn_unknown(tok, ids: list[int], i: int) -> None:
    """Warn when a prompt encodes to unknown tokens (e.g. emoji or CJK for the tiny reasoner's character tokenizer)."""
    unk = tok.unk_token_id
    if unk is None or unk in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id):  # GPT-2: unk is <|endoftext|>
        return
    k = ids.count(unk)
    if k:
        warnings.warn(
            f"prompt {i} has {k} character{'s' * (k != 1)} unknown to the tokenizer, encoded as "
            f"{tok.unk_token!r}; the model sees {tok.unk_token!r} in their place",
            stacklevel=4,
        )


def encode_prompts(ee_model, prompts: list[str], max_new_tokens: int):
    """Left-padded prompt ids and mask; validates empty and over-long prompts."""
    model = ee_model.model
    if not prompts:
        raise ValueError("no prompts given")
    n_ctx = int(model.cfg.n_ctx)
    seqs, known = [], {}  # each distinct prompt tokenized once (RL repeats every prompt k times)
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} is a {type(p).__name__}, expected str")
        if p == "":
            raise ValueError(f"prompt {i} is empty; give at least one character of text")
        if p not in known:
            known[p] = model.to_tokens(p, prepend_bos=bool(model.cfg.default_prepend_bos), truncate=False)[0].tolist()
            _warn_unknown(model.tokenizer, known[p], i)
        ids = known[p]
        if len(ids) + max_new_tokens > n_ctx:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that is "
                f"{len(ids) + max_new_tokens} > the model's context of {n_ctx} tokens; shorten the prompt "
                f"or lower max_new_tokens"
            )
        seqs.append(ids)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s) :] = torch.tensor(s)
        mask[i, n - len(s) :] = 1
    return ids.to(ee_model.device), mask.to(ee_model.device)


def encode_sequences(ee_model, prompts: Sequence[str], continuations: Sequence[str]):
    """Right-padded ``prompt + continuation + <eos>`` ids, attention mask, and a mask of
    the positions that predict a continuation token ``[batch, pos]`` (prompt's last position on).

    `ee_model` is an `EarlyExitModel` or a bare bridge (`eetools.train.tune_readout` takes either)."""
    d = getattr(ee_model, "__dict__", {})  # an EarlyExitModel holds its bridge as .model (as core.lens._split tells)
    if "exit_layers" in d and "heads" in d.get("_modules", {}):
        model, device = d["model"], ee_model.device
    else:
        model, device = ee_model, next(ee_model.parameters()).device
    tok = model.tokenizer
    eos = tok.eos_token_id
    rows, starts = [], []
    for p, c in zip(prompts, continuations):
        ids = model.to_tokens(p, prepend_bos=bool(model.cfg.default_prepend_bos), truncate=False)[0].tolist()
        cont = model.to_tokens(c, prepend_bos=False, truncate=False)[0].tolist() if c else []
        starts.append(len(ids))
        rows.append(ids + cont + ([eos] if eos is not None else []))
    n = max(map(len, rows))
    if n > int(model.cfg.n_ctx):
        i = max(range(len(rows)), key=lambda r: len(rows[r]))
        raise ValueError(
            f"sequence {i} (prompt {prompts[i][:40]!r}...) has {n} tokens with its continuation, more than "
            f"the model's context of {model.cfg.n_ctx}; shorten it, or lower max_new_tokens for generated "
            f"continuations"
        )
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    predict = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, (r, s) in enumerate(zip(rows, starts)):
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
        predict[i, s - 1 : len(r) - 1] = True
    return ids.to(device), attn.to(device), predict.to(device)

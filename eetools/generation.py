"""Batched, KV-cached generation with exits sampled (or thresholded) per generated token.

Each decode step processes the previous token at one position; at each exitable layer
the head's ``c_l`` decides whether that position exits (Bernoulli with the step's
pre-drawn uniforms, or ``c_l >= threshold``), and the token it predicts is drawn from the
(possibly early) readout. Random numbers are drawn per step from one explicit
`torch.Generator` in a fixed order, so cached and uncached generation with the same seed
give the same tokens and exits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from eetools.rollout import Rollout

MODES = ("sample", "threshold", "off")


def encode_prompts(ee_model, prompts: list[str], max_new_tokens: int):
    """Left-padded prompt ids and mask; validates empty and over-long prompts."""
    model = ee_model.model
    if not prompts:
        raise ValueError("no prompts given")
    n_ctx = int(model.cfg.n_ctx)
    seqs = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} is a {type(p).__name__}, expected str")
        if p == "":
            raise ValueError(f"prompt {i} is empty; give at least one character of text")
        ids = model.to_tokens(p, prepend_bos=bool(model.cfg.default_prepend_bos), truncate=False)[0].tolist()
        if len(ids) + max_new_tokens > n_ctx:
            raise ValueError(f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that is "
                             f"{len(ids) + max_new_tokens} > the model's context of {n_ctx} tokens")
        seqs.append(ids)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):] = torch.tensor(s)
        mask[i, n - len(s):] = 1
    return ids.to(ee_model.device), mask.to(ee_model.device)


@torch.no_grad()
def generate(ee_model, prompts, max_new_tokens: int = 64, *, mode: str = "sample", temperature: float = 1.0,
             threshold: float = 0.5, seed: int | None = None, use_cache: bool = True, progress: bool = False) -> Rollout:
    """Generate continuations with exits.

    Args:
        prompts: a string or a list of strings.
        max_new_tokens: tokens to generate at most (sequences stop at EOS).
        mode: "sample" (exits drawn from the heads), "threshold" (exit when ``c_l >= threshold``)
            or "off" (never exit: the base model with adapters as they are).
        temperature: token sampling temperature; 0 means greedy tokens (exits still follow `mode`).
        threshold: the exit threshold of mode "threshold".
        seed: seed of the explicit generator (None: nondeterministic).
        use_cache: KV-cached decoding (False recomputes the whole prefix: the reference).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    model, L, m = ee_model.model, ee_model.n_layers, len(ee_model.exit_layers)
    device = ee_model.device
    ids, pmask = encode_prompts(ee_model, prompts, max_new_tokens)
    b = ids.shape[0]
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    eos = model.tokenizer.eos_token_id
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else (eos or 0)

    out_tok, out_exit, out_lp, out_elp, out_probs, out_mask = [], [], [], [], [], []
    done = torch.zeros(b, dtype=torch.bool, device=device)
    seq, mask, exit_hist = ids, pmask, torch.full_like(ids, L)
    cache = None
    step_input = ids
    bar = tqdm(range(max_new_tokens), desc="generate", disable=not progress, leave=False)
    for step in bar:
        u_exit = torch.rand(b, max(m, 1), generator=gen).to(device)
        u_tok = torch.rand(b, generator=gen).to(device)
        elp = torch.zeros(b, device=device)

        def decide(i, z):
            if step == 0 or mode == "off":
                return torch.zeros_like(z, dtype=torch.bool)
            c = torch.sigmoid(z.float())
            fire = (u_exit[:, i] < c) if mode == "sample" else (c >= threshold)
            return fire

        exit_state = {}

        def decide_and_score(i, z, _decide=decide):
            fire = _decide(i, z)
            if step > 0:
                running = exit_state.get("running", torch.ones(b, dtype=torch.bool, device=device))
                lp = torch.where(fire, F.logsigmoid(z.float()), F.logsigmoid(-z.float()))
                elp.add_(torch.where(running, lp, torch.zeros_like(lp)))
                exit_state["running"] = running & ~fire
            return fire

        if use_cache:
            logits, z, exit_at, cache = ee_model._forward(step_input, mask, decide=decide_and_score,
                                                          past_key_values=cache, use_cache=True)
        else:
            logits, z, exit_at, _ = ee_model._forward(seq, mask, exit_at=exit_hist, decide=decide_and_score)
            exit_hist = exit_at
        last = logits[:, -1].float()
        logp = last.log_softmax(-1)
        if temperature == 0:
            tok = logp.argmax(-1)
        else:
            probs = (last / temperature).softmax(-1)
            cdf = probs.cumsum(-1)
            tok = torch.searchsorted(cdf, (u_tok * cdf[:, -1]).unsqueeze(-1)).squeeze(-1).clamp(max=probs.shape[-1] - 1)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        out_tok.append(tok)
        out_mask.append(~done)
        out_exit.append(torch.where(done, torch.full_like(tok, L), exit_at[:, -1]))
        out_lp.append(torch.where(done, torch.zeros_like(logp[:, 0]), logp.gather(-1, tok[:, None]).squeeze(-1)))
        out_elp.append(torch.where(done, torch.zeros_like(elp), elp))
        out_probs.append(torch.sigmoid(z[:, -1].float()))
        if eos is not None:
            done = done | (tok == eos)
        step_input = tok[:, None]
        seq = torch.cat([seq, step_input], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        exit_hist = torch.cat([exit_hist, torch.full_like(exit_hist[:, :1], L)], dim=1)
        if bool(done.all()):
            break

    tokens = torch.stack(out_tok, 1).cpu()
    gmask = torch.stack(out_mask, 1).cpu()
    tok_obj = model.tokenizer
    str_tokens, text, prompt_str = [], [], []
    for i in range(b):
        valid = tokens[i][gmask[i]].tolist()
        str_tokens.append([tok_obj.decode([t]) for t in valid])
        text.append(tok_obj.decode([t for t in valid if t != eos], skip_special_tokens=True))
        prompt_str.append([tok_obj.decode([t]) for t in ids[i][pmask[i].bool()].tolist()])
    return Rollout(prompts=prompts, prompt_tokens=ids.cpu(), prompt_mask=pmask.cpu(), tokens=tokens, mask=gmask,
                   exit_layers=torch.stack(out_exit, 1).cpu(), token_logprobs=torch.stack(out_lp, 1).cpu(),
                   exit_logprobs=torch.stack(out_elp, 1).cpu(), exit_probs=torch.stack(out_probs, 1).cpu(),
                   text=text, str_tokens=str_tokens, prompt_str_tokens=prompt_str, n_layers=L,
                   layers=list(ee_model.exit_layers), mode=mode)

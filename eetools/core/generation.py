"""Batched, KV-cached generation with exits sampled (or thresholded) per generated token.

Each decode step processes the previous token at one position; at each exitable layer
the head's ``c_l`` decides whether that position exits (Bernoulli with the step's
pre-drawn uniforms, or ``c_l >= threshold``), and the token it predicts is drawn from the
(possibly early) readout. Random numbers are drawn per step from one explicit
`torch.Generator` in a fixed order, so cached and uncached generation with the same seed
give the same tokens and exits. With a KV cache, rows that have finished (EOS) leave the
running batch and the cache, so a batch mixing short and long answers stops paying for the
short ones; the uniforms are still drawn for the full batch, so the rollout does not change.
Repeated prompts (RL's k rollouts of each) are prefilled once, their KV cache rows copied.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from eetools.core.adapters import adapters_merged
from eetools.core.encoding import encode_prompts
from eetools.core.fast.bypass import hooked
from eetools.core.fast.norm_shortcut import norm_shortcut
from eetools.core.fast.skipping import compute_skipping, skip_support, skipped_components
from eetools.core.heads import exit_log_probs
from eetools.core.hooks import resid_post
from eetools.core.options import check_value
from eetools.core.rollout import Rollout
from eetools.core.rule import MODES, UNSET, ExitRule, check_min_confidence, check_patience, check_threshold, lens_held  # noqa: F401 (re-exported)
from eetools.core.state import ExitState

SKIPS = ("mask", "compute")


@torch.no_grad()
def generate(
    ee_model,
    prompts,
    max_new_tokens: int = 64,
    *,
    rule: ExitRule | None = None,
    mode: str = UNSET,
    temperature: float = 1.0,
    threshold: float | Sequence[float] = UNSET,
    patience: int = UNSET,
    min_confidence: float = UNSET,
    max_entropy: float | None = UNSET,
    seed: int | None = None,
    use_cache: bool = True,
    skip: str = "mask",
    heads: bool = True,
    progress: bool = False,
) -> Rollout:
    """Generate continuations with exits.

    Args:
        prompts: a string or a list of strings.
        max_new_tokens: tokens to generate at most (sequences stop at EOS).
        rule: the exit settings as one `ExitRule` (default ``ExitRule()``: sampled exits, no lens
            checks). The keyword arguments below build one instead (they are its fields; with a
            `rule`, one that disagrees with it is an error).
        mode: "sample" (exits drawn from the heads), "threshold" (exit when ``c_l >= threshold``)
            or "off" (never exit: the base model with adapters as they are).
        temperature: token sampling temperature; 0 means greedy tokens (exits still follow `mode`).
        threshold: the exit threshold of mode "threshold": one number, or one per exitable layer
            (a token exits at the first layer whose ``c_l`` reaches that layer's threshold).
        patience: a token may exit at an exitable layer only where the logit lens's top token
            equals its top token at the `patience` exitable layers before (the patience rule of
            early-exit classifiers, Zhou et al. 2020; the first `patience` exitable layers then
            cannot exit). 0: the heads alone decide. With mode "sample" the rule masks the exit
            action: a vetoed layer's exit probability is 0, and `exit_logprobs` and
            `Rollout.exit_allowed` say so (RL trains this masked policy, see `train_rl`). The lens
            costs one unembedding per exitable layer and decoded token: cheap for a small
            vocabulary, about ten blocks' worth per layer for Qwen3's 151k tokens.
        min_confidence: a token may exit only where the logit lens's top probability (that of
            the token it would emit) is at least this: the confidence rule of early-exit language
            models (Schuster et al. 2022) as a floor under the heads. Combines with `patience`
            (both must hold) and, like it, masks sampled exits. 0: no floor.
        max_entropy: a token may exit only where the logit lens's entropy (nats) at that layer
            is at most this; combines with the other checks and masks sampled exits like them.
            None: no ceiling.
        seed: seed of the explicit generator (None: nondeterministic).
        use_cache: KV-cached decoding (False recomputes the whole prefix: the reference).
        skip: "mask" (every block runs on every token and exited tokens' results are thrown
            away: exact; with a KV cache it calls the HF modules without the bridge's wrappers
            where that gives the bridge's results bit for bit, `eetools.core.fast.bypass`; the
            bridge's own path runs under any hook and with ``use_cache=False``, the reference) or "compute" (exited tokens only compute their keys and
            values in later blocks, see `eetools.core.fast.skipping`, and LoRA adapters are merged into the
            weights for the call; same tokens, exits and log-probs up to float rounding, less
            time; where the HF modules run directly, attention runs HF's fused "sdpa" kernel instead of
            eager, `eetools.core.fast.attention`). "compute" needs ``use_cache=True``.
        heads: run the exit heads (they decide the exits, and record ``exit_probs``). False, with mode
            "off" only: the heads do not run (``exit_probs`` are 0, ``exit_logprobs`` 0), so the call costs
            what the base model's own decode costs: for the base model's text alone (a teacher's
            continuations, a judge's reference), where the heads' probabilities are not read. Their cost
            grows with their kind: 7 MLP heads are ~4 % of a SmolLM2-135M token's weights, a "lens" or
            "confidence" head reads out the whole vocabulary at its layer.
    """
    rule = ExitRule.from_kwargs(
        rule,
        n_exit=len(ee_model.exit_layers),
        mode=mode,
        threshold=threshold,
        patience=patience,
        min_confidence=min_confidence,
        max_entropy=max_entropy,
    )
    check_value("temperature", temperature, float, ">= 0: 0 means greedy tokens")
    if skip not in SKIPS:
        raise ValueError(f"skip must be one of {SKIPS}, got {skip!r}")
    if skip == "compute" and not use_cache:
        raise ValueError(
            "skip='compute' needs use_cache=True: without a KV cache every step recomputes "
            "the prefix, so exited tokens' later blocks cannot be skipped"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not isinstance(heads, bool):
        raise TypeError(f"heads must be True or False, got {heads!r}")
    if not heads and rule.mode != "off":
        raise ValueError(
            f"heads=False needs mode='off' (got mode {rule.mode!r}): the heads decide the exits; "
            "pass mode='off' for the base model's decode without them"
        )
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids, pmask = encode_prompts(ee_model, prompts, max_new_tokens)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    dec = _Decoder(ee_model, ids, pmask, rule, temperature, use_cache, gen)
    state = ExitState(ee_model)
    off = rule.mode == "off"
    # mode "off" never exits: the heads only record their probabilities, nothing is frozen or skipped
    freezes = {resid_post(j) for j in range(ee_model.n_layers)} if off else set()
    hooks = [h for h in state.hooks() if h[0] not in freezes] if heads else []
    # attached once for the loop; hooks, wrappers and merged weights are undone even on errors
    with contextlib.ExitStack() as stack:
        if skip == "compute":  # LoRA folded into the weights
            stack.enter_context(adapters_merged(ee_model))
        # with a KV cache the HF modules run without the bridge's wrappers wherever that changes nothing
        # observable (`hooked`: where the HF modules are those the bridge's components call, which
        # leaves GPT-2, whose query the bridge splits from the fused `c_attn`, on the bridge); the
        # uncached path stays on the bridge's hooks: the reference. Nobody reads the attention patterns
        # there: the fast path (skip="compute") takes the fused kernel, skip="mask" stays on eager, bit for bit
        fast = use_cache and skip_support(ee_model.model) is None
        needed = [m for _, m in skipped_components(ee_model)] if fast else []
        bypassed = stack.enter_context(hooked(ee_model, hooks, fast=fast, fused=skip == "compute", needed=needed))
        stack.enter_context(norm_shortcut(ee_model.model))  # once for the loop, not per step
        if use_cache:  # the prefill unembeds only the last position, as HF `generate` does
            stack.enter_context(last_logits_only(ee_model.model.original_model))
        if skip == "compute" and not off:  # exited rows' later compute skipped
            stack.enter_context(compute_skipping(ee_model, state, bypassed=bypassed))
        for step in tqdm(range(max_new_tokens), desc="generate", disable=not progress, leave=False):
            dec.step(step, state)
            if dec.finished:
                break
    return dec.rollout(prompts)


@contextlib.contextmanager
def last_logits_only(hf_model):
    """Within this context the HF model's forward computes the logits of the last position only.

    Decoding reads nothing else: at the prefill the other positions' unembeddings (a vocabulary-sized
    matrix product each) are wasted work, which HF ``generate`` skips the same way (``logits_to_keep=1``).
    Nothing changes for a model whose forward does not take ``logits_to_keep``.
    """
    forward = getattr(hf_model, "forward", None)
    try:
        takes = "logits_to_keep" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        takes = False
    if not takes:
        yield
        return
    before = hf_model.__dict__.get("forward")

    def last_only(*args, **kwargs):
        kwargs.setdefault("logits_to_keep", 1)
        return forward(*args, **kwargs)

    hf_model.forward = last_only
    try:
        yield
    finally:
        if before is None:
            hf_model.__dict__.pop("forward", None)
        else:
            hf_model.forward = before


def distinct_rows(rows: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(first, inverse)`` with ``rows[first][inverse] == rows``: one index per distinct row (value, for 1-D); None if all differ."""
    uniq, inverse = torch.unique(rows, dim=0, return_inverse=True)
    if len(uniq) == len(rows):
        return None
    first = torch.full((len(uniq),), len(rows), dtype=torch.long, device=rows.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(rows), device=rows.device), reduce="amin")
    return first, inverse


class _Decoder:
    """The state of one batched decode loop, and the per-step logic."""

    def __init__(self, ee_model, ids, pmask, rule: ExitRule, temperature, use_cache, gen):
        self.ee, self.ids, self.pmask, self.rule = ee_model, ids, pmask, rule
        self.mode = rule.mode
        self.ruled = rule.ruled  # some check on the lens besides the heads decides where exits may happen
        self.temperature, self.use_cache, self.gen = temperature, use_cache, gen
        self.L, self.m, self.b = ee_model.n_layers, len(ee_model.exit_layers), ids.shape[0]
        self.device = ee_model.device
        tok = ee_model.model.tokenizer
        self.eos = tok.eos_token_id
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else (self.eos or 0)
        self.done = torch.zeros(self.b, dtype=torch.bool, device=self.device)
        self.finished = False  # every row has emitted EOS (known from the step's one count of finished rows)
        self.seq, self.mask, self.step_input = ids, pmask, ids
        # without padding the mask says nothing the causal mask does not; passing None spares the
        # bridge re-deriving position ids from it at every step
        self.padded = bool((pmask == 0).any())
        self.exit_hist = torch.full_like(ids, self.L)
        self.cache = None
        self.out = {k: [] for k in ("tok", "mask", "exit", "lp", "elp", "probs", "allowed")}
        # rows of the full batch still in the running batch: with a KV cache, finished rows leave
        # it (their cache rows are dropped), so a batch of mixed lengths stops paying for the
        # short ones once they end
        self.rows = torch.arange(self.b, device=self.device)
        self.compact = use_cache
        # with a KV cache, each distinct prompt is prefilled once and its cache rows copied to its
        # duplicates (RL decodes k rollouts of every prompt): None when every prompt is distinct
        self.distinct = distinct_rows(torch.cat([ids, pmask], 1)) if use_cache else None
        # what a row that is not running records at a step (masked out in `rollout` anyway)
        self.fill = {
            "tok": self.pad,
            "mask": False,
            "exit": self.L,
            "lp": 0.0,
            "elp": 0.0,
            "probs": 0.0,
            "allowed": True,
        }

    def step(self, step: int, state) -> None:
        """Decode one token for every running row: exits decided layer by layer, then the token drawn."""
        b, rows = self.b, self.rows
        u_exit = torch.rand(b, max(self.m, 1), generator=self.gen, device="cpu")  # fixed draw order,
        u_tok = torch.rand(b, generator=self.gen, device="cpu")  # whatever rows are still running
        if self.device.type != "cpu":  # one copy; from pinned memory the host does not wait for it
            both = torch.cat([u_exit, u_tok[:, None]], 1)
            both = both.pin_memory() if self.device.type == "cuda" else both
            both = both.to(self.device, non_blocking=True)
            u_exit, u_tok = both[:, :-1], both[:, -1]
        running = rows.numel() < b
        if running:
            u_exit, u_tok = u_exit[rows], u_tok[rows]
        held: list[Tensor] = []  # with rules: whether they let each exitable layer decided so far exit
        # the prompt's last position never exits; None: the heads only record their probabilities
        decide = None if step == 0 or self.mode == "off" else self._decider(u_exit, held)
        logits, z, exit_at = self._forward(step, state, decide)
        allowed = self._allowed(held) if self.ruled else None
        elp = self._exit_logprob(step, z, exit_at, allowed)
        logp, tok = self._next_token(logits, u_tok)
        done = self.done[rows] if running else self.done
        tok = torch.where(done, torch.full_like(tok, self.pad), tok)
        values = {
            "tok": tok,
            "mask": ~done,
            "exit": exit_at[:, -1],
            "lp": logp.gather(-1, tok[:, None]).squeeze(-1),
            "elp": elp,
            "probs": z[:, -1],
        }
        if allowed is not None:
            values["allowed"] = allowed
        for key, v in values.items():  # raw per-step values of the full batch; masked once, in `rollout`
            if running:
                v = v.new_full((b, *v.shape[1:]), self.fill[key]).index_copy_(0, rows, v)
            self.out[key].append(v)
        self._advance(tok, done, running)

    def _decider(self, u_exit: Tensor, held: list[Tensor]):
        """The exit decision of this step's running rows at exitable layer `i` (the heads, then the rule's lens checks)."""
        lens: list[Tensor] = []  # with rules: the lens's top token at each exitable layer decided so far

        def decide_exit(i: int, z: Tensor, resid: Tensor) -> Tensor:
            fire = self.rule.fires(torch.sigmoid(z.float()), i, u_exit[:, i])
            if self.ruled:  # the lens checks, on the exit readout at this layer
                ok = self.rule.allows(self.ee.readout(resid[:, -1], self.ee.exit_layers[i]), i, lens)
                held.append(ok)
                fire = fire & ok
            return fire

        return decide_exit

    def _forward(self, step: int, state, decide) -> tuple[Tensor, Tensor, Tensor]:
        """Logits, exit logits and exits of this step (the prefill at step 0; one position after, with a cache)."""
        if self.use_cache and step == 0 and self.distinct is not None:
            return self._prefill_distinct(state)
        if self.use_cache:
            mask = self.mask if self.padded else None
            logits, z, exit_at, self.cache = self.ee.run_with_exits(
                self.step_input, mask, decide=decide, state=state, past_key_values=self.cache, use_cache=True
            )
            return logits, z, exit_at
        logits, z, exit_at, _ = self.ee.run_with_exits(
            self.seq, self.mask, exit_at=self.exit_hist, decide=decide, state=state
        )
        self.exit_hist = exit_at
        return logits, z, exit_at

    def _allowed(self, held: list[Tensor]) -> Tensor:
        """The layers the rules let exit (True after the last decided one: a row that exited earlier never
        reaches them, and one that did not was decided at every layer)."""
        allowed = torch.ones(len(self.rows), self.m, dtype=torch.bool, device=self.device)
        for i, h in enumerate(held):
            allowed[:, i] = h
        return allowed

    def _exit_logprob(self, step: int, z: Tensor, exit_at: Tensor, allowed: Tensor | None) -> Tensor:
        """Log-prob of the exit decisions taken, under the heads' stick-breaking distribution (with sampled
        exits, the masked one the rules make); 0 at the prefill, which never exits."""
        if step == 0:
            return torch.zeros(len(self.rows), device=self.device)
        policy = allowed if self.mode == "sample" else None
        return (
            exit_log_probs(z[:, -1].float(), policy).gather(-1, self.ee.exit_index(exit_at[:, -1])[:, None]).squeeze(-1)
        )

    def _next_token(self, logits: Tensor, u_tok: Tensor) -> tuple[Tensor, Tensor]:
        """Log-probs of the last position and the token drawn from them (greedy at temperature 0)."""
        last = logits[:, -1].float()
        logp = last.log_softmax(-1)
        if self.temperature == 0:
            return logp, logp.argmax(-1)
        cdf = (last / self.temperature).softmax(-1).cumsum(-1)  # inverse-CDF sampling with the pre-drawn uniform
        tok = torch.searchsorted(cdf, (u_tok * cdf[:, -1]).unsqueeze(-1)).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
        return logp, tok

    def _advance(self, tok: Tensor, done: Tensor, running: bool) -> None:
        """Mark rows that emitted EOS, feed the tokens to the next step, and drop finished rows from the batch."""
        n_done = 0
        if self.eos is not None:
            done = done | (tok == self.eos)
            self.done = self.done.index_copy(0, self.rows, done) if running else done
            n_done = int(done.sum())  # the step's one device sync besides the exit decisions
            self.finished = n_done == len(done)
        self.step_input = tok[:, None]
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        if not self.use_cache:  # the uncached reference re-runs the whole prefix
            self.seq = torch.cat([self.seq, self.step_input], dim=1)
            self.exit_hist = torch.cat([self.exit_hist, torch.full_like(self.exit_hist[:, :1], self.L)], dim=1)
        elif self.compact:
            self._drop_finished(done, n_done)

    def _prefill_distinct(self, state) -> tuple[Tensor, Tensor, Tensor]:
        """Step 0 on each distinct prompt once; logits, exit logits, exits and cache copied back to every row."""
        first, inverse = self.distinct
        mask = self.mask[first] if self.padded else None
        logits, z, exit_at, cache = self.ee.run_with_exits(self.ids[first], mask, state=state, use_cache=True)
        if not hasattr(cache, "batch_select_indices"):  # a cache type we cannot copy rows of: prefill every row
            mask = self.mask if self.padded else None
            logits, z, exit_at, self.cache = self.ee.run_with_exits(self.ids, mask, state=state, use_cache=True)
            return logits, z, exit_at
        cache.batch_select_indices(inverse)
        self.cache = cache
        return logits[inverse], z[inverse], exit_at[inverse]

    def _drop_finished(self, done: Tensor, n_done: int) -> None:
        """Drop finished rows (`n_done` of them) from the running batch and the KV cache once they are an eighth of it."""
        if n_done == 0 or n_done == len(done) or n_done * 8 < len(done):
            return
        if not hasattr(self.cache, "batch_select_indices"):  # a cache type we cannot slice: keep every row
            self.compact = False
            return
        keep = (~done).nonzero().squeeze(1)
        self.cache.batch_select_indices(keep)
        self.rows, self.mask, self.step_input = self.rows[keep], self.mask[keep], self.step_input[keep]

    def rollout(self, prompts: list[str]) -> Rollout:
        stack = lambda k: torch.stack(self.out[k], 1).cpu()
        tokens, gmask = stack("tok"), stack("mask")
        exits = torch.where(gmask, stack("exit"), self.L)
        lp = torch.where(gmask, stack("lp"), 0.0)
        elp = torch.where(gmask, stack("elp"), 0.0)
        probs = torch.where(gmask[..., None], torch.sigmoid(stack("probs").float()), 0.0)
        allowed = stack("allowed") | ~gmask[..., None] if self.ruled else None
        tok = self.ee.model.tokenizer
        ids, pmask = self.ids.cpu(), self.pmask.cpu()
        valid = [tokens[i][gmask[i]].tolist() for i in range(self.b)]
        prompt_ids = [ids[i][pmask[i].bool()].tolist() for i in range(self.b)]
        # every token's string, decoded once per distinct id (a token decodes alone, without context)
        distinct = sorted({t for row in valid + prompt_ids for t in row})
        piece = dict(zip(distinct, tok.batch_decode([[t] for t in distinct])))
        str_tokens = [[piece[t] for t in row] for row in valid]
        prompt_str = [[piece[t] for t in row] for row in prompt_ids]
        text = [tok.decode([t for t in row if t != self.eos], skip_special_tokens=True) for row in valid]
        return Rollout(
            prompts=prompts,
            prompt_tokens=ids,
            prompt_mask=pmask,
            tokens=tokens,
            mask=gmask,
            exit_layers=exits,
            token_logprobs=lp,
            exit_logprobs=elp,
            exit_probs=probs,
            text=text,
            str_tokens=str_tokens,
            prompt_str_tokens=prompt_str,
            n_layers=self.L,
            layers=list(self.ee.exit_layers),
            exit_allowed=allowed,
            rule=self.rule,
        )

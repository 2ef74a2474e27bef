"""`EarlyExitModel`: exit heads attached to a TransformerLens bridge as hooks.

A token that exits at layer `l` keeps its residual stream frozen at its value entering
block `l` for the rest of the depth: a decision hook on ``resid_pre(l)`` (the stream
entering block `l`, names in `eetools.core.hooks`) captures it, and a freeze hook on
``resid_post(j)`` (every ``j >= l``) writes it back. Its prediction is therefore the logit
lens at `l` with the final norm, ``unembed(ln_final(resid_pre_l))`` (`eetools.core.lens`),
and later tokens attend to keys and values computed from the frozen state (with a KV
cache, the cache holds them). The bridge itself is never modified: hooks live only inside
`model.hooks(...)` contexts.

Modes (see docs/method.md section 5): `teacher_forward` (base model, full depth, plus early
readouts), `prescribed_forward` (exits given per position, differentiable) and
`generate` (exits sampled or thresholded per generated token, KV-cached).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from jaxtyping import Float, Int
from torch import Tensor, nn

from eetools.core.fast.bypass import hooked
from eetools.core.fast.norm_shortcut import norm_shortcut
from eetools.core.generation import generate
from eetools.core.heads import TRAINABLE_KINDS, VETOED, exit_log_probs, make_head
from eetools.core.hooks import check_hook_names, resid_post
from eetools.core.lens import base_and_shortcut, capture_hooks, capturing, lens_logits
from eetools.core.lenses import Readout, TunedLens, make_readout
from eetools.core.options import check_value
from eetools.core.rule import UNSET, ExitRule
from eetools.core.seeding import seeded_init
from eetools.core.state import Decider, ExitState


def default_exit_layers(n_layers: int) -> list[int]:
    """Every layer from 1 to L-1 up to 12 blocks, else about 8 evenly spaced ones."""
    if n_layers < 2:
        raise ValueError(f"a model needs at least 2 blocks to exit early, this one has {n_layers}")
    if n_layers <= 12:
        return list(range(1, n_layers))
    step = max(1, round(n_layers / 8))
    return list(range(step, n_layers, step))


def validate_exit_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    """Check exitable layers: a non-empty, strictly increasing subset of ``1 .. L-1``."""
    if layers is None:
        return default_exit_layers(n_layers)
    try:
        ints = [int(l) for l in layers]
    except (TypeError, ValueError):
        ints = None
    if ints is not None and any(type(l).__name__ in ("bool", "bool_") for l in layers):  # True == 1 (numpy's too)
        raise ValueError(f"exit layers must be integers in 1..{n_layers - 1}, not booleans, got {layers!r}")
    if ints is None or any(i != l for i, l in zip(ints, layers)):  # 1.5 is not layer 1
        raise ValueError(f"exit layers must be integers in 1..{n_layers - 1}, got {layers!r}")
    layers = ints
    if not layers:
        raise ValueError(f"exit layers are empty; give a subset of 1..{n_layers - 1} (or None for a default)")
    bad = [l for l in layers if not 1 <= l <= n_layers - 1]
    if bad:
        raise ValueError(
            f"exit layers {bad} are out of range: valid exitable layers are 1..{n_layers - 1} "
            f"for this {n_layers}-block model (0 would skip every block, {n_layers} is full depth)"
        )
    if len(set(layers)) != len(layers):
        raise ValueError(f"exit layers {layers} contain duplicates; give each layer once")
    if layers != sorted(layers):
        raise ValueError(f"exit layers {layers} are not sorted; give them in increasing order")
    return layers


def right_padded(attention_mask: Tensor | None) -> bool:
    """True if every row of a 0/1 ``[batch, pos]`` mask is ones then zeros (padding on the right only)."""
    if attention_mask is None or attention_mask.ndim != 2 or attention_mask.shape[1] < 2:
        return False
    m = attention_mask.to(torch.int8)
    return bool(((m == 0) | (m == 1)).all() and (m[:, 1:] <= m[:, :-1]).all())


class _Stopped(Exception):
    """Ends a forward after the last block: the hook raising it holds the final residual."""


def _checkpointed(forward, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


@contextlib.contextmanager
def checkpointed_blocks(bridge, enabled: bool = True, heads: Sequence[nn.Module] = ()):
    """Activation checkpointing: inside, each block's norms, attention and MLP keep only their inputs
    for the backward, which recomputes them (less memory, about one more forward of compute).

    The norms count: an RMS norm keeps float32 copies of its input for its backward (a Qwen3 block's
    two norms held ~10 of the ~14 residual-sized tensors a checkpointed block kept per token when
    only attention and MLP were checkpointed). The residual-stream hooks (exit heads, freezes) sit
    between these modules, so they are not run again. `heads` (the exit heads) are checkpointed
    too: each keeps float32 copies of its input, its norm and its hidden layer (about eight
    residual-sized bfloat16 tensors per token and exitable layer), more than two blocks keep.
    Not for forwards that extend a KV cache (the recomputation would extend it twice).
    """
    if not enabled or not torch.is_grad_enabled():
        yield
        return
    parts = ("ln1", "attn", "ln2", "mlp")
    mods = [m for block in bridge.blocks for m in (getattr(block, p, None) for p in parts) if isinstance(m, nn.Module)]
    mods += list(heads)
    saved = [m.__dict__.get("forward") for m in mods]
    for m in mods:  # in the instance's own dict: the bridge's components forward setattr to what they wrap
        m.__dict__["forward"] = functools.partial(_checkpointed, m.forward)
    try:
        yield
    finally:
        for m, f in zip(mods, saved):
            if f is None:
                m.__dict__.pop("forward", None)
            else:
                m.__dict__["forward"] = f


@dataclass
class TeacherOutput:
    """Full-depth log-probs and the exit readout at each exitable layer (base model, no exits)."""

    logprobs: Float[Tensor, "batch pos vocab"]
    early_logprobs: Float[Tensor, "batch n_exit pos vocab"]


@dataclass
class PrescribedOutput:
    """Student outputs under prescribed exits."""

    logprobs: Float[Tensor, "batch pos vocab"]
    exit_logits: Float[Tensor, "batch pos n_exit"]
    exit_layers: Int[Tensor, "batch pos"]

    def exit_logprobs(self) -> Float[Tensor, "batch pos n_exit_plus_1"]:
        """Log of the heads' stick-breaking distribution over exits (last = no exit)."""
        return exit_log_probs(self.exit_logits)


class EarlyExitModel(nn.Module):
    """A bridge with exit heads. Build it with `attach_exit_heads`.

    Attributes:
        model: the untouched TransformerLens bridge.
        exit_layers: the exitable layers, increasing, within ``1 .. L-1``.
        heads: one head per exitable layer (`eetools.core.heads`: a learned `ExitHead`, or the
            parameter-free `ConfidenceHead` baseline).
        exit_readout: how an exited token's residual is read out (`eetools.core.lenses`): the
            `LogitLens` by default, or a `TunedLens`; see `set_readout`.
        calibration: ``{"kl_factor", "steps", "data"}`` of the calibration that trained the heads
            (None for fresh heads); kept through RL and checkpoints.
    """

    def __init__(
        self,
        model,
        layers: Sequence[int] | None = None,
        head: str = "mlp",
        seed: int | None = None,
        readout: str | Readout | None = None,
    ):
        super().__init__()
        check_hook_names(model)
        object.__setattr__(self, "model", model)  # not a submodule: parameters() = trainable ones
        self.n_layers: int = int(model.cfg.n_layers)
        self.exit_layers: list[int] = validate_exit_layers(layers, self.n_layers)
        self.head_kind = head
        d_model = int(model.cfg.d_model)
        with seeded_init(seed):
            self.heads = nn.ModuleList(
                [
                    make_head(head, d_model, functools.partial(self.readout, layer=l), int(model.cfg.d_vocab))
                    for l in self.exit_layers
                ]
            )
        self.exit_readout: Readout = make_readout(None)
        self.set_readout(readout if readout is not None else "logit")
        # how the heads were calibrated ({"kl_factor", "steps", "data"}), set by `calibrate`; saved and loaded
        self.calibration: dict | None = None
        self._exit_lookup: dict[torch.device, Tensor] = {}
        # the training forwards (`final_residual`) on the HF modules with fused attention
        # where nothing observes the bridge (`eetools.core.fast.bypass.hooked`); False: always the bridge's path
        self.fast_forwards: bool = True
        device = next(model.parameters()).device
        self.heads.to(device)

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def exit_index(self, exit_layers: Int[Tensor, ...]) -> Int[Tensor, ...]:
        """Map exit layers (exitable layer or L) to outcome indices 0..m (m = no exit)."""
        lookup = self._exit_lookup.get(exit_layers.device)
        if lookup is None:  # built once per device: decode steps call this every token
            lookup = torch.full((self.n_layers + 1,), -1, dtype=torch.long)
            lookup[self.exit_layers] = torch.arange(len(self.exit_layers))
            lookup[self.n_layers] = len(self.exit_layers)
            lookup = self._exit_lookup[exit_layers.device] = lookup.to(exit_layers.device)
        return lookup[exit_layers]

    def readout(self, resid: Float[Tensor, "... d_model"], layer: int | None = None) -> Float[Tensor, "... vocab"]:
        """The exit readout of `resid` entering `layer` (None: the final residual, read as it is).

        With the default `LogitLens`, ``unembed(ln_final(resid))`` at every layer
        (`eetools.core.lens.lens_logits`); with a `TunedLens`, its translator at `layer` first.
        """
        r = self.exit_readout
        if layer is None or r.identity:
            return lens_logits(self.model, resid)
        return lens_logits(self.model, r.translate(resid, layer))

    def set_readout(self, readout: str | Readout) -> Readout:
        """Read exited tokens out through `readout` ("logit", "tuned": an untrained `TunedLens` at the
        exitable layers, or a `Readout`); returns it, on the model's device.

        Only exited tokens' own predictions change: the residual later tokens attend to stays the frozen one.
        """
        r = make_readout(readout, d_model=int(self.model.cfg.d_model), layers=self.exit_layers)
        if isinstance(r, TunedLens):
            missing = [l for l in self.exit_layers if l not in r.layers]
            if missing or r.d_model != int(self.model.cfg.d_model):
                raise ValueError(
                    f"this TunedLens (d_model {r.d_model}, layers {r.layers}) cannot read out this model's exits "
                    f"(d_model {int(self.model.cfg.d_model)}, exit layers {self.exit_layers}): it lacks "
                    f"translators for layers {missing}; tune one for these exit layers"
                )
        self.exit_readout = r.to(self.device)
        return self.exit_readout

    def require_learned_heads(self, what: str) -> None:
        """Refuse to `what` (e.g. "calibrate") a model whose heads have nothing to learn."""
        if self.head_kind not in TRAINABLE_KINDS:
            raise ValueError(
                f"cannot {what}: this model's exit heads are {self.head_kind!r} heads, the parameter-free "
                f"logit-lens baseline, with nothing to train; attach learned heads "
                f"(head={' or '.join(map(repr, TRAINABLE_KINDS))}) to {what}"
            )

    def adapters_disabled(self):
        """Context in which LoRA adapters (if any) are off: the reference/base model."""
        from eetools.core.adapters import adapters_disabled

        return adapters_disabled(self)

    def _check_exit_layers(self, exit_layers: Tensor, shape) -> Tensor:
        if tuple(exit_layers.shape) != tuple(shape):
            raise ValueError(
                f"exit_layers has shape {tuple(exit_layers.shape)}, expected {tuple(shape)} (one per token)"
            )
        allowed = torch.tensor([*self.exit_layers, self.n_layers], device=exit_layers.device)
        ok = torch.isin(exit_layers, allowed)
        if not bool(ok.all()):
            bad = sorted(set(exit_layers[~ok].tolist()))
            raise ValueError(
                f"exit_layers holds {bad}: each position must hold an exitable layer "
                f"{self.exit_layers} or {self.n_layers} (no exit)"
            )
        return exit_layers.long()

    def _here(self, t: Tensor | None) -> Tensor | None:
        """`t` on the model's device (a no-op when it is there): public forwards accept tensors on any device."""
        return None if t is None else t.to(self.device)

    # ------------------------------------------------------------------ core
    def run_with_exits(
        self,
        tokens: Int[Tensor, "batch pos"],
        attention_mask: Tensor | None = None,
        *,
        exit_at: Tensor | None = None,
        decide: Decider | None = None,
        past_key_values=None,
        use_cache: bool = False,
        state: ExitState | None = None,
    ):
        """One forward with exits; returns (logits, exit_logits [b,pos,m], exit_at, cache).

        `exit_at` prescribes exits per position (L = none). `decide`, if given, decides
        exits of the last position on the fly at each exitable layer (rows that already
        exited there are skipped). Pass a `state` whose hooks are already attached (see
        `ExitState`) to run many forwards under one hook context, as generation does.
        """
        if state is None:  # a caller's tensors, on any device (generation passes its own, already there)
            tokens, attention_mask = self._here(tokens), self._here(attention_mask)
        b, t = tokens.shape
        fresh = exit_at is None  # no position exited: the state need not ask the device
        exit_at = (
            torch.full((b, t), self.n_layers, dtype=torch.long, device=tokens.device)
            if fresh
            else exit_at.clone().to(tokens.device)
        )
        ctx = contextlib.nullcontext()
        if state is None:
            state = ExitState(self)
            ctx = self.model.hooks(fwd_hooks=state.hooks())
        state.reset(exit_at, decide, fresh=fresh)
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        with ctx, norm_shortcut(self.model):
            if use_cache:
                logits, cache = self.model(tokens, return_type="logits_and_cache", **kwargs)
            else:
                logits, cache = self.model(tokens, return_type="logits", **kwargs), None
        if not state.logits:  # no head ran (generation with `heads=False`): logits that never exit
            return logits, torch.full((b, t, len(self.exit_layers)), VETOED, device=logits.device), state.exit_at, cache
        return logits, torch.stack(state.logits, dim=-1), state.exit_at, cache

    @torch.no_grad()
    def teacher_forward(self, tokens: Int[Tensor, "batch pos"], attention_mask: Tensor | None = None) -> TeacherOutput:
        """Base model (adapters off, no exits): full-depth log-probs and the exit readout at each exitable layer."""
        tokens, attention_mask = self._here(tokens), self._here(attention_mask)
        kwargs = {"attention_mask": attention_mask} if attention_mask is not None else {}
        # adapters off and the norm shortcut, for the forward and the readouts alike; the bridge's own path
        # (an analysis reference: bit for bit `capture_residuals`), unlike the training forwards' `final_residual`
        with capturing(self, self.exit_layers, base=True, norm_shortcut=True) as store:
            logits = self.model(tokens, return_type="logits", **kwargs)
            early = torch.stack([self.readout(store[l], l) for l in self.exit_layers], dim=1)
        return TeacherOutput(logprobs=logits.float().log_softmax(-1), early_logprobs=early.float().log_softmax(-1))

    def final_residual(
        self,
        tokens: Int[Tensor, "batch pos"],
        attention_mask: Tensor | None = None,
        *,
        exit_at: Tensor | None = None,
        capture: Sequence[int] = (),
        base: bool = False,
        past_key_values=None,
        checkpoint_blocks: bool = False,
    ) -> tuple[Tensor, Tensor | None, dict[int, Tensor]]:
        """One forward stopped after the last block, before the final norm and unembedding.

        Returns ``(resid, exit_logits, captured)``: the residual leaving the last block
        ``[batch, pos, d_model]`` (exits applied; `readout` of it is `run_with_exits`'s logits),
        the heads' logits ``[batch, pos, m]`` (None when `exit_at` is None: no exits, no heads),
        and ``{layer: residual entering it}`` for the layers in `capture`. No vocabulary-sized
        tensor is made: training losses read the residuals out chunk by chunk. `base`: adapters
        off; `past_key_values`: a KV cache, extended in place; `checkpoint_blocks`: see
        `checkpointed_blocks` (ignored with a cache).
        """
        L = self.n_layers
        tokens, attention_mask = self._here(tokens), self._here(attention_mask)
        state, hooks = None, []
        if exit_at is not None:
            state = ExitState(self)
            state.reset(self._check_exit_layers(exit_at.to(tokens.device), tokens.shape).clone(), None)
            hooks = state.hooks()
        box: dict[int, Tensor] = {}

        def stop(resid, hook):
            box[L] = resid
            raise _Stopped

        kwargs = {"attention_mask": attention_mask} if attention_mask is not None else {}
        # no KV cache unless one is extended: HF would make one, and a recomputed block extend it twice
        kwargs.update(past_key_values=past_key_values, use_cache=past_key_values is not None)
        store, grab = capture_hooks(self, capture)  # first: they see each residual before the exit hooks change it
        checkpointing = checkpoint_blocks and past_key_values is None
        with (
            base_and_shortcut(self, base, True),
            # the HF modules cannot take the bridge components' checkpointing: that stays on the bridge
            hooked(
                self, [*grab, *hooks, (resid_post(L - 1), stop)], fast=self.fast_forwards and not checkpointing
            ) as on_hf,
            checkpointed_blocks(self.model, checkpointing, heads=self.heads),
        ):
            if on_hf and past_key_values is None and right_padded(attention_mask):
                # causal attention never lets a real position see right padding: without the mask HF runs
                # plain causal attention (the fused kernel skips the masked half of the scores); padded
                # positions then attend to the pad tokens, finite values no loss reads
                del kwargs["attention_mask"]
            try:
                self.model(tokens, return_type="logits", **kwargs)
            except _Stopped:
                pass
            captured = dict(store)
        z = None if state is None else torch.stack(state.logits, dim=-1)
        return box[L], z, captured

    def prescribed_forward(
        self,
        tokens: Int[Tensor, "batch pos"],
        exit_layers: Int[Tensor, "batch pos"],
        attention_mask: Tensor | None = None,
    ) -> PrescribedOutput:
        """Student forward with the exit of every position given (L = no exit); differentiable.

        Position `p`'s exit decides the prediction of token `p+1`; give `L` to prompt positions.
        """
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
        tokens, attention_mask = self._here(tokens), self._here(attention_mask)
        exit_layers = self._check_exit_layers(exit_layers.to(tokens.device), tokens.shape)
        logits, z, exit_at, _ = self.run_with_exits(tokens, attention_mask, exit_at=exit_layers)
        return PrescribedOutput(logprobs=logits.float().log_softmax(-1), exit_logits=z, exit_layers=exit_at)

    def forward(self, tokens, exit_layers=None, attention_mask=None) -> PrescribedOutput:
        if exit_layers is None:
            exit_layers = torch.full_like(tokens, self.n_layers)
        return self.prescribed_forward(tokens, exit_layers, attention_mask)

    def generate(
        self,
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
    ):
        """Generate with exits; returns a `eetools.Rollout`. See `eetools.core.generation.generate`.

        The exit settings come as one `ExitRule` (`rule`) or as its fields (`mode`, `threshold`,
        `patience`, `min_confidence`, `max_entropy`). ``skip="compute"`` makes exits save time
        (exited tokens only compute keys and values in later blocks); the default ``"mask"`` is
        the exact reference.
        """
        return generate(
            self,
            prompts,
            max_new_tokens,
            rule=rule,
            mode=mode,
            temperature=temperature,
            threshold=threshold,
            patience=patience,
            min_confidence=min_confidence,
            max_entropy=max_entropy,
            seed=seed,
            use_cache=use_cache,
            skip=skip,
            heads=heads,
            progress=progress,
        )

    # ------------------------------------------------------------------ persistence
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Exit-head parameters plus LoRA adapter parameters, if any."""
        from eetools.core.adapters import adapter_parameters

        return list(self.heads.parameters()) + adapter_parameters(self)

    def __repr__(self) -> str:
        return (
            f"EarlyExitModel({getattr(self.model.cfg, 'model_name', '?')}, L={self.n_layers}, "
            f"exit_layers={self.exit_layers}, head={self.head_kind!r})"
        )


def attach_exit_heads(
    model,
    layers: Sequence[int] | None = None,
    *,
    head: str = "mlp",
    seed: int | None = None,
    readout: str | Readout | None = None,
) -> EarlyExitModel:
    """Attach exit heads to a TransformerLens bridge.

    Args:
        model: a `TransformerBridge` (e.g. from `eetools.load_model()`).
        layers: exitable layers, a strictly increasing subset of ``1 .. L-1``; None picks every
            layer for models up to 12 blocks, else about 8 evenly spaced layers.
        head: "mlp" (the authors' ``d -> 2d -> 1`` ReLU MLP), "linear", "lens" (the MLP also fed
            the logit lens at its layer), or "confidence" (no
            parameters: ``c_l`` is the logit lens's top probability at `l`; the baseline that
            exits where the early readout is confident, to compare learned heads with).
        seed: initialise the heads from this seed (the same heads in every process); None: from
            torch's global generator.
        readout: the exit readout (`eetools.core.lenses`): None or "logit" (the logit lens),
            "tuned" (an untrained `TunedLens`, equal to the logit lens until tuned), or a `Readout`.

    Example:
        >>> ee_model = eetools.attach_exit_heads(eetools.load_model(), layers=[2, 4, 6])
        >>> rollout = ee_model.generate("Q: 12+34\\n", max_new_tokens=40, seed=0)
        >>> rollout.exit_layers
    """
    if seed is not None:
        check_value("seed", seed, int)
    return EarlyExitModel(model, layers, head, seed, readout)

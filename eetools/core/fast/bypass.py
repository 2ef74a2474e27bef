"""Decode through the HF modules the bridge wraps, while no TransformerLens hook would fire.

A `TransformerBridge` runs the HF model with its own components installed in place of the HF
modules: each block, attention, MLP, norm and linear is a bridge component that fires its hook
points and calls the module it wraps (attention is re-implemented step by step, so hooks see
scores and patterns). At a decode step of a small model that wrapping is most of the time: on
the shipped 8-block model, one cached decode step at batch 32 on one CPU thread costs about
12-13 ms through the bridge and 7-9 ms through the HF modules, with the same numbers out
(`benchmarks/bench_exits.py` measures the whole sampling loop).

Inside `bridge_bypassed(ee_model, state)`:

1. every bridge component in the HF model's module tree is swapped back for the module it
   wraps (the block list for a list of the HF blocks), and everything is put back on exit,
   errors included. The bridge's own forward still runs around the HF model (tokens, the
   position ids it derives from a padded mask, the KV cache), so a call gives what the bridge
   gives: bit-identical rollouts on the shipped model (``tests/unit/test_bypass.py``);
2. the exit hooks of `state` (`ExitState.hooks`) are attached as PyTorch hooks on the HF
   decoder layers: the head reads the layer's input (the bridge's ``blocks.{l}.hook_resid_pre``)
   and the freeze rewrites its output (``blocks.{l}.hook_resid_post``);
3. the HF model stops collecting attention weights for the bridge (`_no_output_capture`).

It is used by the cached decode (`generate`) and by the teacher-forced training forwards
(`final_residual`: calibration's teacher and students, RL's policy and reference passes), through
`hooked`, and only where it changes nothing anyone can observe. `hooked(ee_model, hooks)` also
switches the HF model to its fused "sdpa" attention where nobody reads the patterns
(`eetools.core.fast.attention`): through the bridge, attention is re-implemented step by step
(the ``[batch, heads, pos, pos]`` scores and pattern exist, with their backward), about a third of
a calibration step on the shipped tiny reasoner. Its numbers equal the bridge's up to float rounding. It yields False, and the caller runs the bridge's own path, when
any hook point of the bridge carries a hook (a user's `run_with_hooks`, `hooks()` or a
permanent hook), when the bridge processed its weights or runs in compatibility mode (its
components then no longer compute what the HF modules compute), when a config flag asks for
split attention inputs or results, or when a component that compute skipping wraps is not an
HF module the HF forward calls (GPT-2's query, which the bridge splits from the fused
``c_attn``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

from torch import Tensor, nn

from eetools.core.fast.attention import fused_attention
from eetools.core.hooks import count_hooks, resid_post, resid_pre

# TransformerLens config flags under which the bridge computes attention or MLP inputs its own way
SPLIT_FLAGS = ("use_split_qkv_input", "use_attn_in", "use_attn_result", "use_hook_mlp_in")


def _is_bridge(module: nn.Module) -> bool:
    return isinstance(module._modules.get("_original_component"), nn.Module) and hasattr(module, "hook_out")


def _restore(undo: list[tuple[nn.Module, str, nn.Module]]) -> None:
    """Put back what `_swap_in_originals` replaced, last swap first."""
    for parent, name, was in reversed(undo):
        parent._modules[name] = was


def _swap_in_originals(root: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace every bridge component under `root` by the module it wraps; returns ``(parent, name, was)``."""
    undo: list[tuple[nn.Module, str, nn.Module]] = []
    seen: set[int] = set()

    def visit(module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            if _is_bridge(child):
                module._modules[name] = child._modules["_original_component"]
            elif isinstance(child, nn.ModuleList) and any(_is_bridge(c) for c in child):
                # the bridge's block list (also `bridge.blocks`): a new list, the bridge's stays as it is
                module._modules[name] = nn.ModuleList(
                    [c._modules["_original_component"] if _is_bridge(c) else c for c in child]
                )
            else:
                visit(child)
                continue
            undo.append((module, name, child))
            visit(module._modules[name])

    visit(root)
    return undo


def bypass_blocker(bridge: nn.Module) -> str | None:
    """Why the bridge cannot be bypassed now (in words), or None.

    `bridge_bypassed` also checks, once the tree is swapped, that the modules it needs are on the
    HF forward's path.
    """
    if count_hooks(bridge):
        return "hooks are attached to the bridge's hook points"
    if getattr(bridge, "compatibility_mode", False) or getattr(bridge, "_weights_processed", False):
        return "the bridge processed its weights (compatibility mode)"
    cfg = getattr(bridge, "cfg", None)
    on = [f for f in SPLIT_FLAGS if getattr(cfg, f, False)]
    if on:
        return f"the bridge's config sets {on}"
    if getattr(bridge, "original_model", None) is None or not hasattr(bridge, "blocks"):
        return "the bridge has no HF model with a block list"
    return None


def _layer_hooks(layer: nn.Module, pres: list[Callable], posts: list[Callable]) -> list:
    """Attach TransformerLens-style hook functions ``fn(resid, hook)`` to an HF decoder layer's input and output.

    They run in the order given, as the bridge runs several hooks on one hook point: each of `posts`
    sees the output the previous one returned (PyTorch passes a forward hook's result on).
    """
    handles = []
    for pre in pres:

        def on_input(module, args, kwargs, pre=pre):
            pre(args[0] if args else kwargs["hidden_states"], None)  # they only read (heads, captures)

        handles.append(layer.register_forward_pre_hook(on_input, with_kwargs=True))
    for post in posts:

        def on_output(module, args, output, post=post):
            hidden = output if isinstance(output, Tensor) else output[0]
            new = post(hidden, None)
            if new is None:
                return None
            return new if isinstance(output, Tensor) else (new, *output[1:])

        handles.append(layer.register_forward_hook(on_output))
    return handles


@contextlib.contextmanager
def bridge_bypassed(ee_model, state, needed: Iterable[nn.Module] = (), hooks: list | None = None):
    """Within this context the bridge's forward runs the HF modules directly, with `state`'s exit hooks on them.

    Args:
        ee_model: the `EarlyExitModel`.
        state: the `ExitState` of the forwards to come; its hooks are attached here (the caller
            must not attach them to the bridge as well).
        needed: bridge components whose wrapped modules must be on the HF forward's path
            (those that compute skipping will wrap).
        hooks: the ``(hook name, fn)`` pairs to attach (default ``state.hooks()``; generation with
            exits off leaves out the freeze hooks, which would never fire).

    Yields True if the bridge is bypassed, False if not (see `bypass_blocker`); then nothing was
    changed and the caller runs the bridge's own path, attaching the hooks itself.
    """
    bridge = ee_model.model
    needed = list(needed)
    if bypass_blocker(bridge) is not None:
        yield False
        return
    undo = _swap_in_originals(bridge.original_model)
    handles: list = []
    try:
        on_path = {id(m) for m in bridge.original_model.modules()}
        blocks = [b.original_component for b in bridge.blocks]
        by_name: dict[str, list[Callable]] = {}
        for name, fn in state.hooks() if hooks is None else hooks:
            by_name.setdefault(name, []).append(fn)
        points = {p for l in range(len(blocks)) for p in (resid_pre(l), resid_post(l))}
        # the HF modules must be those the bridge's forward calls, and every hook on a residual point they have
        ok = set(by_name) <= points and all(
            id(m) in on_path for m in [*blocks, *(c.original_component for c in needed)]
        )
        if ok:
            for l, layer in enumerate(blocks):
                handles += _layer_hooks(layer, by_name.get(resid_pre(l), []), by_name.get(resid_post(l), []))
        if not ok:  # put the bridge back before the caller runs its own path
            _restore(undo)
            undo = []
            yield ok
        else:
            with _no_output_capture(bridge.original_model):
                yield ok
    finally:
        for h in handles:
            h.remove()
        _restore(undo)


@contextlib.contextmanager
def hooked(
    ee_model, hooks: list[tuple[str, Callable]], *, fast: bool = True, fused: bool = True, needed: Iterable = ()
) -> Iterator[bool]:
    """Forwards of ``ee_model.model`` inside run with `hooks`; yields True if on the HF modules, False if on the bridge.

    `hooks` are ``(hook name, fn)`` pairs on ``hook_resid_pre`` / ``hook_resid_post`` points. With
    `fast` they run as PyTorch hooks on the HF decoder layers wherever `bridge_bypassed` allows
    (`needed`: bridge components whose wrapped modules must be on the HF forward's path), and then,
    with `fused`, HF's "sdpa" attention (False keeps eager: the bypass alone is bit for bit the
    bridge's path, as ``generate(skip="mask")`` needs). Otherwise, or with ``fast=False``, the hooks
    go on the bridge and its own path runs, bit for bit as before.
    """
    with contextlib.ExitStack() as stack:
        bypassed = fast and stack.enter_context(bridge_bypassed(ee_model, None, needed, hooks=hooks))
        if not bypassed:
            stack.enter_context(ee_model.model.hooks(fwd_hooks=hooks))
        elif fused:
            stack.enter_context(fused_attention(ee_model.model.original_model))
        yield bypassed


CAPTURE_MODULE = "transformers.utils.output_capturing"  # where HF's output-capturing hooks are defined


@contextlib.contextmanager
def _no_output_capture(hf_model: nn.Module):
    """Within this context `hf_model` neither collects attention weights nor calls HF's output-capturing hooks.

    The bridge sets ``config.output_attentions`` (its own attention reads the patterns), so each forward of
    the HF model collects every layer's attention weights through forward hooks HF installs on the decoder
    layers and attention modules (two per block), which also put every call of those modules on PyTorch's
    slower path with hooks. With the bridge bypassed nobody reads them: the flag is off and those hooks are
    detached for the context, and both put back as they were on exit (the hooks in their order).
    """
    config = getattr(hf_model, "config", None)
    before = getattr(config, "output_attentions", None)
    detached = []
    for module in hf_model.modules():
        for key, fn in list(module._forward_hooks.items()):
            if getattr(fn, "__module__", None) == CAPTURE_MODULE:
                detached.append((module, key, fn))
                del module._forward_hooks[key]
    if before:
        config.output_attentions = False
    try:
        yield
    finally:
        if before:
            config.output_attentions = before
        for module, key, fn in detached:
            module._forward_hooks[key] = fn
        for module in {id(m): m for m, _, _ in detached}.values():  # handle ids grow: their order is the keys'
            hooks = sorted(module._forward_hooks.items())
            module._forward_hooks.clear()
            module._forward_hooks.update(hooks)

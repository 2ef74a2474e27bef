"""The one home of hook names, and helpers that keep hooks from leaking.

TransformerLens 4's `TransformerBridge` keeps the HookedTransformer names:
``blocks.{l}.hook_resid_pre`` (alias of ``blocks.{l}.hook_in``) and
``blocks.{l}.hook_resid_post`` (alias of ``blocks.{l}.hook_out``). eetools only ever
attaches hooks through `model.hooks(...)`, a context manager that removes them on
exit, exceptions included.
"""

from __future__ import annotations


def resid_pre(layer: int) -> str:
    """Residual stream entering block `layer` (what an exit head at `layer` reads)."""
    return f"blocks.{layer}.hook_resid_pre"


def resid_post(layer: int) -> str:
    """Residual stream leaving block `layer` (where a frozen value is written back)."""
    return f"blocks.{layer}.hook_resid_post"


def required_hook_names(n_layers: int) -> list[str]:
    """Every hook name eetools uses on a model with `n_layers` blocks."""
    return [resid_pre(l) for l in range(n_layers)] + [resid_post(l) for l in range(n_layers)]


def check_hook_names(model) -> None:
    """Raise if the bridge lacks a hook eetools relies on (an unsupported architecture)."""
    missing = [n for n in required_hook_names(model.cfg.n_layers) if n not in model.hook_dict]
    if missing:
        raise ValueError(
            f"model {getattr(model.cfg, 'model_name', '?')} lacks hooks {missing[:4]}...; "
            "eetools needs a TransformerLens bridge with blocks.{l}.hook_resid_pre/post"
        )


def count_hooks(model) -> int:
    """Number of hooks attached anywhere on the model's hook points (0 = clean)."""
    total = 0
    for hp in set(model.hook_dict.values()):
        total += len(hp._forward_hooks) + len(hp._backward_hooks)
        total += len(getattr(hp, "fwd_hooks", [])) + len(getattr(hp, "bwd_hooks", []))
    return total

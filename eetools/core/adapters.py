"""LoRA adapters on the base weights (via peft), and switching them off for the reference model.

peft cannot target the bridge's `LinearBridge` wrappers, but each one keeps the original
`nn.Linear` as ``<name>._original_component``; `add_lora` injects peft LoRA layers there,
so the bridge (and its hooks) runs the adapted weights without a re-boot. Base weights
stay frozen and `adapters_disabled` gives back the base model exactly.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn

from eetools.core.seeding import seeded_init

DEFAULT_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "c_attn",
    "c_proj",
    "c_fc",
)

# bridge -> its LoRA layers with the slots holding them, found by one walk of the module tree (a
# thousand modules on the shipped model: a few ms, which every generate and reference pass paid)
_SLOTS: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()


def lora_slots(ee_model) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(parent, name, layer)`` for every peft LoRA layer in the bridge, ``parent._modules[name] is layer``.

    Found once per bridge and kept while every slot still holds its layer (or, inside
    `adapters_merged`, the layer's base layer). `add_lora` starts a new walk; after injecting
    adapters by other means, call `forget_lora_slots` on the bridge.
    """
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return []
    model = ee_model.model
    slots = _SLOTS.get(model)
    # a slot may hold the layer's base layer instead, inside `adapters_merged`
    if slots is None or any(parent._modules.get(name) not in (m, m.base_layer) for parent, name, m in slots):
        slots = [
            (parent, name, child)
            for parent in model.modules()
            for name, child in parent._modules.items()
            if isinstance(child, LoraLayer)
        ]
        _SLOTS[model] = slots
    return slots


def forget_lora_slots(bridge: nn.Module) -> None:
    """Make the next `lora_slots` walk the bridge's module tree again (after its adapters changed)."""
    _SLOTS.pop(bridge, None)


def remove_lora(ee_model) -> None:
    """Take every peft LoRA layer out of the bridge, putting its base layer back in its slot (undoes `add_lora`).

    Base weights' ``requires_grad`` stay as they are (`add_lora` froze them); the caller restores them.
    """
    for parent, name, m in lora_slots(ee_model):
        parent._modules[name] = m.get_base_layer()
    forget_lora_slots(ee_model.model)
    if hasattr(ee_model.model, "peft_config"):  # set by some peft versions on injection
        del ee_model.model.peft_config
    ee_model.lora_config = None


def lora_layers(ee_model) -> list[nn.Module]:
    """The peft LoRA layers injected into the bridge, each once (empty when there are none)."""
    return list(dict.fromkeys(m for _, _, m in lora_slots(ee_model)))


def adapter_parameters(ee_model) -> list[nn.Parameter]:
    """The LoRA parameters injected into the bridge (empty when there are none)."""
    return [p for n, p in ee_model.model.named_parameters() if "lora_" in n]


@contextlib.contextmanager
def adapters_disabled(ee_model):
    """Turn every LoRA adapter off inside the block (the base model), restoring the state after."""
    layers = lora_layers(ee_model)
    before = [not getattr(m, "disable_adapters", False) for m in layers]
    try:
        for m in layers:
            m.enable_adapters(False)
        yield
    finally:
        for m, on in zip(layers, before):
            m.enable_adapters(on)


@contextlib.contextmanager
def adapters_merged(ee_model):
    """Fold the active LoRA deltas into the base weights inside the block; restore them exactly after.

    The merged model computes the same function up to float rounding at the base model's
    cost (an unmerged peft layer adds two small matmuls and module calls per weight). The
    base weights are copied first and copied back after, so no rounding drift builds up
    over repeated calls. Inside the block the merged peft layers are also taken out of the
    module tree (their parents call the base layers directly, sparing a wrapper call per
    weight and token). Used by ``generate(skip="compute")``, the fast decode path.
    """
    # each active adapter with the parent slot that holds it
    swapped = [(parent, name, m) for parent, name, m in lora_slots(ee_model) if not m.merged and not m.disable_adapters]
    layers = [m for _, _, m in swapped]
    saved = [m.get_base_layer().weight.detach().clone() for m in layers]
    try:
        for m in layers:
            m.merge()
        # a merged peft layer only forwards to its base layer: call that directly inside the block
        for parent, name, m in swapped:
            parent._modules[name] = m.get_base_layer()
        yield
    finally:
        for parent, name, m in swapped:
            parent._modules[name] = m
        for m, w in zip(layers, saved):
            m.merged_adapters = []  # unmerged (weights restored below), without re-subtracting
            with torch.no_grad():
                m.get_base_layer().weight.copy_(w)


def add_lora(
    ee_model, r: int = 8, alpha: int = 16, dropout: float = 0.0, targets=DEFAULT_TARGETS, seed: int | None = None
) -> list[nn.Parameter]:
    """Inject LoRA adapters into the base model's linear layers; freeze the base weights.

    `seed` initialises the adapters (None: torch's global generator). Returns the adapter
    parameters (trainable). Calling it twice is an error.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if lora_layers(ee_model):
        raise ValueError("this model already has LoRA adapters")
    from transformers.pytorch_utils import Conv1D

    found = [
        (n, m)
        for n, m in ee_model.model.named_modules()
        if isinstance(m, (nn.Linear, Conv1D)) and any(f".{t}." in f".{n}." for t in targets)
    ]
    if not found:
        raise ValueError(f"no linear layers named {targets} found to adapt")
    names = [n for n, _ in found]
    conv1d = any(isinstance(m, Conv1D) for _, m in found)  # GPT-2 stores weights transposed
    for p in ee_model.model.parameters():
        p.requires_grad_(False)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none", fan_in_fan_out=conv1d
    )
    with seeded_init(seed):
        inject_adapter_in_model(config, ee_model.model)
    forget_lora_slots(ee_model.model)
    params = adapter_parameters(ee_model)
    for p in params:
        p.requires_grad_(True)
    ee_model.lora_config = {"r": r, "alpha": alpha, "dropout": dropout, "targets": list(targets)}
    return params

"""Saving and loading exit heads (and LoRA adapters) with a fingerprint of their base model.

A checkpoint folder holds ``heads.safetensors``, optionally ``adapters.safetensors`` and
``readout.safetensors`` (a tuned exit readout, `eetools.core.lenses`; the readout's config is
recorded either way), and
``exit_config.json`` with the exitable layers, head kind, LoRA settings, the calibration's
settings (KL factor, steps, data), the base model's fingerprint (architecture, sizes, a hash of the unembedding)
and the sha256 of each weight file. Loading into a model with another fingerprint is refused with an error
naming both models; a weight file whose sha256 differs from the recorded one (corrupt or changed) is refused
naming the file (checkpoints written before the hashes were recorded load unchecked).
A readout on its own (`save_readout`, `eetools tune-lens`) is ``readout.safetensors`` with
``readout.json``: its config, the base model's fingerprint and how it was tuned.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from eetools.core.lens import _split
from eetools.io.checkpoints import CheckpointError, file_sha256, load_json, load_tensors, save_json, save_tensors
from eetools.io.paths import data_dir

FORMAT = "eetools.exit_model/1"
READOUT_FORMAT = "eetools.readout/1"
READOUT_FILE = "readout.safetensors"
# "rl-slow-adapters": RL as "rl", with the adapters learning at a quarter of the heads' rate (docs/experiments.md, "Slower adapters")
# "rl-lam6": slower adapters, λ 6, 60 steps (seed 0); with patience 1 and a lens-confidence floor of 0.9 it
# saves 40 % of addition's layers within a point of the base model (docs/experiments.md, "Moved from README (2026-12-04)")
PRESETS = {
    "tiny-reasoner/calibrated": "tiny-reasoner-calibrated",
    "tiny-reasoner/rl": "tiny-reasoner-rl",
    "tiny-reasoner/rl-slow-adapters": "tiny-reasoner-rl-slow-adapters",
    "tiny-reasoner/rl-lam6": "tiny-reasoner-rl-lam6",
    # continued on the steps task's mixture of styles (column lines written or not), then calibrated
    "tiny-reasoner-mixed/calibrated": "tiny-reasoner-mixed-calibrated",
    # SmolLM2-135M-Instruct (the GGUF preset "smollm2-135m"): `eetools reproduce --model smollm2-135m`, then `ship`
    "smollm2-135m/calibrated": "smollm2-135m-calibrated",
    "smollm2-135m/rl": "smollm2-135m-rl",
}


PROBE_TOL = 0.02  # relative; bf16 rounding moves the probe by about 0.3 %, another model by about 100 %


def unembed_probe(w) -> list[float]:
    """Eight fixed random projections of W_U: the same model in another dtype gives nearly the same numbers.

    The hash of W_U identifies a model exactly but changes with its dtype (a bfloat16 copy of a
    float32 model rounds every weight); this probe tells the two apart from another model.
    """
    g = torch.Generator().manual_seed(0)
    left = torch.randn(8, w.shape[0], generator=g)
    right = torch.randn(w.shape[1], generator=g, dtype=torch.float64)
    # float32 for the big product (no float64 copy of W_U: 1.2 GB for a 151k-token vocabulary)
    return [float(v) for v in (left @ w).double() @ right / w.numel() ** 0.5]


def fingerprint(model) -> dict:
    """What identifies a base model: name, architecture, sizes, dtype, a hash of W_U and a probe of it."""
    cfg = model.cfg
    w = model.W_U.detach().to("cpu", torch.float32).contiguous()
    return {
        "name": str(getattr(cfg, "model_name", "?")).rstrip("/").split("/")[-1],
        "source": str(getattr(cfg, "model_name", "?")),
        "architecture": str(getattr(cfg, "architecture", None) or type(model.original_model).__name__),
        "n_layers": int(cfg.n_layers),
        "d_model": int(cfg.d_model),
        "d_vocab": int(cfg.d_vocab),
        "dtype": str(model.W_U.dtype).removeprefix("torch."),
        "unembed_sha256": hashlib.sha256(w.numpy().tobytes()).hexdigest()[:16],
        "unembed_probe": unembed_probe(w),
    }


def _same_unembed(have: dict, want: dict) -> bool:
    """Equal W_U hashes; or, across dtypes (e.g. heads saved from float32, loaded on bfloat16), close probes."""
    if have["unembed_sha256"] == want.get("unembed_sha256"):
        return True
    if have["dtype"] == want.get("dtype", "float32") or not want.get("unembed_probe"):
        return False
    a, b = torch.tensor(have["unembed_probe"]), torch.tensor(want["unembed_probe"])
    return bool((a - b).norm() <= PROBE_TOL * b.norm())


def _describe(fp: dict) -> str:
    return (
        f"{fp.get('name')} ({fp.get('architecture')}, L={fp.get('n_layers')}, d_model={fp.get('d_model')}, "
        f"vocab={fp.get('d_vocab')}, W_U {fp.get('unembed_sha256')})"
    )


def check_base_model(folder, want: dict, model) -> None:
    """Refuse a checkpoint whose recorded base model (`want`) is not `model`, naming both."""
    have = fingerprint(model)
    differs = [k for k in ("architecture", "n_layers", "d_model", "d_vocab") if have[k] != want.get(k)]
    if not _same_unembed(have, want):
        differs.append("unembed_sha256")
    if differs:
        hint = ""
        if differs == ["unembed_sha256"] and have["dtype"] != want.get("dtype", "float32"):
            hint = (
                f" (the checkpoint was saved from a {want.get('dtype', 'float32')} model without the probe that "
                f"compares across dtypes: load the base model in {want.get('dtype', 'float32')}, or re-save the "
                f"checkpoint with this version of eetools)"
            )
        raise CheckpointError(
            f"checkpoint {folder} belongs to {_describe(want)}, not to {_describe(have)}; "
            f"they differ in {', '.join(differs)}{hint}"
        )


def save_exit_model(ee_model, folder) -> None:
    """Write heads, adapters and config atomically into `folder`."""
    from eetools.core.adapters import adapter_parameters, lora_layers

    folder = Path(folder)
    save_tensors(ee_model.heads.state_dict(), folder / "heads.safetensors")
    lora = None
    if lora_layers(ee_model):
        state = {n: p for n, p in ee_model.model.named_parameters() if "lora_" in n}
        save_tensors(state, folder / "adapters.safetensors")
        lora = {k: v for k, v in (getattr(ee_model, "lora_config", {}) or {}).items()}
        lora["n_tensors"] = len(adapter_parameters(ee_model))
    files = ["heads.safetensors"] + (["adapters.safetensors"] if lora else [])
    readout = ee_model.exit_readout
    if not readout.identity:  # a tuned readout travels with the heads it was calibrated with
        save_tensors(readout.state_dict(), folder / READOUT_FILE)
        files.append(READOUT_FILE)
    save_json(
        {
            "format": FORMAT,
            "exit_layers": ee_model.exit_layers,
            "head": ee_model.head_kind,
            "base_model": fingerprint(ee_model.model),
            "lora": lora,
            "calibration": ee_model.calibration,
            "readout": readout.config(),
            "sha256": {name: file_sha256(folder / name) for name in files},  # checked on load
        },
        folder / "exit_config.json",
    )


def resolve_checkpoint(path_or_preset) -> Path:
    key = str(path_or_preset)
    if key in PRESETS:
        p = data_dir() / "models" / PRESETS[key]
        if not p.is_dir():
            raise CheckpointError(
                f"preset {key!r} is not shipped (expected {p}); if an `eetools ship` was interrupted, run it again"
            )
        return p
    p = Path(path_or_preset)
    if p.is_dir() and not (p / "exit_config.json").is_file():
        what = "a base model, not an exit model" if (p / "config.json").is_file() else "not an exit-model checkpoint"
        raise CheckpointError(
            f"{p} is {what} (no exit_config.json); give a folder written by save_exit_model or a preset: "
            f"{', '.join(PRESETS)}"
        )
    if not p.is_dir():
        raise CheckpointError(f"{p} is not an exit-model checkpoint folder (nor a preset: {', '.join(PRESETS)})")
    return p


def verify_files(folder, cfg: dict | None = None) -> None:
    """Refuse a weight file whose sha256 is not the one ``exit_config.json`` records (a corrupt or changed file).

    Checkpoints written before the hashes were recorded (no ``sha256`` entry) are not checked.
    """
    folder = Path(folder)
    cfg = cfg or load_json(folder / "exit_config.json")
    for name, want in (cfg.get("sha256") or {}).items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} does not exist")
        if file_sha256(path) != want:
            raise CheckpointError(
                f"checkpoint file {path} does not match the sha256 in {folder / 'exit_config.json'}: it is "
                f"corrupt or was changed; copy or save the checkpoint again"
            )


def load_weights_into(ee_model, folder, cfg: dict | None = None) -> None:
    """Load a checkpoint's heads (and adapters) into an existing, matching `EarlyExitModel` in place."""
    from eetools.core.adapters import lora_layers

    folder = Path(folder)
    cfg = cfg or load_json(folder / "exit_config.json")
    verify_files(folder, cfg)
    if cfg.get("base_model") is not None:  # e.g. a run folder left by an earlier version of the base model
        check_base_model(folder, cfg["base_model"], ee_model.model)
    if cfg["exit_layers"] != ee_model.exit_layers or cfg["head"] != ee_model.head_kind:
        raise CheckpointError(
            f"{folder} has exit layers {cfg['exit_layers']} ({cfg['head']} heads); the model has "
            f"{ee_model.exit_layers} ({ee_model.head_kind})"
        )
    _load_strict(ee_model.heads, load_tensors(folder / "heads.safetensors"), folder / "heads.safetensors")
    if bool(cfg.get("lora")) != bool(lora_layers(ee_model)):
        raise CheckpointError(
            f"{folder} {'has' if cfg.get('lora') else 'has no'} LoRA adapters but the model "
            f"{'has none' if cfg.get('lora') else 'has some'}"
        )
    _load_exit_readout(ee_model, folder, cfg.get("readout"))
    if cfg.get("lora"):
        state = load_tensors(folder / "adapters.safetensors")
        params = dict((n, p) for n, p in ee_model.model.named_parameters() if "lora_" in n)
        _check_keys(set(params), set(state), folder / "adapters.safetensors")
        with torch.no_grad():
            for n, p in params.items():
                if p.shape != state[n].shape:
                    raise CheckpointError(
                        f"{folder}/adapters.safetensors: {n} has shape {tuple(state[n].shape)}, "
                        f"model expects {tuple(p.shape)}"
                    )
                p.copy_(state[n])


def _load_exit_readout(ee_model, folder: Path, config: dict | None) -> None:
    """Give `ee_model` the exit readout a checkpoint records (the logit lens where it records none)."""
    from eetools.core.lenses import make_readout

    config = config or {"kind": "logit"}
    readout = make_readout(config["kind"], d_model=config.get("d_model", 0), layers=config.get("layers", ()))
    if not readout.identity:
        _load_strict(readout, load_tensors(folder / READOUT_FILE), folder / READOUT_FILE)
    ee_model.set_readout(readout)


def save_readout(model, readout, folder, *, tuning: dict | None = None) -> None:
    """Write a readout on its own into `folder`: ``readout.safetensors`` and ``readout.json`` (its
    config, the base model's fingerprint, how it was tuned, the weights' sha256), each atomically."""
    _, bridge = _split(model)
    folder = Path(folder)
    save_tensors(readout.state_dict(), folder / READOUT_FILE)
    save_json(
        {
            "format": READOUT_FORMAT,
            "readout": readout.config(),
            "base_model": fingerprint(bridge),
            "tuning": tuning,
            "sha256": {READOUT_FILE: file_sha256(folder / READOUT_FILE)},
        },
        folder / "readout.json",
    )


def load_readout(folder, model):
    """The readout saved in `folder` (by `save_readout`, or inside an exit-model checkpoint), checked
    against `model`'s fingerprint; raises a `CheckpointError` naming both models if it is another's."""
    from eetools.core.lenses import make_readout

    _, bridge = _split(model)
    folder = Path(folder)
    name = "readout.json" if (folder / "readout.json").is_file() else "exit_config.json"
    if not (folder / name).is_file():
        raise CheckpointError(f"{folder} holds no readout (no readout.json, nor an exit model's exit_config.json)")
    cfg = load_json(folder / name)
    verify_files(folder, cfg)
    if cfg.get("base_model") is not None:
        check_base_model(folder, cfg["base_model"], bridge)
    config = cfg.get("readout") or {"kind": "logit"}
    readout = make_readout(config["kind"], d_model=config.get("d_model", 0), layers=config.get("layers", ()))
    if not readout.identity:
        _load_strict(readout, load_tensors(folder / READOUT_FILE), folder / READOUT_FILE)
    return readout


def _check_keys(expected: set, found: set, path) -> None:
    missing, extra = sorted(expected - found), sorted(found - expected)
    if missing or extra:
        raise CheckpointError(
            f"{path} does not match the model: missing keys {missing[:8]}, unexpected keys {extra[:8]}"
        )


def _load_strict(module, state, path) -> None:
    own = module.state_dict()
    _check_keys(set(own), set(state), path)
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if v.shape != state[k].shape]
    if bad:
        raise CheckpointError(f"{path}: shape mismatch {bad[:4]}")
    module.load_state_dict(state, strict=True)

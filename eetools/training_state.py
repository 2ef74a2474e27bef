"""Checkpointing a training run of an exit model (calibration, RL): save, and resume exactly.

A run's folder holds ``model/`` (heads + adapters, `EarlyExitModel.save`), ``state.*``
(optimizer and every RNG state, pickle-free) and ``trainer.json`` (step, configuration,
and whatever history the run keeps). Resuming with a different configuration is refused
with the differing fields named.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from eetools.checkpoints import load_json, load_state, rng_state, save_json, save_state, set_rng_state

# fields that may change between a run and its resumption
RESUMABLE_CHANGES = ("steps", "checkpoint_every")


def save_run(ckpt: Path, ee_model, opt, cfg, step: int, **records) -> None:
    """Write model, optimizer, RNG states, step, config and `records` (e.g. history) atomically."""
    ckpt = Path(ckpt)
    ee_model.save(ckpt / "model")
    save_state({"optimizer": opt.state_dict(), "rng": rng_state()}, ckpt)
    save_json({"step": step, "config": dataclasses.asdict(cfg), **records}, ckpt / "trainer.json")


def resume_run(ckpt: Path, ee_model, opt, cfg) -> dict:
    """Load a saved run into `ee_model` and `opt` (and the RNGs); returns the saved trainer record."""
    from eetools.exit_checkpoint import load_weights_into

    ckpt = Path(ckpt)
    saved = load_json(ckpt / "trainer.json")
    now = dataclasses.asdict(cfg)
    diff = [k for k in now if k not in RESUMABLE_CHANGES and saved["config"].get(k) != now[k]]
    if diff:
        raise ValueError(f"cannot resume from {ckpt}: configuration differs in "
                         + ", ".join(f"{k} (saved {saved['config'].get(k)!r}, now {now[k]!r})" for k in diff))
    load_weights_into(ee_model, ckpt / "model")
    state = load_state(ckpt)
    opt.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return saved

"""Checkpointing a training run (calibration, RL, pretraining): save, and resume exactly.

A run's folder holds the model's weights (``model/`` for an exit model: heads + adapters,
`save_exit_model`; ``model.safetensors`` for the pretrained model), ``state.*`` (optimizer,
learning-rate scheduler if any, and every RNG state, pickle-free) and ``trainer.json``
(step, configuration, the run's `RunFiles.meta` such as the number of shards each step was
split into, the data, the run's kind and the model it started from, and whatever records the
run keeps, e.g. its history). Resuming with a different configuration, data, number of shards,
kind (calibrate, rl, pretrain) or starting model, or with fewer steps than already run, is
refused with the differing fields named. In a multi-process run only rank 0 writes; every rank resumes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eetools.io.checkpoints import (
    load_json,
    load_state,
    recover_checkpoint,
    rng_state,
    save_json,
    save_state,
    set_rng_state,
    staged_checkpoint,
)
from eetools.io.exit_checkpoint import save_exit_model
from eetools.train import distributed

# fields that may change between a run and its resumption (micro_batches: only processes x micro_batches matters;
# activation_checkpointing, one_pass_elements: memory and speed only, the same loss and gradients)
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "micro_batches", "activation_checkpointing", "one_pass_elements")


@dataclass
class RunFiles:
    """A run's checkpoint folder, and how its model is written and read back.

    `save_model(folder)` writes the weights into a (staging) checkpoint folder and
    `load_model(folder)` loads them from one. `meta` is written to ``trainer.json`` and
    checked on resume (``shards``: the random draws depend on it; ``data``: what the run
    trains on, a task or mixture name, None for a dataset). Fields of `cfg` outside
    `resumable` must be the saved ones.
    """

    folder: Path
    cfg: Any
    save_model: Callable[[Path], None]
    load_model: Callable[[Path], None]
    meta: dict = field(default_factory=dict)
    resumable: tuple[str, ...] = RESUMABLE_CHANGES

    def exists(self) -> bool:
        """Whether the folder holds a run to resume (the same answer on every rank)."""
        return has_checkpoint(self.folder)

    def save(self, step: int, opt, scheduler=None, **records) -> None:
        """Write model, optimizer (and scheduler), RNG states, step, config, meta and `records`, all or nothing.

        The parts are staged and moved into the folder together (`staged_checkpoint`), so a
        crash while saving leaves the previous checkpoint or the new one, never a mix. Only
        rank 0 writes (a no-op on the other ranks).
        """
        if not distributed.is_main():
            return
        with staged_checkpoint(self.folder) as stage:
            self.save_model(stage)
            save_state(
                {
                    "optimizer": opt.state_dict(),
                    **({"scheduler": scheduler.state_dict()} if scheduler else {}),
                    "rng": rng_state(),
                },
                stage,
            )
            save_json(  # unsorted: the history's columns come back in their order
                {"step": step, "config": dataclasses.asdict(self.cfg), **self.meta, **records},
                stage / "trainer.json",
                sort_keys=False,
            )

    def load(self, opt, scheduler=None) -> dict:
        """Load the saved run into the model, `opt` (and `scheduler`) and the RNGs; returns the saved trainer record."""
        saved = load_json(self.folder / "trainer.json")
        self._check(saved)
        self.load_model(self.folder)
        state = load_state(self.folder)
        opt.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        return saved

    def _check(self, saved: dict) -> None:
        self._check_origin(saved)
        ckpt, now = self.folder, dataclasses.asdict(self.cfg)
        # options added after the checkpoint was written: it ran with their defaults
        was_cfg = {**{f.name: _default(f) for f in dataclasses.fields(self.cfg)}, **saved["config"]}
        diff = [k for k in now if k not in self.resumable and was_cfg.get(k) != now[k]]
        if diff:
            raise ValueError(
                f"cannot resume from {ckpt}: configuration differs in "
                + ", ".join(f"{k} (saved {was_cfg.get(k)!r}, now {now[k]!r})" for k in diff)
            )
        data = self.meta.get("data")
        if saved.get("data") is not None and data is not None and saved["data"] != data:
            raise ValueError(
                f"cannot resume from {ckpt}: it trained on {saved['data']!r}, this run trains on "
                f"{data!r}; use another checkpoint folder"
            )
        was_id, now_id = saved.get("data_identity"), self.meta.get("data_identity")
        if was_id is not None and now_id is not None and was_id != now_id:
            raise ValueError(
                f"cannot resume from {ckpt}: its task had other settings (saved {was_id}, now {now_id}); resume "
                f"with the saved ones or use another checkpoint folder"
            )
        was, shards = saved.get("shards", 1), self.meta.get("shards", 1)
        if was != shards:
            raise ValueError(
                f"cannot resume from {ckpt}: its steps were split into {was} shard(s) (processes x "
                f"micro_batches), this run splits them into {shards}, and the random draws depend on "
                f"it; resume with processes x micro_batches = {was} (e.g. micro_batches={was} in one "
                f"process)"
            )

    def _check_origin(self, saved: dict) -> None:
        """Refuse another kind of run, another starting model, or a run already past the requested steps.

        Checkpoints written before the kind and start were recorded resume unchecked on those.
        """
        ckpt = self.folder
        for key, what in (("kind", "an `eetools {}` run"), ("start", "a run started from {!r}")):
            was, now = saved.get(key), self.meta.get(key)
            if was is not None and now is not None and was != now:
                raise ValueError(
                    f"cannot resume from {ckpt}: it is {what.format(was)}, this is {what.format(now)}; "
                    f"use another --out folder"
                )
        steps = getattr(self.cfg, "steps", None)
        if steps is not None and saved.get("step", 0) > steps:
            raise ValueError(
                f"cannot resume from {ckpt}: it has already run {saved['step']} steps, more than the {steps} "
                f"requested; pass --steps {saved['step']} or more, or use another --out folder"
            )


def exit_run_files(
    ckpt: str | Path | None,
    ee_model,
    cfg,
    *,
    shards: int = 1,
    data: str | None = None,
    kind: str | None = None,
    start: str | None = None,
    data_identity: str | None = None,
) -> RunFiles | None:
    """The `RunFiles` of training an exit model (heads + adapters in ``model/``); None without a folder.

    `kind` ("calibrate", "rl"), `start` (the model the run started from) and `data_identity` (the task's
    settings, `Task.identity`) are recorded and checked on resume (None: not checked)."""
    from eetools.io.exit_checkpoint import load_weights_into

    if ckpt is None:
        return None
    return RunFiles(
        Path(ckpt),
        cfg,
        save_model=lambda folder: save_exit_model(ee_model, folder / "model"),
        load_model=lambda folder: load_weights_into(ee_model, folder / "model"),
        meta={"shards": shards, "data": data, "data_identity": data_identity, "kind": kind, "start": start},
    )


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

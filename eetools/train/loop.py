"""The training loop shared by `calibrate`, `train_rl` and `pretrain`.

A method supplies ``step_fn(step) -> (row, has_gradient)``: it builds the step's batch, runs
the forward and backward passes (gradients accumulate in the parameters) and returns the
step's history row (a dict of floats, ``"step": step + 1`` included) and whether it left a
gradient to apply. `TrainLoop` does everything else, the same way for every method:

1. resume from the run's checkpoint (`RunFiles`) and give every rank rank 0's parameters;
2. per step: zero the gradients, call `step_fn`, stop on a non-finite statistic, average
   the gradients over ranks, stop on a non-finite gradient, step the optimizer (and the
   learning-rate scheduler); a stop saves the state from before the step, then raises
   `FloatingPointError` saying where it is;
3. append the row to the history, show progress (rank 0 only), call `on_step_end`, and
   checkpoint every ``cfg.checkpoint_every`` steps and at the last step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from eetools.train import distributed

if TYPE_CHECKING:  # the loop only calls a RunFiles' methods (importing it would add a level of imports)
    from eetools.train.state import RunFiles

StepFn = Callable[[int], "tuple[dict, bool]"]


def param_groups(ee_model, params: list, *, head_lr: float, adapter_lr: float) -> list[dict]:
    """AdamW groups of an exit model's trainable `params`: one group when the exit heads and the adapters
    share a rate, else the heads at `head_lr` and everything else (the LoRA adapters) at `adapter_lr`."""
    if head_lr == adapter_lr:
        return [{"params": params}]
    heads = {id(p) for p in ee_model.heads.parameters()}
    return [
        {"params": [p for p in params if id(p) in heads], "lr": head_lr},
        {"params": [p for p in params if id(p) not in heads], "lr": adapter_lr},
    ]


def _history(history: list[dict]) -> dict:
    return {"history": history}


def stop_note(ckpt: Path | None, step: int) -> str:
    """The end of a message stopping a run at `step`: where its state before that step is, and what to try."""
    if ckpt is None:
        return "; the weights are those before this step; a lower lr usually helps"
    return (
        f"; the state before step {step} is saved in {ckpt}; a lower lr usually helps (in a new "
        f"checkpoint folder: a run with another lr does not resume this one)"
    )


class TrainLoop:
    """One optimisation loop with resume, guards, gradient averaging, checkpoints and progress.

    Args:
        params: the trainable parameters (gradients averaged over ranks, checked, broadcast on start).
        opt: their optimizer; `scheduler`: an optional learning-rate scheduler stepped after it.
        cfg: the run's configuration (``steps``, ``checkpoint_every``).
        files: where and how the run is checkpointed (`RunFiles`); None: no checkpoints.
        name: the method's name in error messages; `desc`: the progress bar's label (default `name`).
        finite: history-row keys that must be finite, else the run stops before the optimizer step.
        records: what ``trainer.json`` keeps besides step, config and meta, from the history
            (default ``{"history": history}``; RL adds its evaluations).
        progress: show a progress bar (rank 0 only).
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        opt,
        cfg,
        files: RunFiles | None,
        *,
        name: str,
        desc: str | None = None,
        finite: Sequence[str] = ("loss",),
        records: Callable[[list[dict]], dict] = _history,
        progress: bool = True,
        scheduler=None,
    ):
        self.params, self.opt, self.cfg, self.files, self.scheduler = list(params), opt, cfg, files, scheduler
        self.name, self.desc, self.finite, self.records = name, desc or name, tuple(finite), records
        self.progress = progress
        self.start = 0
        self.history: list[dict] = []

    def resume(self) -> dict:
        """Load the run's checkpoint, if there is one, on every rank; then every rank takes rank 0's parameters.

        Returns the saved trainer record (empty without a checkpoint); the history and the
        first step to run are set from it.
        """
        saved = {}
        if self.files is not None and self.files.exists():
            saved = self.files.load(self.opt, self.scheduler)
            self.start, self.history = saved["step"], saved.get("history", [])
        distributed.broadcast_parameters(self.params)
        return saved

    def run(
        self,
        step_fn: StepFn,
        *,
        postfix: Callable[[dict], dict] | None = None,
        on_step_end: Callable[[int], None] | None = None,
    ) -> list[dict]:
        """Steps ``start .. cfg.steps - 1``; returns the history (one row per step, resumed rows first).

        `postfix(row)` gives the progress bar's postfix; `on_step_end(done)` runs after step
        ``done - 1`` is applied and recorded, before its checkpoint (e.g. held-out evaluations).
        """
        bar = tqdm(
            range(self.start, self.cfg.steps),
            initial=self.start,
            total=self.cfg.steps,
            desc=self.desc,
            disable=not self.progress or not distributed.is_main(),
        )
        for step in bar:
            self.opt.zero_grad(set_to_none=True)
            row, has_gradient = step_fn(step)
            bad = [k for k in self.finite if not math.isfinite(row[k])]
            if bad:
                self._stop(
                    step,
                    f"non-finite {self.name} statistics at step {step} ("
                    + ", ".join(f"{k}={row[k]}" for k in bad)
                    + "); stopped before the optimizer step",
                )
            if has_gradient:
                self._apply_gradients(step)
            self.history.append(row)
            if postfix is not None:
                bar.set_postfix(postfix(row))
            if on_step_end is not None:
                on_step_end(step + 1)
            if self.files is not None and ((step + 1) % self.cfg.checkpoint_every == 0 or step + 1 == self.cfg.steps):
                self.save(step + 1)
        return self.history

    def _apply_gradients(self, step: int) -> None:
        distributed.all_reduce_gradients(self.params)
        if not all(bool(torch.isfinite(p.grad).all()) for p in self.params if p.grad is not None):
            self._stop(step, f"non-finite gradient at {self.name} step {step}; not applied")
        self.opt.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def save(self, step: int) -> None:
        """Checkpoint the run as it is before step `step` (no-op without a checkpoint folder)."""
        if self.files is not None:
            self.files.save(step, self.opt, self.scheduler, **self.records(self.history))

    def _stop(self, step: int, message: str):
        self.save(step)
        raise FloatingPointError(message + stop_note(None if self.files is None else self.files.folder, step))

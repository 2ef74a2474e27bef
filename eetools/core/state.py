"""`ExitState`: what the exit heads' decision hooks and the freeze hooks share during a forward.

This is the frozen-residual mechanism: the decision hook on ``blocks.{l}.hook_resid_pre``
runs the head, optionally decides the last position's exit, and captures the residual of
positions exiting at `l`; the freeze hook on ``blocks.{j}.hook_resid_post`` writes it back
at every position whose exit layer is ``<= j``. `EarlyExitModel.run_with_exits` attaches
the hooks; `eetools.core.fast` reads `ExitState.running` to skip exited rows' compute.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from eetools.core.hooks import resid_post, resid_pre

if TYPE_CHECKING:
    from eetools.core.model import EarlyExitModel

# decide(i, z_last, resid) -> Bool[batch]: whether rows still running exit at exitable layer i
# (z_last: the head's logit at the last position; resid: the residual it read, every position,
# sliced by the decider only if it needs it)
Decider = Callable[[int, Tensor, Tensor], Tensor]


class ExitState:
    """What the decision and freeze hooks share during one forward.

    The decision hook on ``blocks.{l}.hook_resid_pre`` runs the head, optionally decides the
    last position's exit, and captures the residual of positions exiting at `l`; the freeze
    hook on ``blocks.{j}.hook_resid_post`` (``j >= first exitable layer``) writes the captured
    value back at every position whose exit layer is ``<= j``.
    """

    def __init__(self, ee_model: EarlyExitModel):
        self.ee = ee_model
        self.reset(None, None)

    def reset(self, exit_at: Tensor | None, decide: Decider | None) -> None:
        self.exit_at, self.decide = exit_at, decide
        self.frozen: Tensor | None = None
        self.logits: list[Tensor] = []
        # nothing to freeze until some position exits: the freeze hooks then cost nothing
        self.any_exit = exit_at is not None and bool((exit_at < self.ee.n_layers).any())
        self._running: dict[int, tuple[Tensor, int, int]] = {}
        # rows of the last position not exited yet, while deciding: a Python count kept from the
        # one device sync each decision needs anyway, so once every row has exited the later
        # heads only record their logits (no decision ops) and decode-step freezes copy `frozen`
        if decide is None:
            self.undecided = 0
        else:  # without any exit yet, every row; else count (some last positions may arrive exited)
            self.undecided = int((exit_at[:, -1] == self.ee.n_layers).sum()) if self.any_exit else len(exit_at)

    def running(self, layer: int) -> tuple[Tensor, int, int] | None:
        """``(rows, n, batch)``: indices of the rows still running at block `layer`, their number, the batch size.

        Only in a one-position forward: None if it covers several positions (a prefill, where a
        row is not one token) or if no row exited. Computed once per block and forward (one
        device sync): decisions at later layers cannot exit at or before `layer`. Used by
        `eetools.core.fast.skipping`.
        """
        if self.exit_at is None or not self.any_exit or self.exit_at.shape[1] != 1:
            return None
        if layer not in self._running:
            rows = (self.exit_at[:, -1] > layer).nonzero().squeeze(1)  # indices: cheaper to gather than a mask
            self._running[layer] = (rows, int(rows.numel()), len(self.exit_at))
        return self._running[layer]

    def hooks(self) -> list:
        ee, L = self.ee, self.ee.n_layers

        def on_pre(i: int, layer: int):
            head = ee.heads[i]

            def hook(resid, hook):
                z = head(resid)
                self.logits.append(z)
                exit_at = self.exit_at
                fire = None
                if self.undecided:
                    last = exit_at[:, -1]  # a view: written in place below
                    fire = self.decide(i, z[:, -1], resid)
                    if self.undecided < len(last):  # rows that exited earlier do not exit again
                        fire = fire & (last == L)
                    n_fired = int(fire.sum())
                    if n_fired == 0:
                        fire = None
                    else:
                        last.masked_fill_(fire, layer)
                        self.any_exit = True
                        self.undecided -= n_fired
                # positions exiting at this layer; at a decode step (one position) those that fired here
                if self.decide is not None and exit_at.shape[1] == 1:
                    here = None if fire is None else fire[:, None, None]
                else:
                    here = (exit_at == layer).unsqueeze(-1) if self.any_exit else None
                if here is not None:
                    self.frozen = torch.where(here, resid, resid if self.frozen is None else self.frozen)
                return None

            return hook

        def on_post(layer: int):
            def hook(resid, hook):
                if not self.any_exit:
                    return None
                if self.exit_at.shape[1] == 1:  # a decode step: nothing to do unless some rows are frozen here
                    _, n, batch = self.running(layer)
                    if n == batch:
                        return None
                    if n == 0:
                        return self.frozen.clone()
                return torch.where((self.exit_at <= layer).unsqueeze(-1), self.frozen, resid)

            return hook

        fwd = [(resid_pre(l), on_pre(i, l)) for i, l in enumerate(ee.exit_layers)]
        return fwd + [(resid_post(j), on_post(j)) for j in range(ee.exit_layers[0], L)]

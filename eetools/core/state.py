"""`ExitState`: what the exit heads' decision hooks and the freeze hooks share during a forward.

This is the frozen-residual mechanism: the decision hook on ``blocks.{l}.hook_resid_pre``
runs the head, optionally decides the last position's exit, and captures the residual of
positions exiting at `l`; the freeze hook on ``blocks.{j}.hook_resid_post`` writes it back
at every position whose exit layer is ``<= j``. With a translating exit readout (a `TunedLens`),
the last block's freeze hook also translates each exited position's stream for its own readout
(nothing but the final norm reads the stream leaving the last block, so later tokens' keys and
values still come from the frozen residual). `EarlyExitModel.run_with_exits` attaches
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

    def reset(self, exit_at: Tensor | None, decide: Decider | None, *, fresh: bool = False) -> None:
        """Start a forward with exits `exit_at` ``[batch, pos]`` (L: none) and `decide` (None: exits prescribed).

        `fresh`: the caller built `exit_at` with no exit at all, so it is not read on the device
        (one sync less per decode step).
        """
        self.exit_at, self.decide = exit_at, decide
        self.frozen: Tensor | None = None
        self.logits: list[Tensor] = []
        # nothing to freeze until some position exits: the freeze hooks then cost nothing
        self.any_exit = exit_at is not None and not fresh and bool((exit_at < self.ee.n_layers).any())
        self._running: dict[int, tuple[Tensor, int, int]] = {}
        # rows of the last position not exited yet, while deciding: a Python count kept from the
        # one device sync each decision needs anyway, so once every row has exited the later
        # heads only record their logits (no decision ops) and decode-step freezes copy `frozen`
        if decide is None:
            self.undecided = 0
        else:  # without any exit yet, every row; else count (some last positions may arrive exited)
            self.undecided = int((exit_at[:, -1] == self.ee.n_layers).sum()) if self.any_exit else len(exit_at)
        # a decode step whose rows all arrive undecided: the rows running at a block are exactly the
        # undecided ones, so `running` knows their number without asking the device
        self._counted = decide is not None and not self.any_exit and exit_at.shape[1] == 1
        self._rows: tuple[int, Tensor] | None = None  # (running count, their indices) last found

    def running(self, layer: int) -> tuple[Tensor | None, int, int] | None:
        """``(rows, n, batch)``: indices of the rows still running at block `layer`, their number, the batch size.

        Only in a one-position forward: None if it covers several positions (a prefill, where a
        row is not one token) or if no row exited. ``rows`` is None when ``n`` is 0 or the batch
        (nobody needs the indices then). Called only while block `layer` runs (by its freeze hook
        and by `eetools.core.fast.skipping`), after every decision at layers ``<= layer``.

        Device syncs: at a decode step the count comes from the decisions' own sync (`undecided`),
        so finding the rows needs one more sync only where some but not all rows exited, and only
        when that changed since the last block: at most once per exitable layer, never at batch
        1. Elsewhere (prescribed exits) once per block and forward.
        """
        if self.exit_at is None or not self.any_exit or self.exit_at.shape[1] != 1:
            return None
        batch = len(self.exit_at)
        if self._counted:
            n = self.undecided
            if n in (0, batch):
                return None, n, batch
            if self._rows is None or self._rows[0] != n:  # rows only ever leave: the same count, the same rows
                self._rows = (n, self.exit_at[:, -1].eq(self.ee.n_layers).nonzero().squeeze(1))
            return self._rows[1], n, batch
        if layer not in self._running:
            rows = (self.exit_at[:, -1] > layer).nonzero().squeeze(1)  # indices: cheaper to gather than a mask
            n = int(rows.numel())
            self._running[layer] = (None if n in (0, batch) else rows, n, batch)
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

        readout = ee.exit_readout
        if not readout.identity:  # the last block's freeze also translates exited tokens for their own readout
            freeze = on_post

            def on_post(layer: int):  # noqa: F811 (the freeze above, then the translation at the last block)
                inner = freeze(layer)
                if layer != L - 1:
                    return inner

                def hook(resid, hook):
                    out = inner(resid, hook)
                    if not self.any_exit:
                        return out
                    return readout.translate_exited(resid if out is None else out, self.exit_at)

                return hook

        fwd = [(resid_pre(l), on_pre(i, l)) for i, l in enumerate(ee.exit_layers)]
        return fwd + [(resid_post(j), on_post(j)) for j in range(ee.exit_layers[0], L)]

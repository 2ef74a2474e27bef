"""Seeded initialisation: new weights drawn from a seed without touching torch's global generator."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def seeded_init(seed: int | None) -> Iterator[None]:
    """Random initialisation inside the block drawn from the CPU generator seeded with `seed`, leaving
    torch's global generator as it was; None: from the global generator, as usual."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield

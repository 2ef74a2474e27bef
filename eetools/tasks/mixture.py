"""A mixture of tasks, named ``"addition+tom"``: samples alternate between the parts."""

from __future__ import annotations

import random

from eetools.tasks.base import Example, Task


class MixtureTask(Task):
    """Examples drawn in turn from each part; scoring and steps dispatch on `example.task`."""

    def __init__(self, parts: list[Task]):
        if len(parts) < 2:
            raise ValueError("a mixture needs at least two tasks")
        self.parts = {p.name: p for p in parts}
        self.name = "+".join(self.parts)
        self.max_new_tokens = max(p.max_new_tokens for p in parts)

    def sample(self, n: int, seed: int | str) -> list[Example]:
        per = [p.sample((n + len(self.parts) - 1 - i) // len(self.parts), seed) for i, p in enumerate(self.parts.values())]
        out = [ex for group in zip(*[g + [None] * (max(map(len, per)) - len(g)) for g in per]) for ex in group if ex]
        return out[:n]

    def _make(self, rng: random.Random) -> Example:  # pragma: no cover - sample is overridden
        return rng.choice(list(self.parts.values()))._make(rng)

    def _part(self, example: Example) -> Task:
        return self.parts[example.task]

    def score(self, example: Example, completion: str) -> float:
        try:
            return self._part(example).score(example, completion)
        except Exception:
            return 0.0

    def is_well_formed(self, completion: str) -> bool:
        return any(p.is_well_formed(completion) for p in self.parts.values())

    def steps(self, example: Example, completion: str) -> list[bool]:
        return self._part(example).steps(example, completion)

    def test_split(self) -> list[Example]:
        splits = [p.test_split() for p in self.parts.values()]
        return [ex for group in zip(*splits) for ex in group]

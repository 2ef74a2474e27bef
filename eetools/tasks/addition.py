"""Multi-digit addition written out column by column with the carries.

Prompt and reasoning for 4821 + 397::

    Q: 4821+397
    1+7+0=8
    2+9+0=11
    8+3+1=12
    4+0+1=5
    A: 5218

Each reasoning line is ``<digit of a>+<digit of b>+<carry in>=<column sum>``, from the
units column up (the shorter operand padded with zeros); the carry into the next column
is the tens digit of the column sum.
"""

from __future__ import annotations

import random
import re

from eetools.tasks.base import ANSWER_PREFIX, Example, Task
from eetools.tasks.columns import column_steps

__all__ = ["AdditionTask", "column_steps"]

_STEP = re.compile(r"^(\d)\+(\d)\+([01])=(\d{1,2})$")
_WELL_FORMED = re.compile(r"^(\d\+\d\+[01]=\d{1,2}\n)+A: \d+\n?$")


class AdditionTask(Task):
    """Addition of two operands of `min_digits` to `max_digits` digits each."""

    name = "addition"
    max_new_tokens = 80  # 5-digit sums: at most 56 characters of reasoning

    def __init__(self, min_digits: int = 2, max_digits: int = 5):
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
        self.min_digits, self.max_digits = min_digits, max_digits

    def _operand(self, rng: random.Random) -> int:
        d = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(10 ** (d - 1), 10**d - 1)

    def make(self, a: int, b: int) -> Example:
        """The example for `a + b` (both non-negative)."""
        steps = column_steps(a, b)
        reasoning = "".join(f"{x}+{y}+{c}={s}\n" for x, y, c, s in steps)
        reasoning += f"{ANSWER_PREFIX}{a + b}\n"
        return Example(
            task=self.name, prompt=f"Q: {a}+{b}\n", reasoning=reasoning, answer=str(a + b), meta={"a": a, "b": b}
        )

    def _make(self, rng: random.Random) -> Example:
        return self.make(self._operand(rng), self._operand(rng))

    def is_well_formed(self, completion: str) -> bool:
        return bool(_WELL_FORMED.match(completion))

    def steps(self, example: Example, completion: str) -> list[bool]:
        """One entry per expected column: the line is present, well-formed and right."""
        truth = column_steps(int(example.meta["a"]), int(example.meta["b"]))
        lines = completion.split("\n") if isinstance(completion, str) else []
        out = []
        for i, (x, y, c, s) in enumerate(truth):
            m = _STEP.match(lines[i]) if i < len(lines) else None
            out.append(bool(m) and tuple(int(g) for g in m.groups()) == (x, y, c, s))
        return out

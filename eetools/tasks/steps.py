"""Addition with optional column lines: the model chooses how much of its reasoning to write.

The same sums as `eetools.tasks.addition`, in one of three styles that the verifier treats alike
(it scores the answer line only):

- ``full``: every column line, as in `AdditionTask`;
- ``partial``: the first ``k`` column lines (``1 <= k < n``), then the answer;
- ``terse``: the answer line alone.

For 47 + 38 the prompt is ``"S: 47+38\\n"`` (its own marker, so a mixture with ``addition`` keeps
both formats apart) and the completions are::

    full             partial          terse
    7+8+0=15         7+8+0=15         A: 85
    4+3+1=8          A: 85
    A: 85

Why: a task whose steps are always written leaves nothing to externalise. Here a model that
skips the column lines must compute the column sums and carries silently, in its layers, before
the answer; one that writes them can copy. `StepsTask.intermediates` gives those values and where
each would be written, so a probe can look for them in the residual stream when they are not
(`eetools.analysis.externalisation`), and `StepsTask.verbosity` measures how much was written.

The training mixture draws a style per example with a probability that depends on the sum: sums
without a carry are written tersely more often (`p_terse_easy`) than sums with one
(`p_terse_hard`), so a model trained on it chooses between styles (a learnable preference, not a
coin flip the greedy decoder would always settle the same way).
"""

from __future__ import annotations

import random
import re

from eetools.tasks.base import ANSWER_PREFIX, Example, Task
from eetools.tasks.columns import column_steps

STYLES = ("full", "partial", "terse")
PROMPT_PREFIX = "S: "
_STEP = re.compile(r"^(\d)\+(\d)\+([01])=(\d{1,2})$")
_WELL_FORMED = re.compile(r"^(\d\+\d\+[01]=\d{1,2}\n)*A: \d+\n?$")


def _lines(a: int, b: int) -> list[str]:
    return [f"{x}+{y}+{c}={s}\n" for x, y, c, s in column_steps(a, b)]


class StepsTask(Task):
    """Sums of `min_digits` to `max_digits`-digit operands, column lines optional.

    Args:
        min_digits, max_digits: operand lengths (each drawn uniformly).
        style: the style of every sampled example, or "mixed" for the training mixture.
        p_terse_easy: with "mixed", probability of the terse style for a sum with no carry.
        p_terse_hard: with "mixed", probability of the terse style for a sum with a carry.
        p_partial: with "mixed", probability that a written (non-terse) example stops early.
    """

    name = "steps"
    max_new_tokens = 48  # 3-digit sums: 3 lines of <= 9 characters, the answer and EOS

    def __init__(
        self,
        min_digits: int = 2,
        max_digits: int = 3,
        style: str = "mixed",
        p_terse_easy: float = 0.7,
        p_terse_hard: float = 0.3,
        p_partial: float = 0.3,
    ):
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
        if style not in (*STYLES, "mixed"):
            raise ValueError(f"style must be one of {', '.join((*STYLES, 'mixed'))}, got {style!r}")
        for n, p in (("p_terse_easy", p_terse_easy), ("p_terse_hard", p_terse_hard), ("p_partial", p_partial)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{n} must be a probability in [0, 1], got {p!r}")
        self.min_digits, self.max_digits, self.style = min_digits, max_digits, style
        self.p_terse_easy, self.p_terse_hard, self.p_partial = p_terse_easy, p_terse_hard, p_partial
        self.max_new_tokens = 10 * max_digits + max_digits + 8

    def _operand(self, rng: random.Random) -> int:
        d = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(10 ** (d - 1), 10**d - 1)

    def make(self, a: int, b: int, style: str = "full", written: int | None = None) -> Example:
        """The example for `a + b` in `style`; `written` column lines for "partial" (default: half)."""
        lines = _lines(a, b)
        n = len(lines)
        if style == "full":
            k = n
        elif style == "terse":
            k = 0
        elif style == "partial":
            k = max(1, n // 2) if written is None else written
            if not 0 <= k <= n:
                raise ValueError(f"written must be in 0..{n} for {a}+{b}, got {written}")
        else:
            raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
        reasoning = "".join(lines[:k]) + f"{ANSWER_PREFIX}{a + b}\n"
        return Example(
            task=self.name,
            prompt=f"{PROMPT_PREFIX}{a}+{b}\n",
            reasoning=reasoning,
            answer=str(a + b),
            meta={"a": a, "b": b, "style": style, "written": k, "columns": n},
        )

    def _make(self, rng: random.Random) -> Example:
        a, b = self._operand(rng), self._operand(rng)
        style = self.style
        if style == "mixed":
            hard = any(s >= 10 for *_, s in column_steps(a, b))
            if rng.random() < (self.p_terse_hard if hard else self.p_terse_easy):
                style = "terse"
            else:
                style = "partial" if rng.random() < self.p_partial else "full"
        n = len(column_steps(a, b))
        if style == "partial":
            if n < 2:
                style = "full"
            else:
                return self.make(a, b, "partial", written=rng.randint(1, n - 1))
        return self.make(a, b, style)

    def is_well_formed(self, completion: str) -> bool:
        return bool(_WELL_FORMED.match(completion))

    def written_lines(self, completion: str) -> int:
        """Number of column lines before the answer line (well-formed or not)."""
        if not isinstance(completion, str):
            return 0
        n = 0
        for line in completion.split("\n"):
            if line.startswith(ANSWER_PREFIX):
                break
            n += bool(line.strip())
        return n

    def steps(self, example: Example, completion: str) -> list[bool]:
        """One entry per *written* column line: well-formed and right (an empty list for a terse answer)."""
        truth = column_steps(int(example.meta["a"]), int(example.meta["b"]))
        lines = completion.split("\n")[: self.written_lines(completion)]
        out = []
        for i, line in enumerate(lines):
            m = _STEP.match(line)
            out.append(i < len(truth) and bool(m) and tuple(int(g) for g in m.groups()) == truth[i])
        return out

    def verbosity(self, example: Example, completion: str) -> float:
        """Share of the sum's column lines written before the answer: 0 terse, 1 full (capped at 1)."""
        n = len(column_steps(int(example.meta["a"]), int(example.meta["b"])))
        return min(1.0, self.written_lines(completion) / n)

    @staticmethod
    def style_of(example: Example, completion: str) -> str:
        """ "terse", "partial" or "full" according to how many column lines `completion` writes."""
        n = len(column_steps(int(example.meta["a"]), int(example.meta["b"])))
        k = StepsTask().written_lines(completion)
        return "terse" if k == 0 else ("full" if k >= n else "partial")

    @staticmethod
    def intermediates(example: Example) -> list[dict]:
        """The silent work of a terse answer, one row per column (units first).

        Each row: ``column``; ``sum`` (column sum, 0..19); ``digit`` (its units digit, the answer's
        digit of that column); ``carry_out`` (0 or 1); ``offset``: the character offset in the
        completion where the column's line starts in the full style (so the line is unwritten
        in a completion that has fewer than ``column + 1`` lines and its value, if the answer is
        right, was computed silently).
        """
        a, b = int(example.meta["a"]), int(example.meta["b"])
        out, offset = [], 0
        for i, (x, y, c, s) in enumerate(column_steps(a, b)):
            out.append({"column": i, "sum": s, "digit": s % 10, "carry_out": s // 10, "offset": offset})
            offset += len(f"{x}+{y}+{c}={s}\n")
        return out

    def test_split(self) -> list[Example]:
        """200 held-out sums (terse references), drawn from their own seed; no shipped file needed.

        The prompts never depend on the style, so the same split serves every style.
        """
        return StepsTask(self.min_digits, self.max_digits, style="terse").sample(200, seed="test")

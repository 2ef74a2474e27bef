"""The task protocol: seeded example generators with a written chain-of-thought format and a verifier.

A task produces `Example`s (a prompt, the reasoning the model should write, and the
answer) and scores completions. Scores follow the paper's verifier: 1 for a correct,
well-formed answer, `malformed_score` (default -1, the authors' choice) for a correct
answer written in the wrong format, and 0 otherwise.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from eetools.tasks.protocols import AnswerLine, AnswerProtocol

ANSWER_PREFIX = AnswerLine.prefix
# the seed of `Task.validation_split`: a named stream, apart from the integer seeds training uses
VALIDATION_SEED = "validation"


@dataclass(frozen=True)
class Example:
    """One task instance.

    Attributes:
        task: name of the task that made it.
        prompt: the text given to the model (ends with a newline).
        reasoning: the written chain of thought the model should produce, ending with
            the answer line ``"A: <answer>\\n"``.
        answer: the answer alone, as a string.
        meta: task-specific facts the verifier and judges use (operands, story events...).
    """

    task: str
    prompt: str
    reasoning: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """Prompt followed by the reference completion."""
        return self.prompt + self.reasoning

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> Example:
        d = json.loads(line)
        return cls(
            task=d["task"], prompt=d["prompt"], reasoning=d["reasoning"], answer=d["answer"], meta=d.get("meta", {})
        )


class Task:
    """Base class of eetools tasks. Subclasses implement `_make`, `is_well_formed` and `steps`.

    Attributes:
        name: registry name.
        protocol: how completions state their answer (`extract_answer` and `cut` go through it);
            the shipped tasks write an ``"A: "`` line.
        malformed_score: score of a correct answer in a malformed completion.
        max_new_tokens: tokens that fit the longest written reasoning of the task (with its
            answer and EOS); generation for this task uses it when not told otherwise.
    """

    name: str = ""
    protocol: AnswerProtocol = AnswerLine()
    malformed_score: float = -1.0
    max_new_tokens: int = 128

    @property
    def identity(self) -> str:
        """What decides the task's examples and rewards, recorded by training runs and checked on resume (the
        name, for tasks without settings; a reasoning-gym task adds its config)."""
        return self.name

    def sample(self, n: int, seed: int | str) -> list[Example]:
        """Draw `n` fresh examples; the same `seed` always gives the same list (a longer one extends it)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = random.Random(f"{self.name}:{seed}")
        return [self._make(rng) for _ in range(n)]

    def _make(self, rng: random.Random) -> Example:  # pragma: no cover - abstract
        raise NotImplementedError

    def is_well_formed(self, completion: str) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def steps(self, example: Example, completion: str) -> list[bool]:  # pragma: no cover
        """Per written reasoning step, whether it is well-formed and correct."""
        raise NotImplementedError

    def coherence(self, example: Example, completion: str) -> float:
        """Fraction of the written reasoning steps that are well-formed and right (0 if none are written).

        Never raises: anything that is not a string, or a completion the step checker chokes on,
        scores 0. `eetools.analysis.judges.ReasoningJudge` and RL's coherence column use it.
        """
        try:
            if not isinstance(completion, str):
                return 0.0
            steps = self.steps(example, completion)
            return float(sum(steps) / len(steps)) if steps else 0.0
        except Exception:
            return 0.0

    def extract_answer(self, completion: str) -> str | None:
        """The answer the completion states under the task's protocol (its last one), or None if there is none."""
        return self.protocol.extract(completion)

    def cut(self, example: Example, completion: str) -> str:
        """`completion` up to and including its first answer (what the verifier reads; RL and evaluation
        score this). `example` picks the part of a mixture; a plain task reads only its protocol."""
        return self.protocol.cut(completion)

    def score(self, example: Example, completion: str) -> float:
        """Verifier: 1.0 correct and well-formed, `malformed_score` correct but malformed, else 0.0.

        Never raises, whatever `completion` is.
        """
        try:
            answer = self.extract_answer(completion)
            if answer is None or answer != example.answer:
                return 0.0
            return 1.0 if self.is_well_formed(completion) else float(self.malformed_score)
        except Exception:  # a verifier must never take a training run down
            return 0.0

    def validation_split(self, n: int) -> list[Example]:
        """`n` held-out examples for choosing settings (an exit threshold) without looking at the test split.

        Drawn from the task's generator with a seed of their own (training draws with integer
        seeds, this stream is named), leaving out any prompt of the test split. The same `n`
        always gives the same list, and a smaller `n` a prefix of it.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        test = {e.prompt for e in self.test_split()}
        draw = n
        while True:
            exs = [e for e in self.sample(draw, seed=VALIDATION_SEED) if e.prompt not in test]
            if len(exs) >= n or draw > 10 * n:
                return exs[:n]
            draw = 2 * draw + 1

    def test_split(self) -> list[Example]:
        """The frozen held-out split shipped in ``data/tasks/<name>-test.jsonl``."""
        from eetools.io.paths import data_dir

        path = data_dir() / "tasks" / f"{self.name}-test.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"test split {path} is missing; run `python -m eetools.tasks.freeze`")
        return load_jsonl(path)


def cut_at_answer(completion: str) -> str:
    """The completion up to and including its first ``A: ...`` line: the cut of the shipped tasks'
    protocol. For any task, `Task.cut(example, completion)` cuts under the task's own protocol."""
    return AnswerLine().cut(completion)


def save_jsonl(examples: Iterable[Example], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(e.to_json() + "\n" for e in examples))


def load_jsonl(path: str | Path) -> list[Example]:
    return [Example.from_json(l) for l in Path(path).read_text().splitlines() if l.strip()]


class MixtureTask(Task):
    """Examples drawn in turn from each part; scoring and steps dispatch on `example.task`."""

    def __init__(self, parts: list[Task]):
        if len(parts) < 2:
            raise ValueError("a mixture needs at least two tasks")
        self.parts = {p.name: p for p in parts}
        self.name = "+".join(self.parts)
        self.max_new_tokens = max(p.max_new_tokens for p in parts)

    def sample(self, n: int, seed: int | str) -> list[Example]:
        per = [
            p.sample((n + len(self.parts) - 1 - i) // len(self.parts), seed) for i, p in enumerate(self.parts.values())
        ]
        out = [ex for group in zip(*[g + [None] * (max(map(len, per)) - len(g)) for g in per]) for ex in group if ex]
        return out[:n]

    def _make(self, rng: random.Random) -> Example:  # pragma: no cover - sample is overridden
        return rng.choice(list(self.parts.values()))._make(rng)

    @property
    def identity(self) -> str:
        return "+".join(p.identity for p in self.parts.values())

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

    def cut(self, example: Example, completion: str) -> str:
        return self._part(example).cut(example, completion)

    def test_split(self) -> list[Example]:
        splits = [p.test_split() for p in self.parts.values()]
        return [ex for group in zip(*splits) for ex in group]

"""Reasoning tasks: seeded generators, a written chain-of-thought format, and verifiers.

>>> import eetools
>>> task = eetools.tasks.get("addition")
>>> ex = task.sample(1, seed=0)[0]
>>> task.score(ex, ex.reasoning)
1.0
"""

from __future__ import annotations

import re

from eetools.tasks.addition import AdditionTask
from eetools.tasks.base import Example, MixtureTask, Task, cut_at_answer, load_jsonl, save_jsonl
from eetools.tasks.gym import PREFIX as GYM_PREFIX
from eetools.tasks.gym import ReasoningGymTask, from_reasoning_gym
from eetools.tasks.protocols import PROTOCOLS, AnswerProtocol, get_protocol
from eetools.tasks.steps import StepsTask
from eetools.tasks.tom import TomTask

_REGISTRY = {"addition": AdditionTask, "tom": TomTask}
NAMES = tuple(_REGISTRY)
# also resolvable by name, not in NAMES: training variants (same format and verifier, another question mix)
_VARIANTS = {
    "tom-false-belief": lambda: TomTask(false_belief=0.5),
    # the externalisation task (column lines optional; docs/method.md section 12): kept out of NAMES,
    # which `reproduce` evaluates and `freeze` writes test splits for (its split is drawn, not shipped)
    "steps": StepsTask,
    # one style of the steps task throughout (for measuring accuracy per style)
    "steps-full": lambda: StepsTask(style="full"),
    "steps-terse": lambda: StepsTask(style="terse"),
    # the small regime (1-2 digit operands), terse half the time or more: silent sums a tiny model can learn,
    # so that the terse style is about as accurate as the written one (docs/experiments.md 2026-12-04 (13))
    "steps-small": lambda: StepsTask(1, 2, p_terse_easy=0.7, p_terse_hard=0.5),
    # the same sums with a clear preference (terse for 80 % of carry-free sums, 20 % of the others): the last
    # stage of tiny-reasoner-mixed, so that its greedy choice differs per sum
    "steps-small-choice": lambda: StepsTask(1, 2, p_terse_easy=0.8, p_terse_hard=0.2),
    "steps-small-full": lambda: StepsTask(1, 2, style="full"),
    "steps-small-terse": lambda: StepsTask(1, 2, style="terse"),
}


def get(name: str | Task, tokenizer=None) -> Task:
    """The task registered under `name` ("addition", "tom", "steps", a reasoning-gym dataset "gym:leg_counting",
    or a mixture "addition+tom"); a Task passes through.

    `tokenizer` (a tokenizer, bridge or `EarlyExitModel`) is the one whose chat template the prompts of
    ``gym:`` tasks go through (their defaults otherwise: `from_reasoning_gym`); the shipped tasks ignore it.
    """
    if isinstance(name, Task):
        return name
    if isinstance(name, str) and "+" in name:
        return MixtureTask([get(part, tokenizer) for part in name.split("+")])
    if isinstance(name, str) and name.startswith(GYM_PREFIX):
        rest = name[len(GYM_PREFIX) :]
        dataset = re.split(r"[:?=,&]", rest)[0]
        if dataset != rest:
            raise ValueError(
                f"task {name!r}: dataset options cannot be given in a task name; use gym:{dataset}, a preset "
                f"(gym:basic_arithmetic/add1 ...) or from_reasoning_gym({dataset!r}, option=value) in Python"
            )
        return from_reasoning_gym(rest, tokenizer=tokenizer)
    if name in _VARIANTS:
        return _VARIANTS[name]()
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown task {name!r}; available: {', '.join(NAMES)}, gym:<reasoning-gym dataset> "
            f"(also: {', '.join(_VARIANTS)})"
        )
    return _REGISTRY[name]()


__all__ = [
    "AdditionTask",
    "AnswerProtocol",
    "Example",
    "MixtureTask",
    "NAMES",
    "PROTOCOLS",
    "ReasoningGymTask",
    "StepsTask",
    "Task",
    "TomTask",
    "cut_at_answer",
    "from_reasoning_gym",
    "get",
    "get_protocol",
    "load_jsonl",
    "save_jsonl",
]

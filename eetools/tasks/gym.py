"""reasoning-gym datasets as eetools Tasks: procedural prompts, the dataset's own verifier, any answer protocol.

reasoning-gym (``pip install 'eetools[gym]'``) generates its ~100 datasets procedurally from a seed
(leg counting and Alice-in-Wonderland among them, the tasks the paper's authors used), so nothing
is downloaded. `from_reasoning_gym` wraps one as a `Task` that calibration, RL and evaluation take
like the shipped ones:

>>> task = from_reasoning_gym("leg_counting", seed=0, size=100, protocol="tags")  # doctest: +SKIP
>>> ex = task.sample(1, seed=0)[0]  # doctest: +SKIP
>>> task.score(ex, "4 legs each, so <answer>" + ex.answer + "</answer>")  # doctest: +SKIP
1.0

Splits come from distinct seed streams of one base `seed`: ``sample(n, seed)`` (training draws
with integer seeds), ``validation_split`` (a named stream, leaving out the test split's prompts) and
``test_split`` (`size` examples of another named stream). The reference `Example.reasoning` is the
answer alone under the protocol (reasoning-gym writes no chain of thought), so calibrate such a task
on teacher generations (``continuations="greedy"``) rather than on it.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import hashlib
import math
import random
import types
import typing
from typing import Any

from eetools.tasks.base import Example, Task
from eetools.tasks.protocols import AnswerProtocol, FinalAnswer, get_protocol

PREFIX = "gym:"
"""Task names of the form ``gym:<dataset>`` (``eetools rl --task gym:leg_counting``) resolve here."""
_INSTALL = "reasoning-gym is not installed; install it with: pip install 'eetools[gym]'"


def _reasoning_gym():
    """The `reasoning_gym` module, imported on first use (it takes seconds and is an optional extra)."""
    try:
        import reasoning_gym
    except ImportError as err:
        raise ImportError(_INSTALL) from err
    return reasoning_gym


def dataset_names() -> list[str]:
    """Names of every reasoning-gym dataset (``leg_counting``, ``aiw``, ``basic_arithmetic``...)."""
    _reasoning_gym()
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def _stream_seed(*parts: object) -> int:
    """A 32-bit seed for a named stream. reasoning-gym draws item ``i`` from ``Random(seed + i)``, so nearby
    integer seeds would share items; hashing spreads the streams of the splits and steps apart."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "big")


def _unwrap(tokenizer) -> tuple[Any, bool]:
    """The HF tokenizer and the prepend-BOS setting behind a tokenizer, a bridge or an `EarlyExitModel`."""
    model = getattr(tokenizer, "model", None)
    if model is not None and hasattr(model, "cfg") and hasattr(model, "tokenizer"):  # an EarlyExitModel
        tokenizer = model
    if hasattr(tokenizer, "cfg") and hasattr(tokenizer, "tokenizer"):  # a bridge
        return tokenizer.tokenizer, bool(tokenizer.cfg.default_prepend_bos)
    return tokenizer, True


class ReasoningGymTask(Task):
    """One reasoning-gym dataset as a `Task`; build it with `from_reasoning_gym`.

    Attributes:
        dataset: the reasoning-gym dataset name.
        config: the dataset's config fields given (the rest keep reasoning-gym's defaults).
        seed: base seed of every split.
        size: examples in the test split.
    """

    malformed_score = 0.0  # the protocol is the only format: an answer it cannot read scores 0

    def __init__(
        self,
        dataset: str,
        *,
        seed: int = 0,
        size: int = 500,
        protocol: str | AnswerProtocol = "tags",
        tokenizer=None,
        system: str | None = None,
        shots: int = 0,
        instruction: str | None = None,
        max_new_tokens: int = 512,
        **config: Any,
    ):
        rg = _reasoning_gym()
        from reasoning_gym.factory import DATASETS

        if not isinstance(dataset, str) or dataset not in DATASETS:
            raise ValueError(f"unknown reasoning-gym dataset {dataset!r}; available: {', '.join(dataset_names())}")
        for what, value, low in (
            ("seed", seed, 0),
            ("size", size, 1),
            ("shots", shots, 0),
            ("max_new_tokens", max_new_tokens, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{what} must be an integer >= {low}, got {value!r}")
        fields = {f.name for f in dataclasses.fields(DATASETS[dataset][1])} - {"seed", "size"}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise ValueError(
                f"unknown config {', '.join(unknown)} for reasoning-gym dataset {dataset!r}; "
                f"its config fields: {', '.join(sorted(fields))}"
            )
        hints = _field_types(DATASETS[dataset][1])
        for key, value in config.items():
            wanted = _type_mismatch(value, hints.get(key))
            if wanted:
                raise ValueError(
                    f"config {key}={value!r} for reasoning-gym dataset {dataset!r} must be {wanted}, "
                    f"got {type(value).__name__}; e.g. {key}={_example_of(wanted)}"
                )
        self.dataset, self.config, self.seed, self.size = dataset, dict(config), seed, size
        self.protocol = get_protocol(protocol)
        self.system = system
        self.shots = shots
        self.instruction = self.protocol.instruction if instruction is None else instruction
        self.max_new_tokens = max_new_tokens
        self.name = PREFIX + dataset
        self._tokenizer, self._prepend_bos = _unwrap(tokenizer)
        # checks the config (drawing one item: some bad values only fail there); its score_answer is the verifier
        self._verifier = self._create(rg, seed=0, size=1, draw=True)
        self._test: list[Example] | None = None
        self._shots = ""
        if shots:  # worked examples from a stream of their own, answered under the protocol
            ds = self._create(rg, seed=_stream_seed(PREFIX + dataset, seed, "shots"), size=shots)
            self._shots = "".join(
                f"Question: {ds[i]['question'].strip()}\nAnswer: {self.protocol.format(str(ds[i]['answer'])).strip()}\n\n"
                for i in range(shots)
            )

    def _create(self, rg, *, seed: int, size: int, draw: bool = False):
        try:
            ds = rg.create_dataset(self.dataset, seed=seed, size=size, **self.config)
            if draw:
                ds[0]
            return ds
        except (AssertionError, TypeError, ValueError, IndexError, KeyError) as err:
            msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"bad config {self.config} for reasoning-gym dataset {self.dataset!r}: {msg}") from None

    @property
    def identity(self) -> str:
        """What decides the examples and rewards (dataset, config, seed, protocol, shots, instruction, cap): a run
        that resumes with another identity trains on other data (`eetools.train.state.RunFiles` refuses it)."""
        return f"{self!r}, instruction={self.instruction!r}, max_new_tokens={self.max_new_tokens}"

    def __repr__(self) -> str:
        config = "".join(f", {k}={v!r}" for k, v in self.config.items())
        shots = f", shots={self.shots}" if self.shots else ""
        return (
            f"from_reasoning_gym({self.dataset!r}, seed={self.seed}, size={self.size}, "
            f"protocol={self.protocol.name!r}{shots}{config})"
        )

    def prompt(self, question: str) -> str:
        """The question and the protocol's instruction (after `shots` worked examples, when asked for), through
        the tokenizer's chat template when it has one."""
        from eetools.io.tokenizer import chat_prompt

        if self._shots:
            user = f"{self.instruction}\n\n{self._shots}Question: {question.strip()}"
        else:
            user = f"{question.strip()}\n\n{self.instruction}"
        return chat_prompt(self._tokenizer, user, system=self.system, prepend_bos=self._prepend_bos)

    def sample(self, n: int, seed: int | str) -> list[Example]:
        """`n` examples of the stream `seed` (under the task's base seed); a longer `n` extends the list."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an integer >= 0, got {n!r}")
        if n == 0:
            return []
        # streams are the dataset's (a preset's test split is the one its dataset and config give)
        ds = self._create(_reasoning_gym(), seed=_stream_seed(PREFIX + self.dataset, self.seed, seed), size=n)
        return [self._example(ds[i]) for i in range(n)]

    def _example(self, entry: dict) -> Example:
        answer = "" if entry.get("answer") is None else str(entry["answer"])
        return Example(
            task=self.name,
            prompt=self.prompt(entry["question"]),
            reasoning=self.protocol.format(answer),
            answer=answer,
            meta={"entry": entry},
        )

    def _make(self, rng: random.Random) -> Example:  # pragma: no cover - sample is overridden
        return self.sample(1, seed=rng.randrange(2**32))[0]

    def score(self, example: Example, completion: str) -> float:
        """The dataset's own ``score_answer`` on the answer the protocol reads (0 when there is none);
        some datasets give partial credit in (0, 1). Never raises."""
        try:
            answer = self.protocol.extract(completion)
            if answer is None:
                return 0.0
            entry = example.meta.get("entry") or {"question": "", "answer": example.answer, "metadata": {}}
            s = float(self._verifier.score_answer(answer, entry))
            return s if math.isfinite(s) else 0.0
        except Exception:  # a verifier must never take a training run down
            return 0.0

    def is_well_formed(self, completion: str) -> bool:
        """Whether the protocol finds an answer in `completion`."""
        return self.protocol.extract(completion) is not None

    def steps(self, example: Example, completion: str) -> list[bool]:
        """reasoning-gym checks answers, not reasoning steps: there are none to check."""
        return []

    def coherence(self, example: Example, completion: str) -> float:
        """NaN: reasoning-gym has no checker of written reasoning steps (not 0, which would read as "all wrong")."""
        return float("nan")

    def test_split(self) -> list[Example]:
        """`size` examples of the task's ``test`` stream, made on first use (nothing is read from disk)."""
        if self._test is None:
            self._test = self.sample(self.size, seed="test")
        return list(self._test)


def _field_types(config_class) -> dict[str, Any]:
    """The annotated types of a reasoning-gym config dataclass's fields ({} where they cannot be resolved)."""
    try:
        return typing.get_type_hints(config_class)
    except Exception:  # a dataset whose annotations do not resolve is not type-checked here
        return {}


def _type_mismatch(value: Any, hint: Any) -> str | None:
    """What `hint` wants when `value` is not of it (e.g. "an integer"), else None; types it cannot check pass.

    Checked before the dataset is built, so a wrong-typed value is named with its field, not as the comparison
    that fails deep inside reasoning-gym ("'>' not supported between instances of 'str' and 'int'")."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    if origin is typing.Literal:
        return None if value in args else "one of " + ", ".join(repr(a) for a in args)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        wants = [_type_mismatch(value, a) for a in args if a is not type(None)]
        return None if any(w is None for w in wants) else " or ".join(w for w in wants if w)
    if hint is tuple or origin in (list, tuple, collections.abc.Sequence):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            return "a list"
        item = args[0] if args and (origin is not tuple or len(args) == 1 or args[1:] == (...,)) else None
        wants = [_type_mismatch(v, item) for v in value] if item is not None else []
        bad = next((w for w in wants if w), None)
        return f"a list of {bad.removeprefix('a ').removeprefix('an ')}s" if bad else None
    return None


def _example_of(wanted: str) -> str:
    """A value of the kind `wanted` names, for the error's "e.g."."""
    for start, example in (("an integer", "3"), ("a number", "0.5"), ("true", "True"), ("a string", "'text'")):
        if wanted.startswith(start):
            return example
    if wanted.startswith("one of "):
        return wanted.removeprefix("one of ").split(", ")[0]
    return "[...]"


def _asked(dataset: str, **config: Any) -> dict[str, Any]:
    """A preset that asks for "The answer is N" with no worked examples and reads the last number."""
    return dict(
        dataset=dataset,
        protocol="last-number",
        instruction=FinalAnswer.instruction,
        shots=0,
        max_new_tokens=32,
        config=config,
    )


_ONE_DIGIT = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)
_PLAIN = dict(allow_parentheses=False, allow_negation=False)
PRESETS: dict[str, dict[str, Any]] = {
    # measured on SmolLM2-135M-Instruct, greedy, n = 200 (docs/experiments.md 2026-12-07, scripts/gym_survey.py)
    "basic_arithmetic/add1": _asked("basic_arithmetic", **_ONE_DIGIT, operators=("+",), **_PLAIN),
    "chain_sum/2x1": _asked("chain_sum", **_ONE_DIGIT, allow_negation=False),
    "basic_arithmetic/addsub1": _asked("basic_arithmetic", **_ONE_DIGIT, operators=("+", "-"), **_PLAIN),
    # the survey's "gcd/2x<=20": the greatest common divisor of two numbers from 1 to 20
    "gcd/2x20": _asked("gcd", min_numbers=2, max_numbers=2, min_value=1, max_value=20),
}
"""Named tasks a small chat model can do (``gym:<dataset>/<label>``, e.g. ``--task gym:chain_sum/2x1``): a dataset,
its config, the answer protocol, worked examples and a generation cap, with its test split the survey's."""


def from_reasoning_gym(
    name: str,
    *,
    seed: int = 0,
    size: int = 500,
    protocol: str | AnswerProtocol | None = None,
    tokenizer=None,
    system: str | None = None,
    shots: int | None = None,
    instruction: str | None = None,
    max_new_tokens: int | None = None,
    **config: Any,
) -> ReasoningGymTask:
    """A reasoning-gym dataset, or one of the `PRESETS`, as an eetools `Task`.

    Args:
        name: the dataset (``"leg_counting"``, ``"aiw"``, ``"basic_arithmetic"``...; `dataset_names()` lists them),
            or a preset (``"chain_sum/2x1"``): its protocol, shots, cap and config are the defaults, and
            arguments given here override them (config fields update the preset's).
        seed: base seed of the train, validation and test streams.
        size: examples in the test split.
        protocol: how completions state the answer: ``"tags"`` (``<answer>42</answer>``, reasoning-gym's
            convention, the default), ``"boxed"``, ``"last-line"``, ``"answer-line"`` (``A: 42``, the shipped
            tasks'), ``"last-number"``, ``"final-answer"`` (``The answer is 42.``), or an `AnswerProtocol`.
            Prompts end with its instruction; the verifier reads through it.
        tokenizer: a tokenizer, bridge or `EarlyExitModel` whose chat template the prompts go through;
            None (or no template) gives the plain question and instruction.
        system: a system message for the chat template.
        shots: worked examples (question and answer under the protocol, from a stream of their own) the
            prompt shows before the question: a small chat model copies their short answer format (default 0).
        instruction: the sentence the prompt asks for the answer with (default: the protocol's); e.g. ask
            for "The answer is <answer>." and read the last number, which also takes "3 + 5 = 8".
        max_new_tokens: generation length for the task when not told otherwise (default 512).
        **config: the dataset's config fields (e.g. ``min_animals=2`` for leg_counting).

    Raises:
        ValueError: an unknown dataset, config field or protocol, or a config the dataset rejects.
        ImportError: reasoning-gym is not installed (``pip install 'eetools[gym]'``).
    """
    preset = PRESETS.get(name, {}) if isinstance(name, str) else {}
    if isinstance(name, str) and "/" in name and not preset:
        raise ValueError(f"unknown reasoning-gym preset {name!r}; presets: {', '.join(PRESETS)}")
    task = ReasoningGymTask(
        preset.get("dataset", name),
        seed=seed,
        size=size,
        protocol=protocol if protocol is not None else preset.get("protocol", "tags"),
        tokenizer=tokenizer,
        system=system,
        shots=shots if shots is not None else preset.get("shots", 0),
        instruction=instruction if instruction is not None else preset.get("instruction"),
        max_new_tokens=max_new_tokens if max_new_tokens is not None else preset.get("max_new_tokens", 512),
        **{**preset.get("config", {}), **config},
    )
    if preset:
        task.name = PREFIX + name
    return task

"""Answer protocols: where a completion states its answer, and where the verifier stops reading.

A task's protocol owns three things that used to be hard-wired to the shipped tasks' ``"A: "`` line:
the reference ending written for an answer (`format`), the answer read back out of a completion
(`extract`), and the completion cut after its first answer (`cut`), so that whatever a model
writes after answering (another question, a second answer) is neither scored nor rewarded.

>>> from eetools.tasks.protocols import get_protocol
>>> tags = get_protocol("tags")
>>> tags.extract("I count 4+4 legs.\\n<answer>8</answer>")
'8'
>>> tags.cut("<answer>8</answer> and more text")
'<answer>8</answer>'
"""

from __future__ import annotations

import re


class AnswerProtocol:
    """Base class: how a completion states its answer. Subclasses set `name` and `instruction` and
    implement `format`, `extract` and `cut`; none of them raises on any string.

    Attributes:
        name: the name `get_protocol` knows it by.
        instruction: the sentence a prompt adds so the model knows the protocol.
    """

    name: str = ""
    instruction: str = ""

    def format(self, answer: str) -> str:  # pragma: no cover - abstract
        """The reference ending that states `answer` under this protocol (what `extract` reads back)."""
        raise NotImplementedError

    def extract(self, text: str) -> str | None:  # pragma: no cover - abstract
        """The answer `text` states (its last one), stripped; None when it states none."""
        raise NotImplementedError

    def cut(self, text: str) -> str:  # pragma: no cover - abstract
        """`text` up to and including its first answer (all of it when it has none)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class AnswerLine(AnswerProtocol):
    """A line starting ``"A: "`` (the shipped addition and ToM tasks); the cut keeps that line's newline."""

    name = "answer-line"
    instruction = "End with a line 'A: <answer>'."
    prefix = "A: "

    def format(self, answer: str) -> str:
        return f"{self.prefix}{answer}\n"

    def extract(self, text: str) -> str | None:
        if not isinstance(text, str):
            return None
        found = None
        for line in text.split("\n"):
            if line.startswith(self.prefix):
                found = line[len(self.prefix) :].strip()
        return found

    def cut(self, text: str) -> str:
        idx = text.find("\n" + self.prefix)
        start = 0 if text.startswith(self.prefix) else (idx + 1 if idx >= 0 else -1)
        if start < 0:
            return text
        end = text.find("\n", start)
        return text if end < 0 else text[: end + 1]


class AnswerTags(AnswerProtocol):
    """``<answer>...</answer>`` (reasoning-gym's own convention); the answer may span lines."""

    name = "tags"
    instruction = "Give your final answer inside <answer></answer> tags, e.g. <answer>42</answer>."
    _PATTERN = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

    def format(self, answer: str) -> str:
        return f"<answer>{answer}</answer>"

    def extract(self, text: str) -> str | None:
        if not isinstance(text, str):
            return None
        found = self._PATTERN.findall(text)
        return found[-1].strip() if found else None

    def cut(self, text: str) -> str:
        m = self._PATTERN.search(text)
        return text if m is None else text[: m.end()]


class Boxed(AnswerProtocol):
    r"""``\boxed{...}`` (maths convention); braces inside the box nest (``\boxed{\frac{1}{2}}``)."""

    name = "boxed"
    instruction = "Put your final answer in \\boxed{}, e.g. \\boxed{42}."
    _OPEN = "\\boxed{"

    def format(self, answer: str) -> str:
        return f"{self._OPEN}{answer}}}"

    def _spans(self, text: str) -> list[tuple[int, int]]:
        """``(content start, closing brace)`` of every complete box, in order."""
        spans, at = [], 0
        while (start := text.find(self._OPEN, at)) >= 0:
            i, depth = start + len(self._OPEN), 1
            while i < len(text) and depth:
                depth += {"{": 1, "}": -1}.get(text[i], 0)
                i += 1
            if depth:  # unclosed: no later box can close either
                break
            spans.append((start + len(self._OPEN), i - 1))
            at = i
        return spans

    def extract(self, text: str) -> str | None:
        if not isinstance(text, str):
            return None
        spans = self._spans(text)
        return text[spans[-1][0] : spans[-1][1]].strip() if spans else None

    def cut(self, text: str) -> str:
        spans = self._spans(text)
        return text[: spans[0][1] + 1] if spans else text


class LastLine(AnswerProtocol):
    """The last non-empty line is the answer. Nothing marks where it ends, so `cut` keeps the whole text:
    the completion must end at the model's end-of-sequence token."""

    name = "last-line"
    instruction = "Write your final answer alone on the last line."

    def format(self, answer: str) -> str:
        return f"{answer}\n"

    def extract(self, text: str) -> str | None:
        if not isinstance(text, str):
            return None
        lines = [l.strip() for l in text.split("\n") if l.strip()]
        return lines[-1] if lines else None

    def cut(self, text: str) -> str:
        return text


class LastNumber(AnswerProtocol):
    """The last number the text writes (``-3``, ``1,024``, ``2.5``), as reasoning-gym's numeric scorers read a
    free answer: a small chat model that answers in prose ("4 + 4 = 8 legs.") is read without tags.
    Thousands separators are dropped and a trailing decimal point is not part of the number. Nothing marks
    where the answer ends, so `cut` keeps the whole text: the completion must end at the model's EOS."""

    name = "last-number"
    instruction = "End with the final answer as a number."
    _PATTERN = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,])|(?<![\w.])-?\d+(?:\.\d+)?")

    def format(self, answer: str) -> str:
        return f"{answer}\n"

    def extract(self, text: str) -> str | None:
        if not isinstance(text, str):
            return None
        found = self._PATTERN.findall(text)
        return found[-1].replace(",", "") if found else None

    def cut(self, text: str) -> str:
        return text


class FinalAnswer(AnswerProtocol):
    """A final-answer phrase: ``The answer is X``, ``Final answer: X`` or ``Answer: X`` (any case; the last one
    counts). The answer runs to the end of its line without a closing full stop; an equation written there
    (``The answer is 3 + 2 = 5.``) gives its last side. `cut` ends after the first phrase's line."""

    name = "final-answer"
    instruction = "End with 'The answer is <answer>.'"
    _PATTERN = re.compile(r"(?:\b(?:final\s+)?answer\s+is|\b(?:final\s+)?answer\s*:)[ \t]*(.*)", re.IGNORECASE)

    def format(self, answer: str) -> str:
        return f"The answer is {answer}.\n"

    def _answer(self, m: re.Match) -> str | None:
        value = m.group(1).split("=")[-1].strip().rstrip(".").strip().strip("*").strip()
        return value or None

    def extract(self, text: str) -> str | None:
        if not isinstance(text, str):
            return None
        found = [a for m in self._PATTERN.finditer(text) if (a := self._answer(m)) is not None]
        return found[-1] if found else None

    def cut(self, text: str) -> str:
        for m in self._PATTERN.finditer(text):
            if self._answer(m) is not None:
                end = text.find("\n", m.end(1))
                return text if end < 0 else text[: end + 1]
        return text


PROTOCOLS: dict[str, type[AnswerProtocol]] = {
    p.name: p for p in (AnswerLine, AnswerTags, Boxed, LastLine, LastNumber, FinalAnswer)
}
"""Every protocol by name: ``answer-line`` (``A: 42``), ``tags``, ``boxed``, ``last-line``, ``last-number``,
``final-answer`` (``The answer is 42.``)."""


def get_protocol(protocol: str | AnswerProtocol) -> AnswerProtocol:
    """The protocol registered under `protocol` (see `PROTOCOLS`); an `AnswerProtocol` passes through."""
    if isinstance(protocol, AnswerProtocol):
        return protocol
    if protocol not in PROTOCOLS:
        raise ValueError(
            f"unknown answer protocol {protocol!r}; available: {', '.join(PROTOCOLS)} (or an AnswerProtocol instance)"
        )
    return PROTOCOLS[protocol]()

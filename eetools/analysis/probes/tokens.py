"""Token classes and task variables of a continuation, from its text.

`annotate_tokens` reads a continuation line by line in the task's written format and
labels every token with a class (`TOKEN_CLASSES`, plus "prompt", "eos" and "other"; see
`eetools.analysis.probes`) and the task variables it carries. The private helpers turn token ids
into the strings that concatenate to the decoded text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pandas as pd

from eetools.tasks.tom import EVENT_LINE as _TOM_EVENT

TOKEN_CLASSES = {
    "addition": ("format", "copied_digit", "computed_digit", "answer"),
    "tom": ("format", "copied_name", "mark", "container", "answer"),
}
# When a token spans characters of several classes, the most informative one wins.
_PRIORITY = ("answer", "computed_digit", "copied_digit", "copied_name", "mark", "container", "other", "format")
_RANK = {c: i for i, c in enumerate(_PRIORITY)}

_ADD_LINE = re.compile(r"^(\d)\+(\d)\+(\d)=(\d+)$")
_ADD_PROMPT = re.compile(r"Q: \d+\+\d+")
_NAME = r"[A-Z][a-z]+"
_TOM_WORD = re.compile(r"[A-Z][a-z]+|[a-z]+|.")
_TOM_NOW = re.compile(r"^now ([a-z]+)$")
_TOM_SAW = re.compile(rf"^((?:{_NAME} )+)saw ([a-z]+)$")
_ANSWER = "A: "


def _event_classes(line: str) -> list[str]:
    """Classes of a ToM event line ``"bag: Ann+ Bob- (Bob- box)"`` / ``"Bob out: ..."``."""
    cls: list[str] = []
    for m in _TOM_WORD.finditer(line):
        w = m.group()
        if w[0].isupper():
            c = "copied_name"
        elif w in ("+", "-"):
            c = "mark"
        elif w.isalpha() and w not in ("in", "out"):
            c = "container"
        else:
            c = "format"
        cls += [c] * len(w)
    return cls


def guess_task(prompt: str) -> str | None:
    """ "addition", "tom" or None, from a prompt's text."""
    if _ADD_PROMPT.search(prompt):
        return "addition"
    if "Where " in prompt and "Q:" in prompt:
        return "tom"
    return None


def _char_labels(text: str, task: str | None) -> tuple[list[str], list[int | None], list[int]]:
    """Per character: class, column (addition: units = 0) and line index of a continuation."""
    classes: list[str] = []
    columns: list[int | None] = []
    lines: list[int] = []
    n_col = 0
    for li, line in enumerate(text.split("\n")):
        cls = ["other" if ch.isalnum() else "format" for ch in line]
        col: list[int | None] = [None] * len(line)
        if line.startswith(_ANSWER):
            body = line[len(_ANSWER) :]
            cls[: len(_ANSWER)] = ["format"] * len(_ANSWER)
            digits = [i for i, ch in enumerate(body) if ch.isdigit()]
            for i, ch in enumerate(body):
                j = len(_ANSWER) + i
                if task == "addition":
                    if ch.isdigit():
                        cls[j] = "answer"
                        col[j] = len(digits) - 1 - digits.index(i)
                    else:
                        cls[j] = "format" if not ch.isalnum() else "other"
                else:
                    cls[j] = "answer" if not ch.isspace() else "format"
        elif task == "addition" and (m := _ADD_LINE.match(line)):
            cls = ["copied_digit", "format", "copied_digit", "format", "copied_digit", "format"]
            cls += ["computed_digit"] * len(m.group(4))
            col = [n_col] * (len(line) + 1)  # the whole line and its newline
            n_col += 1
        elif task == "tom":
            if _TOM_EVENT.match(line):
                cls = _event_classes(line)
            elif m := _TOM_NOW.match(line):
                cls = ["format"] * 4 + ["container"] * len(m.group(1))
            elif m := _TOM_SAW.match(line):
                cls = ["format" if ch == " " else "copied_name" for ch in m.group(1)]
                cls += ["format"] * 4 + ["container"] * len(m.group(2))
        classes += cls
        columns += col[: len(line)]
        lines += [li] * len(line)
        # the newline after the line (absent after the last piece of text)
        classes.append("format")
        columns.append(col[len(line)] if len(col) > len(line) else None)
        lines.append(li)
    n = len(text)
    return classes[:n], columns[:n], lines[:n]


def _example_meta(example) -> tuple[str | None, dict, str | None]:
    if example is None:
        return None, {}, None
    return getattr(example, "task", None), dict(getattr(example, "meta", {}) or {}), getattr(example, "answer", None)


def annotate_tokens(pieces: Sequence[str], task: str | None = None, example=None) -> pd.DataFrame:
    """Token classes and task variables of a continuation given as its token strings.

    The continuation is read line by line in the task's written format (addition column
    lines ``x+y+c=s``, ToM placement and deciding lines, the answer line ``A: ...``); a token
    takes the most informative class among its characters (answer > computed digit >
    copied digit > name > container > other > format). Malformed lines give "other" to
    their letters and digits.

    Args:
        pieces: the continuation's tokens as strings, in order (they concatenate to the text).
        task: "addition", "tom", or None (taken from `example`, else every token is
            "format"/"other").
        example: the `Example` the text answers; its truth gives the task variables.

    Returns:
        One row per token: ``token``, ``token_class``, ``line``, ``column`` (addition:
        column of a column line or answer digit, units = 0), and task variables --
        addition: ``carry`` (carry out of the column), ``sum_digit`` (column sum % 10),
        ``answer_digit`` (the true answer's digit in that column); ToM:
        ``believed_location`` (the answer). Missing values are NA.
    """
    ex_task, meta, answer = _example_meta(example)
    task = task or ex_task
    text = "".join(pieces)
    cls, cols, lines = _char_labels(text, task)
    rows = []
    start = 0
    steps = None
    if task == "addition" and "a" in meta and "b" in meta:
        from eetools.tasks.addition import column_steps

        steps = column_steps(int(meta["a"]), int(meta["b"]))
        answer = str(int(meta["a"]) + int(meta["b"]))
    for piece in pieces:
        span = range(start, start + len(piece))
        start += len(piece)
        c = min((cls[i] for i in span), key=_RANK.__getitem__, default="format")
        col = next((cols[i] for i in span if cols[i] is not None), None)
        row = {
            "token": piece,
            "token_class": c,
            "line": lines[span[0]] if len(span) else (lines[-1] if lines else 0),
            "column": col,
        }
        if task == "addition":
            carry = sum_digit = answer_digit = None
            if col is not None and steps is not None and col < len(steps):
                carry, sum_digit = steps[col][3] // 10, steps[col][3] % 10
            if col is not None and answer is not None and col < len(answer):
                answer_digit = int(answer[::-1][col])
            row.update(carry=carry, sum_digit=sum_digit, answer_digit=answer_digit)
        elif task == "tom":
            row["believed_location"] = answer
        rows.append(row)
    df = pd.DataFrame(rows, columns=["token", "token_class", "line", "column"] if not rows else None)
    for name in ("column", "carry", "sum_digit", "answer_digit"):
        if name in df:
            df[name] = df[name].astype("Int64")
    return df


def _pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """Token strings that concatenate to the decoded text (prefix differences)."""
    out, prev = [], ""
    for k in range(len(ids)):
        cur = tokenizer.decode(list(ids[: k + 1]))
        if cur.startswith(prev):
            out.append(cur[len(prev) :])
        else:  # a multi-byte character split across tokens: fall back to the lone token
            out.append(tokenizer.decode([ids[k]]))
        prev = cur
    return out


def _text_pieces(tokenizer, ids: Sequence[int], is_eos: Sequence[bool]) -> list[str]:
    """Token strings of `ids`, EOS tokens as empty strings (they are not part of the text)."""
    text = iter(_pieces(tokenizer, [t for t, e in zip(ids, is_eos) if not e]))
    return ["" if e else next(text) for e in is_eos]


def _task_of(prompt: str, example) -> str | None:
    t = getattr(example, "task", None)
    return t if t in TOKEN_CLASSES else guess_task(prompt)

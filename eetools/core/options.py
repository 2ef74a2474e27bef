"""Checks of option values: what each setting of a run may be, said once and checked up front.

Every configuration dataclass (`CalibrationConfig`, `RLConfig`, `PretrainConfig`,
`ReproduceConfig`) declares a ``LIMITS`` table beside its fields; `validate_config` checks each
field against its annotation and its limit, before a run does anything. The command line checks
its own options (and a config file's values) with the same `check_value`.

Types come from the annotation: ``bool`` must be a bool (not 0 or "false"), ``int`` an int (not a
bool, not 2.0), ``float`` a finite number, ``str`` a string, ``list[X]`` a list of X,
``dict[str, X]`` a table of X, ``X | None`` also None. A limit is comparisons joined by "and"
(``">= 1"``, ``"> 0 and <= 1"``), optionally followed by ``": why"`` for the message, or a tuple of
the allowed values; on a list or a table it applies to every element.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import typing

_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_NOUNS = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}


def _is(value, hint) -> bool:
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return not isinstance(hint, type) or isinstance(value, hint)


def _meets(value, limit) -> bool:
    if isinstance(limit, tuple):
        return value in limit
    for part in limit.partition(": ")[0].split(" and "):
        op, bound = part.split()
        if not _OPS[op](value, float(bound)):
            return False
    return True


def _wanted(hint, limit) -> str:
    """What a value must be, in words: "an integer >= 1", "one of 'a', 'b'"."""
    if isinstance(limit, tuple):
        return "one of " + ", ".join(map(repr, limit))
    noun = _NOUNS.get(hint, getattr(hint, "__name__", str(hint)))
    if not limit:
        return noun
    bound, _, why = limit.partition(": ")
    return f"{noun} {bound}" + (f" ({why})" if why else "")


def check_value(name: str, value, hint, limit: str | tuple | None = None) -> None:
    """Raise TypeError (wrong type) or ValueError (NaN, infinite or out of `limit`) naming `name`."""
    args = typing.get_args(hint)
    if type(None) in args:  # X | None
        if value is None:
            return
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)
    if origin is list:
        (elem,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list of {_wanted(elem, limit)}s, got {value!r}")
        for i, v in enumerate(value):
            check_value(f"{name}[{i}]", v, elem, limit)
        return
    if origin is dict:
        key, elem = typing.get_args(hint)
        if not isinstance(value, dict):
            raise TypeError(f"{name} must be a table of {_wanted(elem, limit)}s, got {value!r}")
        for k, v in value.items():
            check_value(f"{name} key", k, key)
            check_value(f"{name}[{k!r}]", v, elem, limit)
        return
    if not _is(value, hint):
        raise TypeError(f"{name} must be {_wanted(hint, limit)}, got {value!r} ({type(value).__name__})")
    if hint is int and not -(2**63) <= value < 2**63:  # torch and numpy take 64-bit integers
        raise ValueError(f"{name} must be {_wanted(hint, limit)} below 2**63, got {value}")
    if hint is float and not math.isfinite(value):
        raise ValueError(f"{name} must be {_wanted(hint, limit)}, got {value}")
    if limit is not None and not _meets(value, limit):
        raise ValueError(f"{name} must be {_wanted(hint, limit)}, got {value!r}")


def validate_config(cfg) -> None:
    """Check every field of the dataclass `cfg` against its annotation and its class's ``LIMITS``.

    Raises TypeError or ValueError naming the first bad field and what it must be.
    """
    cls = type(cfg)
    hints = typing.get_type_hints(cls)
    limits = getattr(cls, "LIMITS", {})
    for f in dataclasses.fields(cfg):
        check_value(f.name, getattr(cfg, f.name), hints[f.name], limits.get(f.name))

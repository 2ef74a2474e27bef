"""Helpers shared by the probes: reading examples as (prompt, continuation) pairs."""

from __future__ import annotations


def _as_pairs(examples) -> list[tuple[str, str, object]]:
    """(prompt, continuation, example-or-None) from Examples or (prompt, continuation) pairs."""
    out = []
    for e in examples:
        if hasattr(e, "prompt") and hasattr(e, "reasoning"):
            out.append((e.prompt, e.reasoning, e))
        else:
            p, c = e
            out.append((p, c, None))
    if not out:
        raise ValueError("no examples given")
    return out

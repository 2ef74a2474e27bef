"""Column addition, the arithmetic shared by the addition and steps tasks."""

from __future__ import annotations


def column_steps(a: int, b: int) -> list[tuple[int, int, int, int]]:
    """(digit of a, digit of b, carry in, column sum) per column, units first."""
    n = max(len(str(a)), len(str(b)))
    da, db = str(a).zfill(n)[::-1], str(b).zfill(n)[::-1]
    carry, out = 0, []
    for x, y in zip(da, db):
        s = int(x) + int(y) + carry
        out.append((int(x), int(y), carry, s))
        carry = s // 10
    return out

"""Plain values: what can be copied and put back as is (a log of losses, a config dict)."""

from __future__ import annotations

from typing import Any

PLAIN = (int, float, complex, str, bytes, bool, type(None))


def plain_container(v: Any, depth: int = 0) -> bool:
    """Lists/dicts/sets of plain values, small enough to copy."""
    if isinstance(v, (list, set)):
        return len(v) <= 100_000 and all(_plain_value(x, depth) for x in v)
    if isinstance(v, dict):
        return len(v) <= 100_000 and all(_plain_value(k, depth) and _plain_value(x, depth) for k, x in v.items())
    return False


def _plain_value(v: Any, depth: int) -> bool:
    if isinstance(v, PLAIN):
        return True
    if isinstance(v, tuple):
        return all(_plain_value(x, depth) for x in v)
    return depth < 2 and plain_container(v, depth + 1)

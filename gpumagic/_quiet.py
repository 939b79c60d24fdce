"""Silencing warnings for a block without ever leaving the silence behind.

``warnings.catch_warnings`` swaps the whole filter list and puts the old one back in ``__exit__``:
a Ctrl-C that lands in the first lines of ``__exit__`` leaves the swapped list, with its global
``ignore``, in place for the rest of the session, and it also reverts the filters the user's own
code set inside the block. Here each filter gpumagic adds is one entry object that it knows by
identity: it is taken out again on exit, only it (the user's filters stay as the code left them),
and :func:`forget_left_behind` takes out any that an interrupted exit left (the IPython layer
calls it after every cell).

>>> import warnings
>>> with ignored_warnings():
...     warnings.warn("not shown")
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["forget_left_behind", "ignored_warnings"]

_INSTALLED: list[tuple[Any, ...]] = []
"""Every filter entry gpumagic put into ``warnings.filters`` and has not taken out yet."""


def _changed() -> None:
    mutated = getattr(warnings, "_filters_mutated", None)  # warnings caches what filters decided
    if mutated is not None:
        mutated()


def _remove(entry: tuple[Any, ...]) -> None:
    filters: list[Any] = warnings.filters  # type: ignore[assignment]  # typeshed: a Sequence; it is a list
    for i in range(len(filters) - 1, -1, -1):
        if filters[i] is entry:
            del filters[i]
    _changed()


def _forget(entry: tuple[Any, ...]) -> None:
    for i in range(len(_INSTALLED) - 1, -1, -1):
        if _INSTALLED[i] is entry:
            del _INSTALLED[i]


@contextmanager
def ignored_warnings(message: str | None = None, category: type[Warning] = Warning) -> Iterator[None]:
    """Ignore warnings of ``category`` (whose message starts with the regex ``message``, any
    case, when given) inside the block. Filters the block itself adds or removes stay as they are."""
    entry = ("ignore", None if message is None else re.compile(message, re.IGNORECASE), category, None, 0)
    _INSTALLED.append(entry)  # known before it is in the list: an interrupt after this line is repaired later
    try:
        warnings.filters.insert(0, entry)  # type: ignore[attr-defined]
        _changed()
        yield
    finally:
        _remove(entry)
        _forget(entry)


def forget_left_behind() -> int:
    """Take out of ``warnings.filters`` every entry gpumagic added and did not take out (an
    interrupt landed in a block's exit); returns how many were still there. Call it only when no
    block runs: the IPython layer does after every cell."""
    left = list(_INSTALLED)
    found = sum(any(f is e for f in warnings.filters) for e in left)
    for entry in left:
        _remove(entry)
        _forget(entry)
    return found

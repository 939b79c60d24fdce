"""The batch search's options: one object, checked once where the options come in.

:class:`SearchOptions` is built at the edge (:func:`gpumagic.find_batch`'s keywords, the
``%find_batch`` flags) and is what the trial pipeline of :mod:`gpumagic.batch` reads: the budget
is parsed to bytes here and nowhere else, and every bound is checked here, by the same
:func:`check_bounds` the pure search (:func:`gpumagic.search.search`) uses.

An error in the options is a :class:`BadOptions` that names the field in backticks
(``"`min_size` (8) is larger than `max_size` (4)"``). ``str()`` of it reads in the Python
names (``min_size (8) is larger than max_size (4)``); an edge that spells the fields its own
way shows :meth:`BadOptions.spelled` (the magics: ``--min (8) is larger than --max (4)``).

>>> SearchOptions(budget=parse_budget("1GiB")).budget
1073741824
>>> str(SearchOptions.checked(min_size=8, max_size=4))
'min_size (8) is larger than max_size (4)'
>>> SearchOptions.checked(min_size=8, max_size=4).spelled({"min_size": "--min", "max_size": "--max"})
'--min (8) is larger than --max (4)'
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gpumagic.batchmath import DEFAULT_MARGIN, PICKS, Pick
from gpumagic.units import parse_size

__all__ = ["BadOptions", "SearchOptions", "check_bounds", "check_size", "parse_budget"]

_FIELD = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


class BadOptions(ValueError):
    """The options are wrong (not the user's code): the magics show it as a ``UsageError``.

    The message names fields in backticks; ``str()`` shows their Python names.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.spelled({})

    def spelled(self, names: Mapping[str, str]) -> str:
        """The message with each field spelled as ``names`` says (unlisted fields: their Python name)."""
        return _FIELD.sub(lambda m: names.get(m.group(1), m.group(1)), self.message)


def check_size(field: str, value: object, low: int = 1) -> int:
    """``value`` as a size: an int from ``low`` to ``sys.maxsize``; BadOptions naming ``field`` otherwise."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadOptions(f"`{field}` must be an int >= {low}, got {value!r}")
    if value < low:
        raise BadOptions(f"`{field}` must be >= {low}, got {value}")
    if value > sys.maxsize:  # sizes index sequences and ranges: Python's limit for them
        raise BadOptions(f"`{field}` must be <= {sys.maxsize} (sys.maxsize), got {value}")
    return value


def check_bounds(
    *,
    min_size: int = 1,
    max_size: int | None = None,
    start: int | None = None,
    dataset_size: int | None = None,
    margin: float = DEFAULT_MARGIN,
    pick: str = "max",
    effective: int | None = None,
) -> None:
    """The bounds of a search, checked together; BadOptions names the first fault."""
    check_size("min_size", min_size)
    for field, value in (("max_size", max_size), ("start", start), ("dataset_size", dataset_size),
                         ("effective", effective)):
        if value is not None:
            check_size(field, value)
    if max_size is not None and min_size > max_size:
        raise BadOptions(f"`min_size` ({min_size}) is larger than `max_size` ({max_size})")
    if start is not None and start < min_size:
        raise BadOptions(f"`start` must be >= `min_size` ({min_size}), got {start}")
    if start is not None and max_size is not None and start > max_size:
        raise BadOptions(f"`start` must be <= `max_size` ({max_size}), got {start}")
    if dataset_size is not None and min_size > dataset_size:
        raise BadOptions(f"`min_size` must be <= `dataset_size` ({dataset_size}), got {min_size}")
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not 0 <= margin < 0.5:
        raise BadOptions(f"`margin` must be in [0, 0.5), got {margin!r}")
    if pick not in PICKS:
        raise BadOptions(f"`pick` must be one of {', '.join(repr(p) for p in PICKS)}, got {pick!r}")


def parse_budget(value: str | int | None) -> int | None:
    """Bytes of a budget given as ``"8GiB"``, ``"800MB"`` or bytes (None stays None); BadOptions names it.

    >>> parse_budget("96MiB")
    100663296
    """
    if value is None:
        return None
    try:
        return parse_size(value, name="`budget`")
    except ValueError as e:
        raise BadOptions(e.args[0]) from None


@dataclass(frozen=True)
class SearchOptions:
    """What a batch-size search is asked to do, checked on construction.

    ``budget`` may be given as ``"8GiB"``, ``"800MB"`` or bytes; it is kept as ``int`` bytes.
    ``gpu`` (a catalog GPU, :mod:`gpumagic.gpus`) and ``budget`` are each a capacity: give one.
    ``evaluation``: trials of forward calls. ``dry_run``: every trial planned on fake tensors.
    ``plan_first``: a real search plans on fake tensors first and spends real trials only to
    verify the plan. ``timeout_s``: how long a rank waits for the others (torch.distributed).
    """

    device: Any = None
    budget: int | None = None
    gpu: str | None = None
    start: int | None = None
    min_size: int = 1
    max_size: int | None = None
    steps: int = 3
    margin: float = DEFAULT_MARGIN
    pick: Pick = "max"
    effective: int | None = None
    dataset_size: int | None = None
    evaluation: bool = False
    dry_run: bool = False
    plan_first: bool = False
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", parse_budget(self.budget))  # an int stays as it is
        if self.gpu is not None and self.budget is not None:
            raise BadOptions("give either a GPU (`gpu`) or a budget (`budget`), not both")
        if self.gpu is not None and not isinstance(self.gpu, str):
            raise BadOptions(f"`gpu` must be a GPU's name such as 'T4', got {type(self.gpu).__name__}")
        check_size("steps", self.steps)
        check_bounds(min_size=self.min_size, max_size=self.max_size, start=self.start,
                     dataset_size=self.dataset_size, margin=self.margin, pick=self.pick, effective=self.effective)
        if self.dry_run and self.device is not None and not isinstance(self.device, str):
            raise BadOptions(
                f"a dry run needs `device` as a string ('cpu', 'cuda', 'mps'), got {type(self.device).__name__}")
        if not isinstance(self.timeout_s, (int, float)) or isinstance(self.timeout_s, bool) or self.timeout_s <= 0:
            raise BadOptions(f"`timeout_s` must be a positive number of seconds, got {self.timeout_s!r}")

    @classmethod
    def checked(cls, **fields: Any) -> BadOptions | None:
        """The error these fields would raise, or None (for docs and tests)."""
        try:
            cls(**fields)
        except BadOptions as e:
            return e
        return None

    def replace(self, **changes: Any) -> SearchOptions:
        """A copy with ``changes``, checked again."""
        return dataclasses.replace(self, **changes)

"""Batch-size arithmetic shared by the search and the out-of-memory advice.

The learning-rate rules are the two that practitioners use when the effective batch changes:
linear scaling for SGD-like optimizers (Goyal et al., 2017) and square-root scaling for
Adam-like ones (Malladi et al., 2022). When the effective batch is unchanged, the rate is too.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, Literal, get_args

__all__ = [
    "PICKS",
    "LRRule",
    "Pick",
    "accumulation_plan",
    "fit_from_report",
    "interpolate",
    "is_power_of_two",
    "lr_note",
    "lr_rule_for",
    "pow2_floor",
    "round_like",
]

LRRule = Literal["linear", "sqrt"]
Pick = Literal["max", "throughput", "pow2"]
"""How the search picks its recommendation: the largest that fits with the margin, the smallest
within 5% of the best throughput, or the largest power of two that fits."""
PICKS: tuple[Pick, ...] = get_args(Pick)

_ADAM_LIKE = (
    "adam", "adamw", "adamax", "nadam", "radam", "adagrad", "adadelta", "rmsprop", "adafactor", "lion", "lamb",
)


def lr_rule_for(optimizer: object | str | None) -> LRRule:
    """``"sqrt"`` for Adam-like (adaptive) optimizers, ``"linear"`` for SGD-like ones.

    >>> lr_rule_for("AdamW")
    'sqrt'
    """
    if optimizer is None:
        return "linear"
    name = optimizer if isinstance(optimizer, str) else type(optimizer).__name__
    name = name.lower().replace("_", "")
    return "sqrt" if any(name.startswith(a) for a in _ADAM_LIKE) else "linear"


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def pow2_floor(n: int) -> int:
    """The largest power of two <= n (n >= 1).

    >>> pow2_floor(700)
    512
    """
    return 1 << (n.bit_length() - 1)


def interpolate(points: Sequence[tuple[float, float]], x: float) -> float | None:
    """y at ``x`` on the broken line through ``points`` (sorted by x); None outside their range."""
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if len(points) == 1 and points[0][0] == x:
        return points[0][1]
    return None


def round_like(size: float, reference: int | None) -> int:
    """Round a batch size down the way the user's current size is written.

    A power of two stays a power of two, a multiple of 8 (or 10) stays one, else plain floor.

    >>> round_like(700, 512), round_like(700, 96), round_like(700, 30), round_like(700, 7)
    (512, 696, 700, 700)
    """
    b = max(1, math.floor(size))
    if reference is None or reference <= 0:
        return b
    if is_power_of_two(reference) and reference >= 2:
        return pow2_floor(b)
    for step in (8, 10):
        if reference % step == 0 and b >= step:
            return b - b % step
    return b


def accumulation_plan(effective: int, micro_max: int) -> tuple[int, int]:
    """Micro-batch ``b`` and steps ``k`` with ``b * k >= effective``, ``b <= micro_max``,
    ``k`` as small as possible and ``b`` as small as that ``k`` allows (least padding).

    >>> accumulation_plan(1024, 300)
    (256, 4)
    """
    if effective < 1 or micro_max < 1:
        raise ValueError(f"effective batch and micro-batch must be >= 1, got {effective} and {micro_max}")
    k = math.ceil(effective / micro_max)
    return math.ceil(effective / k), k


def fit_from_report(report: Any) -> tuple[float, float] | None:
    """(intercept, bytes per sample) from a run that worked: its largest-batch step's peak, minus
    what does not grow with the batch (the memory before the cell, gradients, optimizer state)."""
    steps = [s for s in getattr(report, "steps", ()) if s.batch_size and s.peak_bytes and s.count == 1]
    if not steps:
        return None
    step = max(steps, key=lambda s: (s.batch_size, s.peak_bytes))
    fixed = float(report.baseline_bytes)
    b = report.breakdown
    if b is not None:
        fixed += b.gradients_bytes + b.optimizer_state_bytes
        if b.parameters_bytes > report.baseline_bytes:  # the model was built inside the cell
            fixed += b.parameters_bytes
    slope = (step.peak_bytes - fixed) / step.batch_size
    return (fixed, slope) if slope > 0 else None


def lr_note(old_effective: int | None, new_effective: int, optimizer: object | str | None = None) -> str:
    """What the learning rate should do when the effective batch goes from old to new."""
    rule = lr_rule_for(optimizer)
    if old_effective is None:
        return (
            f"scale the learning rate with the effective batch {new_effective}: "
            + ("linearly (SGD-like optimizer)" if rule == "linear" else "by the square root (Adam-like optimizer)")
        )
    if old_effective == new_effective:
        return f"keep the learning rate: the effective batch stays {new_effective}"
    ratio = new_effective / old_effective
    factor = ratio if rule == "linear" else math.sqrt(ratio)
    how = "linear scaling, SGD-like optimizer" if rule == "linear" else "square-root scaling, Adam-like optimizer"
    return (
        f"effective batch {old_effective} → {new_effective}: multiply the learning rate by {factor:.3g} ({how})"
    )

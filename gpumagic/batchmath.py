"""Batch-size arithmetic shared by the search and the out-of-memory advice.

The learning-rate rules are the two that practitioners use when the effective batch changes:
linear scaling for SGD-like optimizers (Goyal et al., 2017) and square-root scaling for
Adam-like ones (Malladi et al., 2022). When the effective batch is unchanged, the rate is too.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Literal, get_args

__all__ = [
    "DEFAULT_MARGIN",
    "PICKS",
    "THROUGHPUT_WITHIN",
    "LRRule",
    "Pick",
    "accumulation_plan",
    "interpolate",
    "is_power_of_two",
    "lr_family",
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

DEFAULT_MARGIN = 0.05
"""The share of memory a recommended batch leaves free: its predicted peak stays under
capacity × (1 − margin). The search, the what-if plans and the OOM advice all use it."""

THROUGHPUT_WITHIN = 0.05
"""``pick="throughput"`` takes the smallest batch whose samples/s is within this share of the best."""

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
    k = -(-effective // micro_max)  # integer ceilings: a float quotient rounds huge batches
    return -(-effective // k), k


_SGD_LIKE = ("sgd", "asgd", "lars", "lbfgs", "rprop")

_VERIFIED_RATIO = 32.0
"""How far the rules were verified: Goyal et al. scaled linearly from batch 256 to 8,192 (32x);
Malladi et al. report square-root scaling for Adam over a comparable range. A change of the
effective batch beyond 32x either way is an extrapolation, and the note says so."""


def lr_family(optimizer: object | str | None) -> LRRule | None:
    """The learning-rate rule for a known optimizer family; None when the family is unknown.

    >>> lr_family("AdamW"), lr_family("SGD"), lr_family("Sophia"), lr_family(None)
    ('sqrt', 'linear', None, None)
    """
    if optimizer is None:
        return None
    name = optimizer if isinstance(optimizer, str) else type(optimizer).__name__
    name = name.lower().replace("_", "")
    if any(name.startswith(a) for a in _ADAM_LIKE):
        return "sqrt"
    if any(name.startswith(a) for a in _SGD_LIKE):
        return "linear"
    return None


def lr_note(old_effective: int | None, new_effective: int, optimizer: object | str | None = None) -> str:
    """What the learning rate should do when the effective batch goes from old to new.

    ``optimizer``: the optimizer (or its class name) the code steps; when its family is unknown,
    the note gives both rules rather than pick one.

    >>> lr_note(4096, 4100, "SGD")
    'keep the learning rate: the effective batch goes from 4096 to 4100, a change under 0.5%'
    """
    family = lr_family(optimizer)
    named = f"{optimizer if isinstance(optimizer, str) else type(optimizer).__name__}" if optimizer else None
    if old_effective is None:
        if family is None:
            return (
                f"scale the learning rate with the effective batch {new_effective}: linearly for an SGD-like "
                f"optimizer, by the square root for an Adam-like one ({_unknown(named)})"
            )
        return (
            f"scale the learning rate with the effective batch {new_effective}: "
            + ("linearly (SGD-like optimizer)" if family == "linear" else "by the square root (Adam-like optimizer)")
        )
    if old_effective == new_effective:
        return f"keep the learning rate: the effective batch stays {new_effective}"
    ratio = new_effective / old_effective
    linear, sqrt = ratio, math.sqrt(ratio)
    shown = linear if family == "linear" else sqrt if family == "sqrt" else None
    if shown is not None and f"{shown:.3g}" == "1":
        return (
            f"keep the learning rate: the effective batch goes from {old_effective} to {new_effective}, "
            "a change under 0.5%"
        )
    change = f"effective batch {old_effective} → {new_effective}"
    beyond = ""
    if max(ratio, 1 / ratio) > _VERIFIED_RATIO:
        beyond = (
            f"; a {max(ratio, 1 / ratio):.3g}x change is an extrapolation: the rule was verified up to 32x "
            "(start there and tune)"
        )
    if family is None:
        return (
            f"{change}: multiply the learning rate by {linear:.3g} if the optimizer is SGD-like (linear scaling) "
            f"or by {sqrt:.3g} if it is Adam-like (square-root scaling): {_unknown(named)}{beyond}"
        )
    how = "linear scaling, SGD-like optimizer" if family == "linear" else "square-root scaling, Adam-like optimizer"
    return f"{change}: multiply the learning rate by {shown:.3g} ({how}{f': {named}' if named else ''}){beyond}"


def _unknown(named: str | None) -> str:
    return f"{named} is neither a known SGD-like nor Adam-like optimizer" if named else \
        "the optimizer the code steps is unknown"

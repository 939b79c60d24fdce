"""The gradient noise scale: the batch size above which a larger batch buys little.

The *simple noise scale* of McCandlish et al. (2018, "An Empirical Model of Large-Batch
Training", appendix A) is ``B = tr(Σ) / |G|²``: the per-sample gradient covariance's trace over
the squared norm of the true gradient. A mini-batch gradient of ``b`` samples drawn without
replacement from ``N`` has

    E |G_b|² = |G|² + tr(Σ) · c(b),    c(b) = (1/b) · (N − b) / (N − 1)

(``c(b) = 1/b`` when ``N`` is unknown), so squared gradient norms measured at two or more batch
sizes *at the same weights* give ``|G|²`` and ``tr(Σ)`` as the intercept and slope of a line in
``c``. :class:`GradientNorms` collects those norms from a training loop without changing its
weights (each optimizer step reads the gradients and drops them before the update);
:func:`estimate` fits the line and bootstraps the spread.

>>> estimate([(16, 2.1), (16, 1.9), (256, 0.31), (256, 0.29)]).value   # doctest: +SKIP
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["GradientNorms", "NoiseScale", "estimate"]

BOOTSTRAP = 400
"""Resamples behind ``low``/``high``."""


@dataclass(frozen=True)
class NoiseScale:
    """The simple noise scale ``value`` (a batch size) with ``low``/``high``, the 10th and 90th
    percentiles of a bootstrap over the measurements; ``sizes`` the batch sizes measured and
    ``measurements`` the gradients read at each; ``normalised`` says the loss was a sum over
    the batch and each gradient was divided by its batch size."""

    value: float
    low: float
    high: float
    sizes: tuple[int, ...]
    measurements: tuple[int, ...]
    normalised: bool = False
    gradient_norm_sq: float = 0.0
    """The fitted ``|G|²``."""
    trace: float = 0.0
    """The fitted ``tr(Σ)``."""

    def describe(self) -> str:
        how = ", ".join(f"{n}×{b}" for b, n in zip(self.sizes, self.measurements, strict=True))
        extra = "; the loss is a sum over the batch: gradients divided by the batch size" if self.normalised else ""
        return (f"≈ {self.value:,.0f} (10–90%: {self.low:,.0f}–{self.high:,.0f}), from gradients at the starting "
                f"weights ({how}){extra}")


def _fit(points: Sequence[tuple[float, float, int]]) -> tuple[float, float] | None:
    """Least squares ``y = a + s·c`` over ``(c, mean y, count)`` groups (the same line as over
    every point): (a, s), or None when every c is the same."""
    n = sum(k for _, _, k in points)
    mc = sum(c * k for c, _, k in points) / n
    my = sum(y * k for _, y, k in points) / n
    sxx = sum(k * (c - mc) ** 2 for c, _, k in points)
    if sxx <= 0:
        return None
    s = sum(k * (c - mc) * (y - my) for c, y, k in points) / sxx
    return my - s * mc, s


def _c(b: int, n: int | None) -> float:
    if n is None or n <= 1:
        return 1.0 / b
    return (1.0 / b) * max(n - b, 0) / (n - 1)


def estimate(norms: Sequence[tuple[int, float]], dataset_size: int | None = None) -> NoiseScale | str:
    """The noise scale from ``(batch size, |gradient|²)`` pairs read at the same weights, or a
    sentence saying why it cannot be estimated.

    Gradients of a loss summed over the batch grow with it (``E|G_b|² ≥ b²|G|²``) where those
    of a mean shrink: a norm at the largest size above the smallest's times the square root of
    their ratio marks a sum, and each gradient is then divided by its batch size.
    """
    pts = [(int(b), float(y)) for b, y in norms if b and b > 0 and math.isfinite(y)]
    sizes = sorted({b for b, _ in pts})
    if len(sizes) < 2:
        return ("needs gradients at two or more batch sizes at the same weights; got "
                + (f"only batch {sizes[0]}" if sizes else "none"))
    counts = tuple(sum(1 for b, _ in pts if b == s) for s in sizes)
    lo, hi = sizes[0], sizes[-1]
    mean_lo = sum(y for b, y in pts if b == lo) / counts[0]
    mean_hi = sum(y for b, y in pts if b == hi) / counts[-1]
    normalised = mean_lo > 0 and mean_hi > mean_lo * math.sqrt(hi / lo)
    if normalised:
        pts = [(b, y / b**2) for b, y in pts]
    # batches of one size share c: the fit needs only each size's mean (short last batches are their own size)
    groups = {b: [y for bb, y in pts if bb == b] for b in sorted({b for b, _ in pts})}
    cs = {b: _c(b, dataset_size) for b in groups}
    fitted = _fit([(cs[b], sum(ys) / len(ys), len(ys)) for b, ys in groups.items()])
    if fitted is None:
        return f"the batch sizes measured ({', '.join(map(str, sizes))}) are all the whole data set"
    g2, trace = fitted
    if g2 <= 0:
        return ("the mean gradient is too small to tell from the noise at these sizes (|G|² fitted ≤ 0): "
                "the weights are at or near a minimum, or more measurements are needed")
    if trace <= 0:
        return "the gradients do not get less noisy with a larger batch (tr(Σ) fitted ≤ 0): no noise to measure"
    value = trace / g2
    rng = random.Random(0)  # its own generator: the user's RNG streams are not touched
    boot: list[float] = []
    for _ in range(BOOTSTRAP):
        f = _fit([(cs[b], sum(rng.choices(ys, k=len(ys))) / len(ys), len(ys)) for b, ys in groups.items()])
        if f is not None and f[0] > 0 and f[1] > 0:
            boot.append(f[1] / f[0])
    boot.sort()
    low = boot[int(0.1 * (len(boot) - 1))] if boot else value
    high = boot[int(0.9 * (len(boot) - 1))] if boot else value
    return NoiseScale(value, min(low, value), max(high, value), tuple(sizes), counts, normalised, g2, trace)


class GradientNorms:
    """While active, every optimizer step reads ``|g|²`` over the parameters it would update and
    then drops their gradients, so the step changes no weight (an optimizer skips parameters
    without a gradient). Collects ``(batch size, |g|²)`` in :attr:`norms`; the batch size of a
    step comes from :meth:`step_batch` (the caller's tracker knows it).

    >>> with GradientNorms() as g:    # doctest: +SKIP
    ...     train()                   # stopped by the caller after K steps
    """

    def __init__(self) -> None:
        self.pending: list[float] = []
        self.norms: list[tuple[int, float]] = []
        self.steps = 0
        """Optimizer steps seen (with or without gradients)."""
        self.problem: str | None = None
        self._handle: Any = None

    def __enter__(self) -> GradientNorms:
        import torch.optim.optimizer as optmod

        self._handle = optmod.register_optimizer_step_pre_hook(self._read)
        return self

    def __exit__(self, *exc: object) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.remove()

    def _read(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.steps += 1
        try:
            self._read_and_drop(optimizer)
        except Exception as e:  # ours: the estimate is missing, the user's step goes on
            if self.problem is None:
                self.problem = f"reading the gradients failed: {type(e).__name__}: {e}"

    def _read_and_drop(self, optimizer: Any) -> None:
        parts: dict[Any, list[torch.Tensor]] = {}  # per device: one host read each, not one per parameter
        with torch.no_grad():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    g = p.grad
                    if g is not None:
                        values = g.coalesce().values() if g.is_sparse else g
                        parts.setdefault(g.device, []).append(values.detach().float().pow(2).sum())
                        p.grad = None
            if parts:
                self.pending.append(sum(float(torch.stack(ts).sum()) for ts in parts.values()))

    def step_batch(self, batch_size: int | None) -> None:
        """The optimizer step just ended had ``batch_size`` samples: pair it with its norms."""
        pending, self.pending = self.pending, []
        if batch_size and pending:
            self.norms.append((batch_size, sum(pending)))

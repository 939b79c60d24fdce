"""Batch-size search: fit, verify, bracket, pick. Pure: every trial goes through ``run_trial(b)``.

Peak memory is close to affine in the batch size, ``peak(b) ≈ intercept + slope · b``, so a few
small trials give a line, the line predicts the largest batch that fits, one trial just under the
capacity verifies it and one more settles the last percent. Each new point refits the line, with
weights growing with the batch size, because at tiny sizes fixed costs (parameters, optimizer
state, workspaces) dominate and bend the curve. When predictions miss twice the search falls back
to bracketing: doubling while nothing has failed, then bisection, each guess replaced by the
secant through the two largest sizes that ran when that lands inside the bracket; the
recommendation then interpolates the measured peaks instead of trusting the line.

A common shape is not a line but a hinge, ``peak(b) ≈ max(flat, a + s·b)``: with Adam at small
batches the optimizer step's temporaries set the peak and the batch barely shows, while the
activations, steeper, take over past a knee. Peak memory is the largest of such affine terms, so
it is convex: a slope measured at small sizes can only under-estimate the slope further up. So
the points are split into pieces where the secant turns clearly steeper, and only the top piece
predicts. While the batch is under 5% of the peak (no knee seen yet) a trial grows the batch at
most 8× (more only where peak(b) ≤ peak(lo)·b/lo, true for any term with a non-negative
intercept, still fits); a failure there is bisected geometrically. With one size above a knee
the next grows by that proportional bound, and two give the steeper piece its slope.

Some stops are not memory limits and are reported as such: the batch size not reaching the loop
at all (memory identical at every size), the batch already holding the whole data set (memory
stops growing, or a trial makes no steps), ``max_size``, and memory growing so little that the
search's own ceiling is reached.

``max_batch_size`` is always a size that ran; the recommendation keeps ``margin`` free and is never
above it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from gpumagic.batchmath import (
    DEFAULT_MARGIN,
    PICKS,
    THROUGHPUT_WITHIN,
    Pick,
    accumulation_plan,
    interpolate,
    lr_note,
    lr_rule_for,
    pow2_floor,
)
from gpumagic.dataloading import DATA_WAIT_THRESHOLD
from gpumagic.options import BadOptions, check_bounds, check_size
from gpumagic.report import BatchSearchResult, Fit, Trial
from gpumagic.units import format_bytes, format_percent

__all__ = ["PICKS", "search"]

DEFAULT_START = 2
"""The first batch size tried unless the bounds exclude it."""
Stop = Literal["", "trials", "nothing", "bracket", "flat", "cap", "ceiling", "fit", "gain", "plateau", "empty"]
"""Why the search stopped ("" while it runs): out of trials, nothing ran, the bracket closed, memory
flat in the batch size, max_size or the data set reached, the search's ceiling, the fit missed
twice, too little to gain, or memory stopped growing (the whole data set in one batch)."""

_FIRST_SAFETY = 0.01
"""The first trial near the capacity aims this far below it: an OOM costs a whole trial."""
_PROBE_GROWTH = 8
"""The second probe is at most this many times the first (closer when the first is already big)."""
_PROBE_FRACTION = 0.25
"""The third probe uses this share of the predicted headroom: far enough for a long lever, safe
even when the two-point slope is four times too small."""
_MAX_STEP_GROWTH = 256
"""Without max_size or a data-set size, one trial never exceeds this multiple of the largest run."""
_CEILING = 2**24
"""Nor this size: memory that grows so little is better described than searched further."""
_FLAT_JUMP = 64
"""After two identical peaks the next trial is this many times larger (later ones _PROBE_GROWTH)."""
_FLAT_WIDTH = 512
"""Identical peaks over sizes this many times apart mean the batch size does not reach the loop
(over a narrower span they may be the flat start of a hinge, see _SHARE)."""
_SAME_BYTES_ABS = 16384
_SAME_BYTES_REL = 1e-5
_SAME_SHARE_SMALL = 0.01
"""Two peaks are the same within max(1e-5 of the peak, 16 KiB) — allocator granularity and
workspaces — but never within more than this share of the peak: a tiny model's peaks of 1.35,
4.41 and 14.91 KiB differ, although by less than 16 KiB."""
_SHARE = 0.05
"""While the batch holds less than this share of the peak, fixed costs set it (Adam's step, say),
and a steeper per-sample term (activations) may be hidden below it: no trial grows more than
_PROBE_GROWTH times (or the proportional bound, when that allows more)."""
_BEND = 0.25
"""A secant this much steeper than the piece below it, beyond noise, starts a new piece."""
_MISS = 0.03
"""A prediction off by more than this share of the capacity is a miss; two misses end the fit."""
_TIGHT = 0.02
"""The bracket between the largest run and the smallest failure is closed at this width."""
_STEP_BACK = 0.04
"""When the line points past a size that failed, the next trial is this far below that size."""
_MIN_GAIN = 0.01
"""A next trial that would grow the batch by less than this is not worth running."""
_R2_AFFINE = 0.99
_RESIDUAL_AFFINE = 0.02
_THROUGHPUT_EXTRA = 2
_THROUGHPUT_GAP = 1.25
_FULL_BATCH_BELOW = 2000


_Next = tuple[int, float | None] | None
"""A size to try next and the line's prediction for it (None when the step is a probe), or None to stop."""


def _weighted_fit(points: Iterable[tuple[int, int]]) -> Fit | None:
    """Least squares with weights proportional to the batch size; ``None`` below two sizes."""
    pts = sorted(points)
    if len({b for b, _ in pts}) < 2:
        return None
    w_sum = float(sum(b for b, _ in pts))
    mean_b = sum(b * b for b, _ in pts) / w_sum
    mean_p = sum(b * p for b, p in pts) / w_sum
    s_bb = sum(b * (b - mean_b) ** 2 for b, _ in pts)
    s_bp = sum(b * (b - mean_b) * (p - mean_p) for b, p in pts)
    slope = s_bp / s_bb
    intercept = mean_p - slope * mean_b
    ss_res = sum(b * (p - intercept - slope * b) ** 2 for b, p in pts)
    ss_tot = sum(b * (p - mean_p) ** 2 for b, p in pts)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return Fit(intercept_bytes=intercept, bytes_per_sample=slope, r2=max(0.0, min(1.0, r2)), points=len(pts))


@dataclass
class _Search:
    run_trial: Callable[[int], Trial]
    capacity: int
    start: int
    min_size: int
    upper: int | None
    dataset_size: int | None
    drop_last: bool
    margin: float
    max_trials: int
    progress: Callable[[Trial, int], None] | None
    learn_dataset_size: Callable[[], int | None] | None = None

    trials: list[Trial] = field(default_factory=list)
    ran: dict[int, int] = field(default_factory=dict)
    """Sizes that ran with training steps -> peak bytes."""
    rates: dict[int, float] = field(default_factory=dict)
    oom_hi: int | None = None
    empty_hi: int | None = None
    counts_steps: bool = False
    misses: int = 0
    verified: bool = False
    stepped_back: bool = False
    bracketing: bool = False
    stop: Stop = ""
    """Why the memory search ended: cap, ceiling, flat, plateau, fit, gain, bracket, trials, nothing or
    empty (nothing on the device)."""
    plateau_from: int | None = None
    plateau_confirmed: bool = False
    notes: list[str] = field(default_factory=list)

    # -- trials ---------------------------------------------------------------------------------

    def budget_left(self) -> bool:
        return len(self.trials) < self.max_trials

    def trial(self, b: int) -> Trial:
        result = self.run_trial(b)
        if not isinstance(result, Trial):
            raise TypeError(f"run_trial({b}) must return a gpumagic.report.Trial, got {type(result).__name__}")
        if not result.oom and result.peak_bytes is None:
            raise ValueError(f"run_trial({b}) returned a Trial that ran without peak_bytes; only an OOM may lack it")
        self.trials.append(result)
        if self.dataset_size is None and self.learn_dataset_size is not None:
            # the trials revealed the data set (e.g. a DataLoader built inside the trial code)
            n = self.learn_dataset_size()
            if n is not None and n >= self.min_size:
                self.dataset_size = n
                self.upper = n if self.upper is None else min(self.upper, n)
        if result.oom:
            self.oom_hi = b if self.oom_hi is None else min(self.oom_hi, b)
        elif result.steps == 0 and self.counts_steps:
            # Earlier trials made steps and this one none: the data set ran out before one batch
            # (drop_last). The size is as unusable as one that ran out of memory.
            self.empty_hi = b if self.empty_hi is None else min(self.empty_hi, b)
        else:
            assert result.peak_bytes is not None
            self.ran[b] = result.peak_bytes
            self.counts_steps = self.counts_steps or result.steps > 0
            if result.samples_per_second is not None:
                self.rates[b] = result.samples_per_second
        if self.progress is not None:
            self.progress(result, len(self.trials) - 1)
        return result

    @property
    def lo(self) -> int:
        return max(self.ran)

    @property
    def hi(self) -> int | None:
        bounds = [h for h in (self.oom_hi, self.empty_hi) if h is not None]
        return min(bounds) if bounds else None

    def noise(self, p: int) -> float:
        return max(min(_SAME_BYTES_ABS, _SAME_SHARE_SMALL * p), _SAME_BYTES_REL * p)

    def same(self, p: int, q: int) -> bool:
        return abs(p - q) <= self.noise(max(p, q))

    # -- the search -----------------------------------------------------------------------------

    def run(self) -> None:
        b = self.start
        while True:
            if not self.budget_left():
                self.stop = "trials"
                return
            t = self.trial(b)
            if not t.oom and b in self.ran:
                break
            if b <= self.min_size:
                self.stop = "nothing"
                return
            # nothing known yet: drop fast, the line fitted later climbs back in one or two trials
            b = max(self.min_size, b // _PROBE_GROWTH)
        if self.ran[b] <= 0:  # nothing of the trial was on the device: memory cannot size the batch
            self.stop = "empty"
            return
        while True:
            if not self.budget_left():
                self.stop = "trials"
                return
            step = self.next_size()
            if step is None:
                return
            size, predicted = step
            if size in self.ran or size < self.min_size or (self.hi is not None and size >= self.hi):
                self.stop = "bracket"  # nothing new to learn; never run a size twice
                return
            t = self.trial(size)
            if predicted is not None:
                self.judge(t, predicted)

    def judge(self, t: Trial, predicted: float) -> None:
        """Count a miss when a fitted prediction was clearly wrong; a close one near the top verifies."""
        if t.oom:
            # the line said it fits: it is optimistic near the top, aim lower from now on
            self.verified = False
            if predicted < (1 - _MISS) * self.capacity:
                self.misses += 1
        elif t.batch_size in self.ran:
            err = abs(self.ran[t.batch_size] - predicted)
            if err > _MISS * self.capacity:
                self.misses += 1
            elif err <= _FIRST_SAFETY * self.capacity and self.ran[t.batch_size] >= 0.9 * self.capacity:
                self.verified = True
        if self.misses >= 2:
            self.bracketing = True

    def next_size(self) -> _Next:
        """The next size to try and the fit's prediction for it, or None (``self.stop`` says why)."""
        decided, step = self.flat_step()
        if decided:
            return step
        plateau = self.plateau_step()
        if plateau is not None or self.stop:
            return plateau
        if self.stop_before_fit():
            return None
        fit = _weighted_fit(self.ran.items())
        if fit is None:
            return self.second_size(), None
        pieces = self.pieces()
        if len(pieces[-1]) == 1:
            # only the largest size is on the steeper piece: its slope is unknown yet
            return self.proportional_step()
        return self.step_along(self.slope(fit, pieces), one_piece=len(pieces) == 1)

    def flat_step(self) -> tuple[bool, _Next]:
        """Memory identical at every size so far: stop once the sizes span enough, else jump.
        Returns (decided, step); not decided when memory is not flat."""
        lo, hi, ran = self.lo, self.hi, self.ran
        sizes = sorted(ran)
        if hi is None and len(ran) >= 2 and all(self.same(ran[b], ran[sizes[0]]) for b in sizes):
            width = sizes[-1] / sizes[0]
            if width >= _FLAT_WIDTH or (lo == self.upper and width >= 4):
                self.stop = "flat"
                return True, None
            if lo != self.upper and lo < _CEILING:
                # one long jump, then steps short enough to catch the knee of a hinge on the way
                return True, (self.clamp(lo * (_FLAT_JUMP if width < _FLAT_JUMP else _PROBE_GROWTH)), None)
        return False, None

    def stop_before_fit(self) -> bool:
        """At a bound (max_size or data set, the ceiling) or with the bracket closed: set ``stop``."""
        lo, hi = self.lo, self.hi
        if lo == self.upper:
            self.stop = "cap"
        elif lo >= _CEILING:
            self.stop = "ceiling"
        elif hi is not None and (hi - lo <= 1 or hi - lo <= _TIGHT * lo):
            self.stop = "bracket"
        return bool(self.stop)

    def second_size(self) -> int:
        """One size ran: a second, well below the failures when there are some, gives a line."""
        lo, hi = self.lo, self.hi
        below = max(self.min_size, lo // _PROBE_GROWTH)
        if hi is None:
            return self.second_probe()
        return below if below < lo else min(self.second_probe(), (lo + hi) // 2)

    def slope(self, fit: Fit, pieces: list[list[int]]) -> float:
        """Bytes per sample near the top: local while bracketing, else the top piece's or the fit's."""
        if self.bracketing:
            return self.local_slope()
        if len(pieces) > 1:
            top_fit = _weighted_fit((b, self.ran[b]) for b in pieces[-1])
            assert top_fit is not None
            return top_fit.bytes_per_sample  # the flat start says nothing about the top
        return fit.bytes_per_sample

    def step_along(self, slope: float, *, one_piece: bool) -> _Next:
        """The next size along ``slope`` from the largest run, towards the capacity."""
        lo, hi = self.lo, self.hi
        p_lo = self.ran[lo]
        # a line through a flat start hides the knee of a hinge: grow by bounded steps until the
        # batch is a fair share of the peak (no bend seen yet, no failure above)
        shallow = one_piece and slope * lo < _SHARE * p_lo
        if slope <= 0:
            if hi is None:
                return self.clamp(2 * lo), None
            return (self.split(lo, hi) if shallow and not self.bracketing else (lo + hi) // 2), None
        bound = self.growth_bound() if shallow and hi is None and not self.bracketing else None

        def reach(limit: float) -> int:
            # anchored at the largest run: right for a line, and better than the global fit when
            # the curve bends at small sizes
            return lo + math.floor((limit - p_lo) / slope)

        if len(self.ran) < 3 and hi is None and not self.bracketing:
            room = reach(self.capacity)
            if room > 4 * lo:
                probe = self.clamp(lo + max(1, math.floor(_PROBE_FRACTION * (room - lo))))
                return (probe if bound is None else min(probe, bound)), None
        cand = reach(self.capacity * (1 - (0.0 if self.verified else _FIRST_SAFETY)))
        if cand - lo < _MIN_GAIN * lo:
            cand = reach(self.capacity)  # the last percent below the capacity still holds samples
        if cand <= lo:
            self.stop = "fit"
            return None
        cand = self.clamp(cand)
        if bound is not None and cand > bound:
            return bound, None  # a probe, not a prediction to judge the line by
        if self.bracketing and hi is None:
            cand = min(cand, 2 * lo)  # doubling at most, towards a limit not seen yet
        if hi is not None and cand >= hi:
            cand = self.inside_bracket(hi, p_lo, slope, shallow)
        elif cand - lo < _MIN_GAIN * lo:
            self.stop = "gain"
            return None
        return cand, p_lo + slope * (cand - lo)

    def inside_bracket(self, hi: int, p_lo: int, slope: float, shallow: bool) -> int:
        """A size below ``hi`` (a failure) when the line points at or past it."""
        lo = self.lo
        close = not shallow and p_lo + slope * (hi - lo) >= (1 - _MISS) * self.capacity
        if hi == self.oom_hi and close and not self.bracketing and not self.stepped_back:
            # the line overshoots an OOM by a little, usually: step back once, but at least
            # halve the bracket; after that, or when the line put the failure well below the
            # capacity or came from a flat start (it is wrong there), bisect
            self.stepped_back = True
            return max((lo + hi) // 2, hi - math.ceil(_STEP_BACK * hi))
        if shallow and not self.bracketing:
            return self.split(lo, hi)
        return (lo + hi) // 2

    @staticmethod
    def split(lo: int, hi: int) -> int:
        """Between a flat size that ran and a failure the knee of a hinge may be anywhere: split
        the ratio, not the difference (arithmetic bisection would fail more often)."""
        return min(hi - 1, max(lo + 1, math.isqrt(lo * hi)))

    def pieces(self) -> list[list[int]]:
        """The sizes that ran, ascending, split where memory starts to grow clearly faster.

        Peak memory is the largest of a few affine terms (what is alive at the optimizer step, at
        the end of the forward pass, ...), so it is convex in the batch size: a piece fitted at
        small sizes can only under-estimate the slope further up. A size whose secant from the
        piece below is ``_BEND`` steeper than that piece, beyond what noise of ``same`` size can
        explain, starts a new piece; the last piece is the one that sets the peak at the top.
        """
        sizes = sorted(self.ran)
        runs = [[sizes[0]]]
        for b in sizes[1:]:
            run = runs[-1]
            if len(run) >= 2 and self.steeper(run, b):
                runs.append([b])
            else:
                run.append(b)
        return runs

    def steeper(self, run: list[int], b: int) -> bool:
        ran = self.ran
        fit = _weighted_fit((x, ran[x]) for x in run)
        assert fit is not None
        last = run[-1]
        noise = 2 * self.noise(ran[b])
        below = max(0.0, fit.bytes_per_sample) + noise / (last - run[0])
        return (ran[b] - ran[last] - noise) / (b - last) > (1 + _BEND) * below

    def growth_bound(self) -> int:
        """The largest next size while the batch is under ``_SHARE`` of the peak.

        ``_PROBE_GROWTH`` times the largest run, or more when the capacity is many times the peak:
        any term with a non-negative intercept obeys peak(b) <= peak(lo) * b / lo.
        """
        lo, p_lo = self.lo, self.ran[self.lo]
        proportional = math.floor(lo * (1 - _FIRST_SAFETY) * self.capacity / p_lo)
        return self.clamp(max(_PROBE_GROWTH * lo, proportional))

    def proportional_step(self) -> tuple[int, float | None] | None:
        """One size above a bend: grow as far as peak(b) <= peak(lo) * b / lo keeps under the capacity.

        The bound holds for any term with a non-negative intercept (activations, the batch itself),
        whatever its slope; the next size then gives the steeper piece its slope.
        """
        lo, hi, p_lo = self.lo, self.hi, self.ran[self.lo]
        cand = math.floor(lo * (1 - _FIRST_SAFETY) * self.capacity / p_lo)
        if cand - lo < _MIN_GAIN * lo:
            cand = math.floor(lo * self.capacity / p_lo)  # a bound, not an estimate: safe to the capacity
        cand = self.clamp(cand)
        if hi is not None and cand >= hi:
            cand = (lo + hi) // 2
        elif cand - lo < _MIN_GAIN * lo:
            self.stop = "gain"
            return None
        return cand, None

    def local_slope(self) -> float:
        """The secant through the two largest sizes that ran: all a bent curve tells about its top."""
        (b0, p0), (b1, p1) = sorted(self.ran.items())[-2:]
        return (p1 - p0) / (b1 - b0)

    def clamp(self, b: int) -> int:
        if self.upper is not None:
            return min(b, self.upper)
        return min(b, self.lo * _MAX_STEP_GROWTH, _CEILING)

    def second_probe(self) -> int:
        # With a non-negative intercept, peak(b) <= peak(s) * b / s, so this size fits whatever
        # the split between fixed and per-sample memory is.
        s = self.lo
        safe = math.floor(0.9 * s * self.capacity / self.ran[s])
        return self.clamp(max(s + 1, min(_PROBE_GROWTH * s, safe)))

    def plateau_split(self) -> tuple[int, list[int]] | None:
        """(first size on the plateau, sizes below it) when memory grew and then stopped growing."""
        if self.oom_hi is not None or len(self.ran) < 3:
            return None
        sizes = sorted(self.ran)
        top = self.ran[sizes[-1]]
        i = len(sizes) - 1
        while i > 0 and self.same(self.ran[sizes[i - 1]], top):
            i -= 1
        if i == 0 or i == len(sizes) - 1:
            return None
        # Equal peaks count only if the sizes below grew steeply enough that the same span would
        # have shown a clear rise: near-equal peaks of two close sizes are just a small slope.
        fit = _weighted_fit((b, self.ran[b]) for b in sizes[: i + 1])
        rise = fit.bytes_per_sample * (sizes[-1] - sizes[i]) if fit is not None else 0.0
        if rise < 10 * self.noise(top):
            return None
        return sizes[i], sizes[:i]

    def plateau_step(self) -> tuple[int, float | None] | None:
        """Memory stopped growing: the batch holds the whole data set. Find where it starts."""
        split = self.plateau_split()
        if split is None:
            return None
        first, growing = split
        self.plateau_from = first
        g = growing[-1]
        top = self.ran[first]
        fit = _weighted_fit((b, self.ran[b]) for b in growing)
        if fit is not None and fit.bytes_per_sample > 0:
            estimate = g + math.floor((top - self.ran[g]) / fit.bytes_per_sample)
            if estimate >= first:
                self.plateau_confirmed = True
                self.stop = "plateau"
                return None
            cand = max(g + 1, estimate)
        else:
            cand = (g + first) // 2
        if first - g <= 1:
            self.plateau_confirmed = True
            self.stop = "plateau"
            return None
        if first - g <= _TIGHT * g or cand >= first:
            self.stop = "plateau"
            return None
        return cand, None

    # -- the result -----------------------------------------------------------------------------

    def largest_run(self) -> int | None:
        if not self.ran or self.stop in ("flat", "nothing"):
            return None
        if self.stop == "plateau" and self.plateau_from is not None:
            if self.plateau_confirmed:
                return self.plateau_from
            return max(b for b in self.ran if b < self.plateau_from)
        return self.lo

    def fit_points(self, largest: int) -> list[tuple[int, int]]:
        return [(b, p) for b, p in sorted(self.ran.items()) if b <= largest]

    def is_affine(self, fit: Fit | None, largest: int) -> bool:
        """R² and the residuals of the larger sizes decide; OOMs near the top are not evidence."""
        if fit is None or fit.bytes_per_sample <= 0 or fit.r2 < _R2_AFFINE:
            return False
        top = [(b, p) for b, p in self.fit_points(largest) if b * 8 >= largest]
        return all(abs(p - fit.predict(b)) <= _RESIDUAL_AFFINE * self.capacity for b, p in top)


def search(
    run_trial: Callable[[int], Trial],
    *,
    capacity_bytes: int,
    start: int | None = None,
    min_size: int = 1,
    max_size: int | None = None,
    dataset_size: int | None = None,
    drop_last: bool = False,
    margin: float = DEFAULT_MARGIN,
    pick: Pick = "max",
    effective: int | None = None,
    optimizer: str | None = None,
    current_batch_size: int | None = None,
    max_trials: int = 12,
    progress: Callable[[Trial, int], None] | None = None,
    device: str = "cpu",
    learn_dataset_size: Callable[[], int | None] | None = None,
) -> BatchSearchResult:
    """Find the largest batch size that fits ``capacity_bytes``, then pick one to recommend.

    ``run_trial(b)`` runs the training code at batch size ``b`` and returns a :class:`Trial`;
    every call is one trial. ``start`` (default 2, moved inside ``min_size``/``max_size`` when
    they exclude it) is the first size tried. ``progress(trial, index)`` is called after each, ``index`` counting
    from 0. Exceptions from ``run_trial`` other than the out-of-memory it reports propagate.
    ``learn_dataset_size()``, when given, is asked after each trial for a data set size the trials
    revealed (a DataLoader built inside the trial code); once known it bounds the search.

    >>> def run(b):  # a simulated device: 100 MiB + 1 MiB per sample, 800.5 MiB in all
    ...     peak = (100 + b) * 2**20
    ...     oom = peak > 800.5 * 2**20
    ...     return Trial(b, None if oom else peak, oom, None, 0.1, 3)
    >>> res = search(run, capacity_bytes=int(800.5 * 2**20))
    >>> res.max_batch_size, res.recommended_batch_size, len(res.trials), res.oom_count
    (700, 660, 5, 0)
    """
    if not callable(run_trial):
        raise BadOptions(f"`run_trial` must be a callable taking a batch size, got {run_trial!r}")
    check_size("capacity_bytes", capacity_bytes)
    check_bounds(min_size=min_size, max_size=max_size, start=start, dataset_size=dataset_size, margin=margin,
                 pick=pick, effective=effective)
    if start is None:  # 2, moved inside the bounds
        start = max(min_size, DEFAULT_START if max_size is None else min(DEFAULT_START, max_size))
    if current_batch_size is not None:
        check_size("current_batch_size", current_batch_size)
    check_size("max_trials", max_trials)

    bounds = [v for v in (max_size, dataset_size) if v is not None]
    upper = min(bounds) if bounds else None
    notes: list[str] = []
    if upper is not None and start > upper:
        notes.append(f"start {start} is larger than the data set ({upper} samples): started at {upper}")
        start = upper
    s = _Search(
        run_trial=run_trial, capacity=capacity_bytes, start=start, min_size=min_size, upper=upper,
        dataset_size=dataset_size, drop_last=drop_last, margin=float(margin),
        max_trials=max_trials, progress=progress, notes=notes, learn_dataset_size=learn_dataset_size,
    )
    s.run()
    lim = _limit(s)
    if lim is None:
        return _no_recommendation(s, pick=pick, device=device)
    if pick == "throughput":
        _throughput_trials(s, lim.keep, lim.largest)
    return _result(s, lim, pick=pick, effective=effective, optimizer=optimizer, current=current_batch_size,
                   device=device)


@dataclass(frozen=True)
class _Limit:
    """What the trials say about the limit: the largest size that ran, the line through the
    peaks (when memory is affine in the batch size) and the largest size that keeps the margin."""

    largest: int
    fit: Fit | None
    affine: bool
    keep: int


def _limit(s: _Search) -> _Limit | None:
    """None when there is nothing to recommend (no size ran, or memory ignores the batch size)."""
    largest = s.largest_run()
    if largest is None or s.stop in ("flat", "empty"):
        return None
    cap = s.capacity
    fit = _weighted_fit(s.fit_points(largest))
    affine = s.is_affine(fit, largest)
    limit = cap * (1 - s.margin)

    # the largest size that keeps the margin, never above the largest that ran
    if affine:
        assert fit is not None
        by_fit = fit.largest_under(limit)
        keep = None if by_fit is None or by_fit < 1 else min(largest, by_fit)
    else:
        keep = _interpolate_under(s.fit_points(largest), limit)
    if keep is not None and keep < s.min_size:
        keep = None
    if keep is None:
        keep = min(largest, s.min_size)
        s.notes.append(
            f"no batch size keeps a {format_percent(s.margin)} margin: even {keep} is predicted at "
            f"{format_bytes(fit.predict(keep) if fit else s.ran.get(keep))} of {format_bytes(cap)}; "
            "it runs, but with less headroom than asked"
        )
    return _Limit(largest, fit, affine, keep)


def _no_recommendation(s: _Search, *, pick: Pick, device: str) -> BatchSearchResult:
    """The result when no size can be recommended, with the reason."""
    cap = s.capacity

    def done(reason: str, fit: Fit | None = None) -> BatchSearchResult:
        return BatchSearchResult(
            trials=tuple(s.trials), max_batch_size=None, recommended_batch_size=None, accumulation_steps=1,
            reason=reason, fit=fit, capacity_bytes=cap, predicted_peak_bytes=None, pick=pick, margin=s.margin,
            dataset_size=s.dataset_size, device=device, notes=tuple(s.notes),
        )

    if s.stop == "flat":
        sizes = sorted(s.ran)
        return done(
            f"the batch size does not change memory: the peak is {format_bytes(s.ran[sizes[-1]])} at every size "
            f"from {sizes[0]} to {sizes[-1]}, so the batch-size variable does not reach the training loop (a "
            "DataLoader built elsewhere with a fixed batch size?); use --loader NAME to rebuild that loader per trial",
            _weighted_fit(s.ran.items()),
        )
    if s.stop == "empty":
        b = max(s.ran)
        return done(
            f"nothing of the trial was on {device}: its peak there was 0 B at batch {b}, so memory cannot size "
            f"the batch. The model and the data the loop uses are elsewhere (built on another device in an "
            "earlier cell?): move them there in the code searched (.to(device), .cuda())"
        )
    if s.stop == "trials":
        return done(f"stopped after {len(s.trials)} trials (max_trials) before any size ran without "
                    "running out of memory")
    return done(
        f"even the smallest size {s.trials[-1].batch_size} ran out of memory on {format_bytes(cap)}: "
        "the model, optimizer state and data already on the device leave no room for a batch"
    )


def _pick(s: _Search, pick: Pick, lim: _Limit) -> tuple[int, str]:
    """The recommended size under the ``pick`` rule, and why."""
    cap, keep, fit = s.capacity, lim.keep, lim.fit
    basis = (f"by the fit ({fit.describe()})" if lim.affine and fit is not None
             else f"by interpolating the measured peaks ({_shape(s, lim.largest)})")
    pct = format_percent(1 - s.margin)

    if pick == "pow2":
        p2 = pow2_floor(keep)
        if p2 >= s.min_size:
            rec = p2
            why = (f"{rec} is the largest power of two within {pct} of {format_bytes(cap)} {basis}"
                   f" (largest size there: {keep})")
        else:
            rec = keep
            why = f"no power of two lies between min_size {s.min_size} and {keep}; {rec} fits {pct} of " \
                  f"{format_bytes(cap)} {basis}"
    elif pick == "throughput":
        rec, why = _pick_throughput(s, keep, lim.largest)
    else:
        rec = keep
        why = f"{rec} is the largest that fits {pct} of {format_bytes(cap)} {basis}"
    return rec, why


def _accumulate(effective: int | None, rec: int, why: str) -> tuple[int, int, int | None, str]:
    """(micro-batch, accumulation steps, effective batch, why) for an ``effective`` batch target."""
    if effective is None:
        return rec, 1, None, why
    micro_max = rec
    rec, steps = accumulation_plan(effective, micro_max)
    eff = rec * steps
    if steps == 1:
        why = f"the effective batch {effective} fits as one batch ({why})"
    else:
        why = f"micro-batch {rec} × {steps} accumulation steps = {eff} for the effective batch {effective} " \
              f"({why})"
    return rec, steps, eff, why


def _reported_fit(s: _Search, lim: _Limit) -> Fit | None:
    """The reported line: over the top piece when memory bends (a hinge), since that piece is what
    sets the peak near the capacity; over every size that ran otherwise."""
    pieces = s.pieces() if s.ran else []
    top = [(b, s.ran[b]) for b in pieces[-1] if b <= lim.largest] if len(pieces) > 1 else []
    return _weighted_fit(top if len(top) >= 2 else s.fit_points(lim.largest))


def _data_notes(s: _Search, largest: int, rec: int, current: int | None, effective: int | None) -> None:
    """Notes on the data set (full-batch training, samples dropped) and on the user's current size."""
    data = s.dataset_size
    if s.stop == "plateau" and s.plateau_confirmed:
        data = largest
    if data is not None and largest >= data and data < _FULL_BATCH_BELOW:
        s.notes.append(
            f"the whole data set ({data} samples) fits in one batch: full-batch training is an option, "
            "one optimizer step per epoch on the exact gradient of the training loss (no minibatch noise); "
            "it usually needs more epochs and its own learning rate"
        )
    if s.drop_last and data is not None and rec <= data:
        dropped = data % rec
        if dropped >= 0.05 * data:
            s.notes.append(
                f"with drop_last=True, batches of {rec} use {data - dropped} of the {data} samples per epoch "
                f"({dropped} dropped)"
            )
    if current is not None and effective is None and rec != current:
        s.notes.append(f"your current batch size is {current}; {rec} is {rec / current:.3g}× that")


def _result(
    s: _Search, lim: _Limit, *, pick: Pick, effective: int | None, optimizer: str | None, current: int | None,
    device: str,
) -> BatchSearchResult:
    """The result from the finished search: no trial runs here."""
    rec, why = _pick(s, pick, lim)
    rec, steps, eff, why = _accumulate(effective, rec, why)
    lr = None
    if effective is not None:
        lr = lr_note(current if current is not None else effective, rec * steps, optimizer)
    elif current is not None:
        lr = lr_note(current, rec, optimizer)

    final_fit = _reported_fit(s, lim)
    if lim.affine and final_fit is not None:
        predicted: int | None = final_fit.predict(rec)
    else:
        predicted = _interpolate_at(s.fit_points(lim.largest), rec)
    why = f"{why}; {_evidence(s, lim.largest, final_fit if lim.affine else None)}"
    if lim.affine and lim.fit is not None and final_fit is not None and final_fit != lim.fit:
        s.notes.append(
            f"two lines: the pick above is by the line over every size that ran ({lim.fit.describe()}); "
            f"`fit` is the line over the sizes past the bend ({final_fit.describe()}), where the batch "
            "sets the peak rather than a flat part such as the optimizer step: it predicts the peaks near the capacity"
        )
    _data_notes(s, lim.largest, rec, current, effective)

    return BatchSearchResult(
        trials=tuple(s.trials),
        max_batch_size=lim.largest,
        recommended_batch_size=rec,
        accumulation_steps=steps,
        reason=why,
        fit=final_fit,
        capacity_bytes=s.capacity,
        predicted_peak_bytes=predicted,
        pick=pick,
        margin=s.margin,
        effective_batch_size=eff,
        lr_note=lr,
        lr_rule=lr_rule_for(optimizer),
        dataset_size=s.dataset_size,
        device=device,
        notes=tuple(s.notes),
    )


def _shape(s: _Search, largest: int) -> str:
    """Why memory is not affine, in words: a flat start and a steeper top (a hinge), or just that."""
    runs = [[b for b in run if b <= largest] for run in s.pieces()]
    runs = [run for run in runs if run]
    if len(runs) < 2 or len(runs[0]) < 2:
        return "memory is not affine in the batch size here"
    flat, top = runs[0], runs[-1]
    low, high = s.ran[flat[0]], s.ran[flat[-1]]
    if s.same(low, high) or high - low < _SHARE * high:
        start = (f"the peak stays near {format_bytes(high)} up to {flat[-1]} (fixed costs, such as the optimizer "
                 "step, set it)")
    else:
        start = f"the peak grows from {format_bytes(low)} at {flat[0]} to {format_bytes(high)} at {flat[-1]}"
    top_fit = _weighted_fit((b, s.ran[b]) for b in top)
    rate = f" by {format_bytes(round(top_fit.bytes_per_sample))}/sample" if top_fit is not None else " faster"
    return f"memory is not affine in the batch size: {start}, then grows{rate} from {top[0]} on"


def _interpolate_under(points: list[tuple[int, int]], limit: float) -> int | None:
    """The largest size under ``limit`` on the broken line through the measured peaks (sorted)."""
    under = [(b, p) for b, p in points if p <= limit]
    if not under:
        return None
    b0, p0 = under[-1]
    above = [(b, p) for b, p in points if b > b0]
    if not above:
        return b0
    b1, p1 = above[0]
    return b0 + math.floor((limit - p0) * (b1 - b0) / (p1 - p0)) if p1 > p0 else b0


def _interpolate_at(points: list[tuple[int, int]], b: int) -> int | None:
    """The peak at ``b`` on the broken line through the measured peaks (sorted); ``None`` outside."""
    value = interpolate(points, b)
    return None if value is None else round(value)


def _evidence(s: _Search, largest: int, fit: Fit | None) -> str:
    """What the trials showed about the limit, as the second half of the reason."""
    ran = f"{largest} ran (peak {format_bytes(s.ran[largest])} of {format_bytes(s.capacity)})"
    stop = s.stop
    if stop == "plateau":
        top = format_bytes(s.ran[max(s.ran)])
        if s.plateau_confirmed:
            return (f"memory stops growing at {largest} (peak {top} from there up to {max(s.ran)}): the batch "
                    f"already holds the whole data set, about {largest} samples")
        return (f"memory stops growing between {largest} and {s.plateau_from} (peak {top} up to {max(s.ran)}): "
                f"the batch already holds the whole data set; {largest} is the largest size known to be below it")
    if stop == "cap" and s.dataset_size is not None and largest == s.dataset_size:
        tail = " (with drop_last=True a larger batch gives no steps)" if s.drop_last else ""
        return f"reached the data set size {largest}: the whole data set fits in one batch{tail}; {ran}"
    if stop == "cap":
        return f"reached max_size {largest} without running out of memory; {ran}"
    if stop == "ceiling":
        return (f"reached {largest}, the largest size the search tries, without running out of memory (memory "
                f"grows by only {format_bytes(round(fit.bytes_per_sample)) if fit else 'a few bytes'} per sample);"
                f" {ran}; set max_size for a bound of your own")
    if stop == "trials":
        return f"stopped after {len(s.trials)} trials (max_trials); {ran}{_failure(s)}"
    if stop == "fit" and fit is not None:
        return f"{ran}, and the fit puts {largest + 1} above the capacity{_failure(s)}"
    if stop == "gain" and fit is not None:
        room = fit.largest_under(s.capacity)
        return f"{ran}; the fit allows at most {room}, less than 1% more{_failure(s)}"
    return f"{ran}{_failure(s)}"


def _failure(s: _Search) -> str:
    parts = []
    if s.oom_hi is not None:
        parts.append(f"{s.oom_hi} ran out of memory")
    if s.empty_hi is not None:
        parts.append(f"{s.empty_hi} made no training steps (larger than the data set with drop_last)")
    return ", " + " and ".join(parts) if parts else ""


def _rates(s: _Search, largest: int) -> dict[int, float]:
    return {b: r for b, r in s.rates.items() if b <= largest and b in s.ran}


def _throughput_trials(s: _Search, keep: int, largest: int) -> None:
    """The search's last trials for pick='throughput': bigger batches stop paying once the device
    is saturated, and the search's own trials are sparse, so up to two extra trials bisect
    (geometrically) the gap below the first size within 5% of the best measured samples/s."""
    if not _rates(s, largest):
        return
    for _ in range(_THROUGHPUT_EXTRA):
        measured = _rates(s, largest)
        best = max(measured.values())
        fast = sorted(b for b, r in measured.items() if b <= keep and r >= (1 - THROUGHPUT_WITHIN) * best)
        top = fast[0] if fast else keep
        slow = [b for b, r in measured.items() if b < top and r < (1 - THROUGHPUT_WITHIN) * best]
        if not slow or not s.budget_left():
            break
        below = max(slow)
        if top / below < _THROUGHPUT_GAP or top - below <= 1:
            break
        mid = min(top - 1, max(below + 1, round(math.sqrt(below * top))))
        if mid in s.ran:
            break
        t = s.trial(mid)
        if t.oom or t.samples_per_second is None:
            break


def _pick_throughput(s: _Search, keep: int, largest: int) -> tuple[int, str]:
    """The smallest size within 5% of the best measured samples/s, at most ``keep``."""
    pct = format_percent(1 - s.margin)
    measured = _rates(s, largest)
    if not measured:
        return keep, (f"{keep} is the largest that fits {pct} of {format_bytes(s.capacity)} (no trial measured "
                      "its throughput, so pick='throughput' fell back to the largest)")
    best_b, best = max(measured.items(), key=lambda kv: (kv[1], -kv[0]))
    fast = sorted(b for b, r in measured.items() if b <= keep and r >= (1 - THROUGHPUT_WITHIN) * best)
    head = f"best measured {best:,.0f} samples/s at {best_b}"
    if fast:
        rec = fast[0]
        return rec, (f"{rec} is the smallest batch within {THROUGHPUT_WITHIN:.0%} of the best measured "
                     f"throughput ({measured[rec]:,.0f} samples/s; {head}) and within {pct} of "
                     f"{format_bytes(s.capacity)}" + _loader_limit(s, rec))
    return keep, (f"{keep} is the largest that fits {pct} of {format_bytes(s.capacity)}, and throughput was "
                  f"still rising there ({head})" + _loader_limit(s, keep))


def _loader_limit(s: _Search, b: int) -> str:
    """When the trials at ``b`` waited for data most of their time, the loader sets the throughput."""
    waits = [t.data_wait_fraction for t in s.trials if t.batch_size == b and t.data_wait_fraction is not None]
    if not waits or max(waits) < DATA_WAIT_THRESHOLD:
        return ""
    return (f"; the loader limits this pick: its steps waited for data {max(waits):.0%} of their time, so a larger "
            "batch will not be faster until the loader is (%%gpumem on the loop gives the loader advice)")

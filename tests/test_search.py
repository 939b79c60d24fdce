"""The batch-size search against simulated devices whose true limit is known exactly."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from gpumagic.batchmath import lr_note
from gpumagic.report import BatchSearchResult, Trial
from gpumagic.search import search

CEILING = 2**24  # the largest size the search tries without max_size or a data-set size

KiB, MiB, GiB = 2**10, 2**20, 2**30
CAP_700 = 100 * MiB + 700 * MiB + MiB // 2  # 100 MiB + 1 MiB/sample: 700 fits, 701 does not


def affine(intercept: int, slope: int) -> Callable[[int], int]:
    return lambda b: intercept + slope * b


@dataclass
class Device:
    """A simulated device: a trial at ``b`` peaks at ``memory(b)`` and runs out of memory above
    ``capacity``. With ``dataset`` the loader holds that many samples: a larger batch is the whole
    data set, or (``drop_last``) no batch at all."""

    capacity: int
    memory: Callable[[int], int]
    dataset: int | None = None
    drop_last: bool = False
    rate: Callable[[int], float] | None = None
    calls: list[int] = field(default_factory=list)

    def __call__(self, b: int) -> Trial:
        self.calls.append(b)
        samples, steps = b, 3
        if self.dataset is not None and b > self.dataset:
            samples, steps = (0, 0) if self.drop_last else (self.dataset, 1)
        peak = self.memory(samples)
        if peak > self.capacity:
            return Trial(b, None, True, None, 0.1, 1)
        rate = self.rate(samples) if self.rate is not None and steps else None
        return Trial(b, peak, False, rate, 0.1, steps)

    def fits(self, b: int) -> bool:
        return self.memory(b) <= self.capacity


def device_700(**kw: Any) -> Device:
    return Device(CAP_700, affine(100 * MiB, MiB), **kw)


def ran_sizes(res: BatchSearchResult) -> set[int]:
    return {t.batch_size for t in res.trials if not t.oom}


def assert_invariants(res: BatchSearchResult, dev: Device) -> None:
    assert [t.batch_size for t in res.trials] == dev.calls
    assert len(set(dev.calls)) == len(dev.calls), "a size was tried twice"
    if res.max_batch_size is not None:
        assert res.max_batch_size in ran_sizes(res)
        assert dev.fits(res.max_batch_size)
    if res.recommended_batch_size is not None:
        assert res.max_batch_size is not None
        assert res.recommended_batch_size <= res.max_batch_size


# -- the main case ------------------------------------------------------------------------------


def test_true_limit_700_is_found_in_five_trials_with_at_most_one_oom():
    dev = device_700()
    res = search(dev, capacity_bytes=CAP_700)
    assert len(res.trials) <= 5
    assert res.oom_count <= 1
    assert res.max_batch_size is not None
    assert 665 <= res.max_batch_size <= 700
    assert_invariants(res, dev)


def test_recommendation_keeps_the_margin_by_the_fit():
    res = search(device_700(), capacity_bytes=CAP_700, margin=0.05)
    assert res.recommended_batch_size is not None
    limit = 0.95 * CAP_700
    assert 100 * MiB + res.recommended_batch_size * MiB <= limit
    assert 100 * MiB + (res.recommended_batch_size + 1) * MiB > limit
    assert res.predicted_peak_bytes == 100 * MiB + res.recommended_batch_size * MiB


def test_fit_is_the_line_through_the_trials():
    res = search(device_700(), capacity_bytes=CAP_700)
    assert res.fit is not None
    assert res.fit.intercept_bytes == pytest.approx(100 * MiB, rel=1e-6)
    assert res.fit.bytes_per_sample == pytest.approx(MiB, rel=1e-6)
    assert res.fit.r2 == pytest.approx(1.0)
    assert res.fit.points == len(ran_sizes(res))


def test_reason_is_a_sentence_with_the_numbers():
    res = search(device_700(), capacity_bytes=CAP_700)
    assert "95% of 800.50 MiB" in res.reason
    assert "100.00 MiB + 1.00 MiB/sample" in res.reason
    assert f"{res.max_batch_size} ran" in res.reason
    assert str(res.recommended_batch_size) in res.reason


@pytest.mark.parametrize("limit", [3, 50, 700, 5000, 100_000])
def test_true_limits_from_start_2_take_few_trials_and_fit_the_peak(limit):
    cap = 100 * MiB + limit * MiB + MiB // 2
    dev = Device(cap, affine(100 * MiB, MiB))
    res = search(dev, capacity_bytes=cap, start=2)
    assert_invariants(res, dev)
    assert len(res.trials) <= 5
    assert res.oom_count <= 1
    assert res.max_batch_size is not None
    assert res.max_batch_size >= 0.95 * limit
    assert res.fit is not None
    peak = dev.memory(res.max_batch_size)
    assert abs(res.fit.predict(res.max_batch_size) - peak) <= 0.03 * peak


def test_invariants_hold_over_a_grid_of_affine_devices():
    grid = itertools.product(
        (0, 10 * MiB, 300 * MiB, GiB),  # intercept
        (100, KiB, 64 * KiB, MiB, 37 * MiB),  # bytes per sample
        (512 * MiB, 2 * GiB, 8 * GiB, 80 * GiB),  # capacity
    )
    for intercept, slope, cap in grid:
        dev = Device(cap, affine(intercept, slope))
        res = search(dev, capacity_bytes=cap)
        case = (intercept, slope, cap, [(t.batch_size, t.oom) for t in res.trials])
        assert_invariants(res, dev)
        # A batch under 5% of the peak up to ~10^5 samples looks just like the flat start of a
        # hinge whose knee lies that far out: there the search grows the batch at most 8× a trial.
        assert len(res.trials) <= (9 if slope * 100_000 < 0.05 * intercept else 8), case
        assert res.oom_count <= 2, case
        true_max = min((cap - intercept) // slope, CEILING)
        if true_max >= 1:
            assert res.max_batch_size is not None, case
            assert not any(t.oom for t in res.trials if t.batch_size == res.max_batch_size), case
            assert res.max_batch_size >= 0.95 * true_max, case
        else:
            assert res.max_batch_size is None, case


def test_fixed_costs_at_small_sizes_do_not_mislead_the_fit():
    # below 20 samples a fixed 20 MiB workspace dominates: the two first points look flat
    dev = Device(CAP_700, lambda b: 100 * MiB + max(20 * MiB, b * MiB))
    res = search(dev, capacity_bytes=CAP_700)
    assert_invariants(res, dev)
    assert res.max_batch_size is not None
    assert res.max_batch_size >= 665
    assert res.oom_count <= 1


# -- memory that is not a line ----------------------------------------------------------------


def test_non_affine_memory_falls_back_and_reports_only_sizes_that_ran():
    # a second 200 MiB buffer appears above 300 samples: true limit 500
    dev = Device(CAP_700, lambda b: 100 * MiB + b * MiB + (200 * MiB if b > 300 else 0))
    res = search(dev, capacity_bytes=CAP_700)
    assert_invariants(res, dev)
    assert res.max_batch_size is not None
    assert 400 <= res.max_batch_size <= 500
    assert "not affine" in res.reason
    assert res.recommended_batch_size is not None
    assert dev.memory(res.recommended_batch_size) <= 0.95 * CAP_700
    assert res.predicted_peak_bytes == pytest.approx(dev.memory(res.recommended_batch_size), rel=0.01)


# -- hinges: a flat start, then steeper ----------------------------------------------------------
# With Adam the optimizer step's temporaries set the peak at small batches (flat, up to the input
# batch itself), the activations past a knee. Numbers from an MLP 256→1024→1024→1024→10 with Adam
# on a 64 MiB CPU budget, data set 16384 samples: 46.47 MB flat, then about 34.5 MB + 16.4 KB/sample.

HINGE_CAP = 67_108_864
HINGE_DATA = 16_384


def hinge(flat: float, intercept: float, slope: float, floor_slope: float = 0.0) -> Callable[[int], int]:
    return lambda b: round(max(flat + floor_slope * (b - 2), intercept + slope * b))


def adam_mlp(floor_slope: float = 0.0) -> Callable[[int], int]:
    return hinge(46.47e6, 34.5e6, 16.4e3, floor_slope)


def true_max(dev: Device, upper: int) -> int:
    """The largest size that fits, for memory that grows with the batch (bisection)."""
    lo, hi = 0, upper + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if dev.fits(mid) else (lo, mid)
    return lo


def jitter(memory: Callable[[int], int], seed: int, amplitude: int = 4 * KiB) -> Callable[[int], int]:
    """Peaks that jitter by a few KiB, the same each time a size is asked (Device.fits agrees)."""
    return lambda b: memory(b) + random.Random(seed * 1_000_003 + b).randint(-amplitude, amplitude)


# the peaks measured at those sizes (bytes); between them the curve is piecewise linear, with the
# knee near 680 and a second, steeper bend near 1250 (two activation terms taking over in turn)
MLP_ADAM_MEASURED = {
    2: 46_471_372, 3: 46_472_404, 192: 46_667_452, 640: 47_129_788, 700: 47_400_604, 1024: 51_716_284,
    1163: 53_567_764, 1300: 55_466_336, 1536: 59_576_512, 1648: 61_527_104, 1800: 64_174_336,
    1947: 66_734_488, 1968: 67_100_224, 2048: 68_493_504, 2134: 69_991_280,
}


def measured_mlp(b: int) -> int:
    """Linear between the measured sizes, and beyond the last two."""
    pairs = list(itertools.pairwise(sorted(MLP_ADAM_MEASURED.items())))
    (b0, p0), (b1, p1) = next((pair for pair in pairs if b <= pair[1][0]), pairs[-1])
    return round(p0 + (p1 - p0) * (b - b0) / (b1 - b0))


@pytest.mark.parametrize("floor_slope", [0.0, 1032.0], ids=["flat", "input-batch-slope"])
def test_hinge_from_adam_on_an_mlp_takes_seven_trials_without_leaping_to_the_dataset(floor_slope):
    dev = Device(HINGE_CAP, adam_mlp(floor_slope), dataset=HINGE_DATA)
    res = search(dev, capacity_bytes=HINGE_CAP, dataset_size=HINGE_DATA)
    assert_invariants(res, dev)
    best = true_max(dev, HINGE_DATA)
    assert best == 1988
    assert res.max_batch_size is not None
    assert res.max_batch_size >= 0.98 * best
    assert len(res.trials) <= 7
    assert res.oom_count <= 1
    assert max(dev.calls) <= 2 * best  # no leap on a slope measured where memory was flat
    # the flat start is a hinge, not a batch size that misses the loop
    assert "does not change memory" not in res.reason
    assert "the peak stays near" in res.reason
    assert "/sample from" in res.reason


def test_measured_mlp_curve_with_two_bends_takes_seven_trials_without_oom():
    dev = Device(HINGE_CAP, measured_mlp, dataset=HINGE_DATA)
    res = search(dev, capacity_bytes=HINGE_CAP, dataset_size=HINGE_DATA)
    assert_invariants(res, dev)
    assert true_max(dev, HINGE_DATA) == 1968
    assert res.max_batch_size is not None
    assert res.max_batch_size >= 0.98 * 1968
    assert len(res.trials) <= 7
    assert res.oom_count == 0
    assert res.recommended_batch_size is not None
    assert dev.memory(res.recommended_batch_size) <= 0.95 * HINGE_CAP


@pytest.mark.parametrize("floor_slope", [0.0, 1032.0], ids=["flat", "input-batch-slope"])
def test_hinge_with_the_knee_near_the_capacity_bisects_with_one_oom(floor_slope):
    # capacity 10% above the flat part: the knee is near 730-780 and only about 1010 fit, so the
    # bounded step past the flat part fails once; the failure is split geometrically
    cap = int(1.1 * 46.47e6)
    dev = Device(cap, adam_mlp(floor_slope), dataset=HINGE_DATA)
    res = search(dev, capacity_bytes=cap, dataset_size=HINGE_DATA)
    assert_invariants(res, dev)
    best = true_max(dev, HINGE_DATA)
    assert 1000 <= best <= 1020
    assert res.max_batch_size is not None
    assert res.max_batch_size >= 0.98 * best
    assert len(res.trials) <= 9
    assert res.oom_count <= 1


@pytest.mark.parametrize("seed", range(6))
def test_hinge_with_peaks_jittering_by_a_few_kib(seed):
    dev = Device(HINGE_CAP, jitter(adam_mlp(1032.0), seed), dataset=HINGE_DATA)
    res = search(dev, capacity_bytes=HINGE_CAP, dataset_size=HINGE_DATA)
    assert_invariants(res, dev)
    best = true_max(Device(HINGE_CAP, adam_mlp(1032.0)), HINGE_DATA)
    assert res.max_batch_size is not None
    assert res.max_batch_size >= 0.98 * best
    assert len(res.trials) <= 7
    assert res.oom_count <= 1


def test_affine_memory_with_jitter_keeps_its_trial_count():
    dev = Device(CAP_700, jitter(affine(100 * MiB, MiB), seed=1))
    res = search(dev, capacity_bytes=CAP_700)
    assert_invariants(res, dev)
    assert len(res.trials) <= 5
    assert res.oom_count <= 1
    assert res.max_batch_size is not None
    assert res.max_batch_size >= 665


def test_flat_memory_stops_and_suggests_the_loader_option():
    dev = Device(CAP_700, lambda b: 300 * MiB)
    res = search(dev, capacity_bytes=CAP_700)
    assert "does not change memory" in res.reason
    assert "--loader NAME" in res.reason
    assert res.recommended_batch_size is None
    assert res.max_batch_size is None
    assert len(res.trials) <= 4
    assert res.oom_count == 0


# -- the data set -------------------------------------------------------------------------------


def test_dataset_smaller_than_the_limit_stops_at_the_dataset_size():
    dev = Device(CAP_700, affine(100 * MiB, MiB), dataset=300)
    res = search(dev, capacity_bytes=CAP_700, dataset_size=300)
    assert max(dev.calls) == 300
    assert res.max_batch_size == 300
    assert res.recommended_batch_size == 300
    assert "reached the data set size 300: the whole data set fits in one batch" in res.reason


def test_small_dataset_that_fits_whole_gets_the_full_batch_note():
    res = search(Device(CAP_700, affine(100 * MiB, MiB), dataset=300), capacity_bytes=CAP_700, dataset_size=300)
    assert any("full-batch training is an option" in n and "one optimizer step per epoch" in n for n in res.notes)


def test_large_dataset_that_fits_whole_gets_no_full_batch_note():
    cap = 100 * MiB + 10_000 * MiB
    res = search(Device(cap, affine(100 * MiB, MiB), dataset=4096), capacity_bytes=cap, dataset_size=4096)
    assert res.max_batch_size == 4096
    assert "reached the data set size 4096" in res.reason
    assert not any("full-batch" in n for n in res.notes)


def test_drop_last_never_tries_a_batch_larger_than_the_dataset():
    dev = Device(CAP_700, affine(100 * MiB, MiB), dataset=300, drop_last=True)
    res = search(dev, capacity_bytes=CAP_700, dataset_size=300, drop_last=True)
    assert max(dev.calls) <= 300
    assert all(t.steps > 0 for t in res.trials)
    assert res.max_batch_size == 300
    assert "drop_last=True" in res.reason


def test_drop_last_notes_the_samples_each_epoch_drops():
    cap = 100 * MiB + 400 * MiB + MiB // 2
    dev = Device(cap, affine(100 * MiB, MiB), dataset=1000, drop_last=True)
    res = search(dev, capacity_bytes=cap, dataset_size=1000, drop_last=True)
    rec = res.recommended_batch_size
    assert rec is not None
    assert any(f"use {1000 - 1000 % rec} of the 1000 samples" in n for n in res.notes)


def test_trials_without_steps_bound_the_search_when_the_dataset_size_is_unknown():
    dev = Device(CAP_700, affine(100 * MiB, MiB), dataset=100, drop_last=True)
    res = search(dev, capacity_bytes=CAP_700)
    assert_invariants(res, dev)
    assert res.max_batch_size is not None
    assert res.max_batch_size <= 100
    assert res.max_batch_size >= 98
    assert next(t for t in res.trials if t.batch_size == res.max_batch_size).steps > 0
    assert "made no training steps" in res.reason


def test_memory_that_stops_growing_reveals_the_whole_dataset_in_one_batch():
    dev = Device(CAP_700, affine(100 * MiB, MiB), dataset=100)
    res = search(dev, capacity_bytes=CAP_700)
    assert_invariants(res, dev)
    assert res.max_batch_size == 100
    assert res.recommended_batch_size == 100
    assert "the batch already holds the whole data set" in res.reason
    assert any("full-batch" in n for n in res.notes)


# -- bounds -------------------------------------------------------------------------------------


def test_max_size_is_never_exceeded():
    dev = device_700()
    res = search(dev, capacity_bytes=CAP_700, max_size=300)
    assert max(dev.calls) <= 300
    assert res.max_batch_size == 300
    assert "reached max_size 300" in res.reason


def test_min_size_is_never_undercut():
    cap = 1000 * MiB + 3 * MiB + MiB // 2  # only 3 samples fit
    dev = Device(cap, affine(1000 * MiB, MiB))
    res = search(dev, capacity_bytes=cap, start=16, min_size=8)
    assert min(dev.calls) >= 8
    assert res.max_batch_size is None
    assert "even the smallest size 8 ran out of memory" in res.reason


def test_min_size_bounds_every_trial_of_a_search_that_succeeds():
    dev = device_700()
    res = search(dev, capacity_bytes=CAP_700, start=8, min_size=8)
    assert min(dev.calls) >= 8
    assert res.max_batch_size is not None
    assert res.max_batch_size >= 665


def test_start_too_large_shrinks_until_something_runs():
    dev = device_700()
    res = search(dev, capacity_bytes=CAP_700, start=4096)
    assert_invariants(res, dev)
    assert res.max_batch_size is not None
    assert res.max_batch_size >= 665
    assert len(res.trials) <= 7


def test_memory_that_barely_grows_stops_at_the_ceiling_and_says_so():
    cap = 80 * GiB
    dev = Device(cap, affine(GiB, 100))
    res = search(dev, capacity_bytes=cap)
    assert res.max_batch_size == CEILING
    assert "the largest size the search tries" in res.reason
    assert "set max_size" in res.reason
    assert max(dev.calls) == CEILING


def test_max_trials_bounds_the_search():
    dev = device_700()
    res = search(dev, capacity_bytes=CAP_700, max_trials=3)
    assert len(res.trials) == 3
    assert_invariants(res, dev)
    assert "max_trials" in res.reason


# -- picks --------------------------------------------------------------------------------------


def test_throughput_pick_takes_the_smallest_batch_within_5_percent_of_the_best():
    # throughput grows until 256 samples, then the device is saturated
    dev = device_700(rate=lambda b: 40.0 * min(b, 256))
    res = search(dev, capacity_bytes=CAP_700, pick="throughput")
    assert_invariants(res, dev)
    rec = res.recommended_batch_size
    assert rec is not None
    rates = {t.batch_size: t.samples_per_second for t in res.trials if t.samples_per_second}
    best = max(rates.values())
    assert rates[rec] >= 0.95 * best
    assert all(r < 0.95 * best for b, r in rates.items() if b < rec)
    assert 243 <= rec <= 300  # bigger is not faster: well below the 665 that fits
    assert len(res.trials) <= len(search(device_700(), capacity_bytes=CAP_700).trials) + 2


def test_pow2_pick_is_the_largest_power_of_two_within_the_margin():
    res = search(device_700(), capacity_bytes=CAP_700, pick="pow2")
    assert res.recommended_batch_size == 512
    assert "power of two" in res.reason


def test_effective_batch_with_sgd_accumulates_and_scales_the_rate_linearly():
    res = search(device_700(), capacity_bytes=CAP_700, effective=1024, optimizer="SGD", current_batch_size=256)
    assert (res.recommended_batch_size, res.accumulation_steps, res.effective_batch_size) == (512, 2, 1024)
    assert res.lr_note is not None
    assert "multiply the learning rate by 4" in res.lr_note
    assert "linear" in res.lr_note


def test_effective_batch_with_adam_scales_the_rate_by_the_square_root():
    res = search(device_700(), capacity_bytes=CAP_700, effective=1024, optimizer="Adam", current_batch_size=256)
    assert res.lr_note is not None
    assert "multiply the learning rate by 2 " in res.lr_note
    assert "square-root" in res.lr_note


def test_current_batch_size_alone_gives_the_learning_rate_note_for_the_recommendation():
    res = search(device_700(), capacity_bytes=CAP_700, optimizer="AdamW", current_batch_size=165)
    assert res.recommended_batch_size == 660
    assert res.accumulation_steps == 1
    assert res.effective_batch_size is None
    assert res.lr_note == lr_note(165, 660, "AdamW")
    assert "multiply the learning rate by 2 " in res.lr_note


def test_effective_batch_that_fits_needs_no_accumulation_and_keeps_the_rate():
    res = search(device_700(), capacity_bytes=CAP_700, effective=500, optimizer="SGD")
    assert (res.recommended_batch_size, res.accumulation_steps, res.effective_batch_size) == (500, 1, 500)
    assert res.lr_note == "keep the learning rate: the effective batch stays 500"


def test_effective_batch_not_divisible_pads_as_little_as_possible():
    res = search(device_700(), capacity_bytes=CAP_700, effective=1001)
    k = res.accumulation_steps
    assert k == math.ceil(1001 / 660)
    assert res.effective_batch_size == res.recommended_batch_size * k
    assert 1001 <= res.effective_batch_size < 1001 + k


# -- arguments and callbacks --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pick": "fast"}, "pick must be one of 'max', 'throughput', 'pow2', got 'fast'"),
        ({"margin": 0.7}, "margin must be in [0, 0.5), got 0.7"),
        ({"margin": -0.1}, "margin must be in [0, 0.5), got -0.1"),
        ({"start": 2, "min_size": 4}, "start must be >= min_size (4), got 2"),
        ({"start": 16, "max_size": 8}, "start must be <= max_size (8), got 16"),
        ({"min_size": 8, "max_size": 4, "start": 8}, "min_size (8) is larger than max_size (4)"),
        ({"min_size": 64, "start": 64, "dataset_size": 50}, "min_size must be <= dataset_size (50), got 64"),
        ({"start": 0}, "start must be >= 1, got 0"),
        ({"capacity_bytes": 0}, "capacity_bytes must be >= 1, got 0"),
        ({"capacity_bytes": "8GiB"}, "capacity_bytes must be an int >= 1, got '8GiB'"),
        ({"max_trials": 0}, "max_trials must be >= 1, got 0"),
        ({"effective": 0}, "effective must be >= 1, got 0"),
        ({"dataset_size": 0}, "dataset_size must be >= 1, got 0"),
        ({"current_batch_size": -3}, "current_batch_size must be >= 1, got -3"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_the_value(kwargs, message):
    dev = device_700()
    args = {"capacity_bytes": CAP_700, **kwargs}
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        search(dev, **args)
    assert dev.calls == []


def test_progress_is_called_once_per_trial_with_its_index():
    seen: list[tuple[Trial, int]] = []
    res = search(device_700(rate=lambda b: 10.0 * min(b, 256)), capacity_bytes=CAP_700, pick="throughput",
                 progress=lambda t, i: seen.append((t, i)))
    assert [t for t, _ in seen] == list(res.trials)
    assert [i for _, i in seen] == list(range(len(res.trials)))


def test_errors_from_the_trial_propagate():
    def broken(b: int) -> Trial:
        if b > 2:
            raise RuntimeError("shape mismatch in the user's code")
        return Trial(b, 100 * MiB, False, None, 0.1, 3)

    with pytest.raises(RuntimeError, match="shape mismatch"):
        search(broken, capacity_bytes=CAP_700)


def test_keyboard_interrupt_propagates():
    def interrupted(b: int) -> Trial:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        search(interrupted, capacity_bytes=CAP_700)


def test_a_trial_that_ran_without_a_peak_is_rejected():
    with pytest.raises(ValueError, match=r"run_trial\(2\) returned a Trial that ran without peak_bytes"):
        search(lambda b: Trial(b, None, False, None, 0.1, 3), capacity_bytes=CAP_700)


def test_a_data_set_size_learned_during_the_trials_bounds_the_search():
    n = 4096
    learned: list[int] = []

    def run(b: int) -> Trial:
        learned.append(n)  # as the runner does once a DataLoader's data set was seen
        return Trial(b, (100 + min(b, n)) * 2**10, False, None, 0.01, 1)

    res = search(run, capacity_bytes=2**40, learn_dataset_size=lambda: learned[-1] if learned else None)
    assert res.max_batch_size == n
    assert all(t.batch_size <= n for t in res.trials)


def test_when_the_reported_fit_differs_from_the_picks_line_a_note_says_why():
    # the demo's MLP with Adam on 16 MiB: flat at small sizes, affine past a bend near 200
    dev = Device(16 * MiB, hinge(5.92 * MiB, 5.11 * MiB, 4.26 * KiB), dataset=16384)
    res = search(dev, capacity_bytes=16 * MiB, dataset_size=16384)
    assert res.fit is not None
    assert f"R² {res.fit.r2:.4f}" not in res.reason  # the pick's line is not `fit`
    note = next(n for n in res.notes if n.startswith("two lines:"))
    assert "past the bend" in note
    assert "4.26 KiB/sample" in note

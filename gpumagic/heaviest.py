"""Heaviest batches: how big a DataLoader's samples are, and trials on the heaviest of them.

With variable-length data (text, audio, detection boxes) memory follows the largest samples in
a batch, and a few trial steps on shuffled batches rarely draw them. So a sample's size is
measured once, cheaply (the elements of its tensors, after the loader's ``collate_fn`` when
that is what pads), and every trial step draws the ``b`` heaviest samples: a size that fits
there fits every batch of an epoch. Then the distribution says what a long tail costs, and a
trial on the lightest 99% measures what truncating or bucketing it would gain.

When gpumagic cannot choose the samples (the loader is built inside the cell, or an
``IterableDataset``), :func:`variable_inputs` fits peak memory against the input size each step
drew and predicts the largest input it can learn of.

Pure: torch only, no shell; the trials run through callables given by :mod:`gpumagic.batch`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gpumagic.report import SampleSizes, StepRecord, Trial, VariableInputs
from gpumagic.tracking import input_elements
from gpumagic.units import format_bytes

__all__ = [
    "MEASURE_ALL",
    "VARIES",
    "SizeTable",
    "batch_elements",
    "measure",
    "sample_sizes",
    "tail_advice",
    "variable_inputs",
]

MEASURE_ALL = 100_000
"""Data sets up to this size are measured whole; larger ones on a random sample of _SAMPLE."""
_SAMPLE = 10_000
VARIES = 0.10
"""Per-step inputs varying by more than this (largest over smallest, minus one) are 'variable'."""
_ITERABLE_MARGIN = 1.25
"""Without a data set to search, the largest input seen is assumed this much larger in an epoch."""
_TAIL = 0.99
_TAIL_TRIALS = 3


def _count(obj: Any, depth: int = 0) -> int:
    """Elements a sample would put on the device: tensor and array elements, numbers as one each."""
    if isinstance(obj, torch.Tensor):
        return int(obj.numel())
    if isinstance(obj, bool | int | float):
        return 1
    if isinstance(obj, str | bytes) or depth > 6:
        return 0
    size = getattr(obj, "size", None)
    if isinstance(size, int) and hasattr(obj, "shape"):  # a NumPy array
        return size
    if isinstance(obj, dict):
        return sum(_count(v, depth + 1) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_count(v, depth + 1) for v in obj)
    return 0


def _default_collate(fn: Any) -> bool:
    from torch.utils.data import default_collate

    return fn is default_collate or getattr(fn, "__name__", "") == "default_collate"


@dataclass
class SizeTable:
    """Measured sample sizes of one data set: ``order`` holds dataset indices, heaviest first."""

    order: list[int]
    sizes: dict[int, float]
    total: int
    measure: str
    seconds: float

    @property
    def measured(self) -> int:
        return len(self.order)

    def sorted_sizes(self) -> list[float]:
        return sorted(self.sizes[i] for i in self.order)

    def quantile(self, q: float) -> float:
        values = self.sorted_sizes()
        return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]

    def heaviest(self, b: int, at_most: float | None = None) -> list[int]:
        """The ``b`` heaviest indices (of those no larger than ``at_most``), fewer if there are fewer."""
        if at_most is None:
            return self.order[:b]
        return [i for i in self.order if self.sizes[i] <= at_most][:b]

    def sampler(self, b: int, repeats: int, at_most: float | None = None) -> list[int]:
        """Indices for a loader copy: the heaviest batch of ``b``, once per step of a trial."""
        return self.heaviest(b, at_most) * max(1, repeats)


def _candidate_indices(loader: Any, n: int) -> tuple[list[int], str]:
    """The indices an epoch can draw: the sampler's own set when it restricts the data set."""
    from torch.utils.data import RandomSampler, SequentialSampler, SubsetRandomSampler

    sampler = loader.sampler
    if type(sampler) in (RandomSampler, SequentialSampler):
        return list(range(n)), ""
    if isinstance(sampler, SubsetRandomSampler):
        return sorted({int(i) for i in sampler.indices}), f" (the {type(sampler).__name__}'s indices)"
    try:
        seen = {int(i) for i in sampler}
    except (TypeError, ValueError):
        return list(range(n)), ""
    return sorted(seen), f" (the indices {type(sampler).__name__} draws)"


def measure(loader: Any, size_fn: Any = None, *, seed: int = 0) -> SizeTable | str:
    """Sample sizes of a map-style DataLoader's data set, or why there are none (a sentence).

    ``size_fn``: a sequence of sizes per dataset index (a length column), or a function of the
    index; default: the elements of each sample's tensors, after ``collate_fn`` unless that is
    torch's default. Up to :data:`MEASURE_ALL` samples are measured all; beyond, a random sample.

    >>> table = measure(DataLoader(ds, batch_size=8, collate_fn=pad))   # doctest: +SKIP
    >>> table.heaviest(4)                                               # doctest: +SKIP
    """
    from torch.utils.data import IterableDataset

    ds = loader.dataset
    if isinstance(ds, IterableDataset):
        return (f"the loader's data set is an IterableDataset ({type(ds).__name__}): it has no indices, so "
                "gpumagic cannot draw its heaviest samples")
    try:
        n = len(ds)
    except TypeError:
        return f"the loader's data set ({type(ds).__name__}) has no len(), so its samples cannot be indexed"
    if n == 0:
        return "the loader's data set is empty"
    t0 = time.perf_counter()
    candidates, restricted = _candidate_indices(loader, n)
    sample_note = ""
    if len(candidates) > MEASURE_ALL:
        candidates = random.Random(seed).sample(candidates, _SAMPLE)
        sample_note = f" of a random {_SAMPLE:,}"
    sizes: dict[int, float] = {}
    if size_fn is not None and not callable(size_fn):
        try:
            column = list(size_fn)
        except TypeError:
            raise ValueError(f"size_fn must be a sequence of sizes or a function of the index, "
                             f"got {type(size_fn).__name__}") from None
        if len(column) != n:
            raise ValueError(f"size_fn has {len(column)} sizes for a data set of {n} samples")
        what = "the given sizes"
        for i in candidates:
            sizes[i] = float(column[i])
    elif size_fn is not None:
        what = "the given size function"
        for i in candidates:
            sizes[i] = float(size_fn(i))
    else:
        collate = loader.collate_fn
        if collate is None or _default_collate(collate):
            what = "elements of each sample's tensors"
            for i in candidates:
                sizes[i] = float(_count(ds[i]))
        else:
            what = f"elements of each sample's tensors after the loader's collate_fn ({_name(collate)})"
            for i in candidates:
                sizes[i] = float(_count(collate([ds[i]])))
    order = sorted(candidates, key=lambda i: -sizes[i])
    return SizeTable(order, sizes, n, what + sample_note + restricted, time.perf_counter() - t0)


def _name(fn: Any) -> str:
    return str(getattr(fn, "__name__", type(fn).__name__))


def sample_sizes(loader: Any) -> list[float]:
    """The size of every sample of a map-style loader's data set, by dataset index (for a
    length-grouped sampler). Measures them all, whatever the data set's length.

    >>> lengths = sample_sizes(train_loader)   # doctest: +SKIP
    """
    from torch.utils.data import IterableDataset

    ds = loader.dataset
    if isinstance(ds, IterableDataset):
        raise ValueError("an IterableDataset has no indices: there are no per-sample sizes to list")
    collate = loader.collate_fn
    if collate is None or _default_collate(collate):
        return [float(_count(ds[i])) for i in range(len(ds))]
    return [float(_count(collate([ds[i]]))) for i in range(len(ds))]


def batch_elements(dataset: Any, collate: Any, indices: Sequence[int]) -> int | None:
    """Elements of the batch ``collate`` makes of these samples (padding included)."""
    if not indices:
        return None
    batch = (collate or _torch_default())([dataset[i] for i in indices])
    return input_elements(batch)


def _torch_default() -> Callable[[Any], Any]:
    from torch.utils.data import default_collate

    return default_collate


# ---------------------------------------------------------------------------------------------
# the long tail: a trial on the lightest 99%, and what to do


def tail_advice(
    table: SizeTable,
    *,
    heaviest_batch: int,
    intercept: float,
    per_sample: float,
    capacity: int,
    margin: float,
    run_below: Callable[[int, float], Trial],
    loader_name: str = "train_loader",
) -> SampleSizes:
    """Describe the sizes; when the tail is long, measure batches of the lightest 99% (up to
    three trials through ``run_below(b, at_most)``) and rank truncation and bucketing."""
    largest = table.quantile(1.0)
    median = table.quantile(0.5)
    p99 = table.quantile(_TAIL)
    limit = capacity * (1 - margin)
    base = dict(measure=table.measure, measured=table.measured, total=table.total, seconds=table.seconds,
                largest=largest, median=median, p99=p99, heaviest_batch_size=heaviest_batch or None,
                per_sample_bytes=per_sample)
    if largest <= 0 or p99 >= 0.9 * largest or per_sample <= 0 or limit <= intercept or heaviest_batch < 1:
        return SampleSizes(**base)  # type: ignore[arg-type]
    eligible = sum(1 for i in table.order if table.sizes[i] <= p99)
    # first guess: memory per sample in proportion to its size
    slope = per_sample * p99 / largest
    best: tuple[int, int] | None = None  # (size, peak) that ran under the limit
    failed: int | None = None
    guess = min(eligible, math.floor((limit - intercept) / slope))
    for _ in range(_TAIL_TRIALS):
        if guess <= heaviest_batch or (best is not None and guess <= best[0]) or (failed and guess >= failed):
            break
        t = run_below(guess, p99)
        if t.oom or t.peak_bytes is None:
            failed = guess
            low = best[0] if best else heaviest_batch
            guess = (low + guess) // 2
            continue
        if t.peak_bytes <= limit:
            best = (guess, t.peak_bytes)
        else:
            failed = guess
        slope = max(1.0, (t.peak_bytes - intercept) / guess)
        nxt = min(eligible, math.floor((limit - intercept) / slope))
        if failed is not None and nxt >= failed:
            nxt = failed - 1
        if abs(nxt - guess) <= max(1, 0.02 * guess) and t.peak_bytes <= limit:
            break
        guess = nxt
    if best is None:
        return SampleSizes(**base)  # type: ignore[arg-type]
    b99, peak99 = best
    per99 = (peak99 - intercept) / b99
    # per-sample cost a + c·size through the two measured points
    c = (per_sample - per99) / (largest - p99)
    a = per_sample - c * largest
    if a < 0 or c <= 0:
        a, c = 0.0, per_sample / largest
    room = limit - intercept
    advice = _advice(table, heaviest_batch, b99, peak99, p99, largest, a, c, room, capacity, loader_name)
    return SampleSizes(**base, p99_batch_size=b99, advice=advice)  # type: ignore[arg-type]


def _advice(
    table: SizeTable, rec: int, b99: int, peak99: int, p99: float, largest: float, a: float, c: float,
    room: float, capacity: int, name: str,
) -> tuple[str, ...]:
    n_long = sum(1 for i in table.order if table.sizes[i] > p99)
    share = n_long / max(1, table.measured)
    gain = b99 / max(1, rec)
    p = f"{p99:,.0f}" if float(p99).is_integer() else f"{p99:,.3g}"
    lengths = (f"lengths = sample_sizes({name})   # from gpumagic.heaviest import sample_sizes"
               if "given" not in table.measure else "lengths = ...   # the sizes you gave --size-fn, per index")
    snippet = (
        "import random\n"
        f"def length_batches(lengths, per_sample={a:.6g}, per_element={c:.6g}, room={room:.6g}, seed=0):\n"
        "    # sorted by size; a batch grows while k * (per_sample + per_element * longest) <= room bytes\n"
        "    order = sorted(range(len(lengths)), key=lengths.__getitem__)\n"
        "    batches, batch = [], []\n"
        "    for i in order:\n"
        "        if batch and (len(batch) + 1) * (per_sample + per_element * lengths[i]) > room:\n"
        "            batches.append(batch)\n"
        "            batch = []\n"
        "        batch.append(i)\n"
        "    batches.append(batch)\n"
        "    random.Random(seed).shuffle(batches)  # a new seed per epoch reshuffles\n"
        "    return batches\n"
        f"{lengths}\n"
        f"{name} = DataLoader({name}.dataset, batch_sampler=length_batches(lengths),\n"
        f"{' ' * len(name)}              collate_fn={name}.collate_fn)"
    )
    bucket = (
        f"bucket by length with a memory budget per batch (a token budget that also counts each sample's "
        f"fixed cost): batches of samples <= {p} hold {b99} or more, the longest ones {rec}; every batch stays "
        f"within {format_bytes(round(room))} over the fixed memory (measured per sample: "
        f"{format_bytes(round(a))} + {format_bytes(round(c))} per element):\n{snippet}"
    )
    truncate = (
        f"Truncate the longest {share:.1%} of samples ({n_long:,}) to {p}: then batches of {b99} fit "
        f"(a batch of the heaviest samples up to {p} ran at peak {format_bytes(peak99)} of {format_bytes(capacity)})"
    )
    truncate = truncate[0].upper() + truncate[1:]
    keep = f"Or keep batches of {rec}: the size that holds for the longest samples ({largest:,.0f})"
    if gain > 2:
        return (f"Length bucketing changes the answer {gain:.1f}x ({rec} → {b99} samples per batch for 99% of "
                f"the samples): " + bucket, truncate, keep)
    return (truncate, "Or " + bucket, keep)


# ---------------------------------------------------------------------------------------------
# inputs that varied between steps, when gpumagic could not choose them


@dataclass
class StepInput:
    batch_size: int
    step: int
    elements: int
    peak_bytes: int


def variable_inputs(
    steps: Sequence[StepInput],
    *,
    capacity: int,
    margin: float,
    dataset: Any = None,
    collate: Any = None,
    recommended: int | None = None,
) -> VariableInputs | None:
    """Fit peak against per-step input size when the inputs of a trial's steps varied by more than
    10%; predict the largest input: the heaviest batch of ``dataset`` when it can be indexed, else
    the largest seen with a 25% margin; return ``None`` when inputs did not vary."""
    by_trial: dict[int, list[StepInput]] = {}
    for s in steps:
        by_trial.setdefault(s.batch_size, []).append(s)
    varied = any(len(v) >= 2 and max(x.elements for x in v) > (1 + VARIES) * min(x.elements for x in v)
                 for v in by_trial.values())
    if not varied:
        return None
    # the first step of a trial lacks optimizer state: fit on the later ones where there are some
    points = [(s.elements, s.peak_bytes) for v in by_trial.values() for s in (v[1:] if len(v) > 1 else v)]
    if len({e for e, _ in points}) < 2:
        return None
    n = len(points)
    me = sum(e for e, _ in points) / n
    mp = sum(p for _, p in points) / n
    see = sum((e - me) ** 2 for e, _ in points)
    slope = sum((e - me) * (p - mp) for e, p in points) / see
    # the line must cover every measured step: lift it to the highest residual
    intercept = max(p - slope * e for e, p in points)
    smallest = min(s.elements for s in steps)
    largest = max(s.elements for s in steps)
    limit = capacity * (1 - margin)
    if slope <= 0:
        return VariableInputs(smallest, largest, intercept, slope, None, "no growth with the input", None, None)

    def peak_at(elements: float) -> int:
        return round(intercept + slope * elements)

    table = None
    if dataset is not None:
        from torch.utils.data import IterableDataset

        if not isinstance(dataset, IterableDataset):
            loader_like = _LoaderLike(dataset, collate)
            got = measure(loader_like)
            table = got if isinstance(got, SizeTable) else None
    b_ref = recommended or max(by_trial)
    if table is not None:
        def worst(b: int) -> int:
            return batch_elements(dataset, collate, table.heaviest(b)) or 0

        source = f"the data set's {b_ref} heaviest samples"
        hi = table.measured
    else:
        per = max(s.elements / max(1, s.batch_size) for s in steps) * _ITERABLE_MARGIN

        def worst(b: int) -> int:
            return math.ceil(per * b)

        source = f"the largest input seen, +{_ITERABLE_MARGIN - 1:.0%}"
        hi = max(b_ref, 1) * 64
    w = worst(b_ref)
    lo, best = 1, None
    while lo <= hi:  # the largest b whose worst input stays under the limit
        mid = (lo + hi) // 2
        if peak_at(worst(mid)) <= limit:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return VariableInputs(smallest, largest, intercept, slope, w, source, peak_at(w), best,
                          None if best is None else peak_at(worst(best)), recommended)


@dataclass
class _LoaderLike:
    """What :func:`measure` reads of a loader, from a DataLoader iterator's dataset and collate_fn."""

    dataset: Any
    collate_fn: Any

    @property
    def sampler(self) -> Any:
        from torch.utils.data import SequentialSampler

        return SequentialSampler(self.dataset)


def step_inputs(records: Sequence[StepRecord], batch_size: int) -> list[StepInput]:
    return [StepInput(batch_size, i, r.input_elements, r.peak_bytes) for i, r in enumerate(records)
            if r.input_elements is not None and r.peak_bytes is not None]

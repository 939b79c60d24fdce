"""What the DataLoader costs a loop: its data wait against compute, its workers' host memory, and
advice that works when followed.

Pure: the tracker (:mod:`gpumagic.tracking`) counts what each loader did during a block into a
:class:`LoaderStats`; :func:`loader_advice` and :func:`host_advice` turn those counts and the step
records into advice. The thresholds come from ``bench/step_anatomy.py`` on a 2-core machine:

* ``DATA_WAIT_THRESHOLD`` (0.3): below it, hiding the whole data wait would make steps at most
  1.43x faster, which a loaded machine's run-to-run noise can swallow;
* ``MIN_DATA_SECONDS`` (2 ms a step): a worker hands each batch to the main process through
  shared memory, which cost about 1 ms a batch on a quiet 2-core machine; there an in-memory
  ``TensorDataset`` loading in 0.13 ms a batch waited 60% of a 0.22 ms step, and two workers made
  that step 6x slower.

>>> report.loader_advice.loader_kwargs()      # doctest: +SKIP
{'num_workers': 2}
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from gpumagic.report import LoaderAdvice, StepRecord
from gpumagic.units import format_bytes, format_seconds

__all__ = ["DATA_WAIT_THRESHOLD", "MIN_DATA_SECONDS", "LoaderStats", "available_cores", "host_advice",
           "loader_advice"]

DATA_WAIT_THRESHOLD = 0.3
MIN_DATA_SECONDS = 0.002
_CPU_BOUND = 0.5
"""In-process loading that spent at least this share of its wall time on the CPU is CPU work."""
_COPY_SHARE = 0.25
_COPY_MIN = 64 * 2**20
"""Workers' own memory is advised about when together it is a quarter of the main process's peak
(each worker at least 64 MiB: a forked worker's own pages start near 10 MiB), or a tenth of the RAM."""


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and ``taskset`` set),
    not torch's thread setting nor the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class LoaderStats:
    """What one DataLoader did while a block was tracked (the tracker fills it in)."""

    num_workers: int
    pin_memory: bool
    persistent_workers: bool
    dataset_id: int
    batch_size: int | None
    iters: int = 0
    """``iter(loader)`` calls: passes over the data."""
    draws: int = 0
    samples: int = 0
    wall_seconds: float = 0.0
    """Time in ``__next__`` (and ``iter()``) on the main thread."""
    cpu_seconds: float = 0.0
    """The main thread's CPU time in ``__next__`` (in-process loading: it is the loading's CPU time)."""
    worker_pids: set[int] = field(default_factory=set)
    worker_peak_bytes: int | None = None
    worker_private_bytes: int | None = None


def _mean(steps: Sequence[StepRecord]) -> tuple[float, float] | None:
    """Mean (data, compute) seconds per step over the steps after the first."""
    timed = [s for s in steps[1:] if s.data_seconds is not None and s.compute_seconds is not None]
    n = sum(s.count for s in timed)
    if not n:
        return None
    return (sum(s.data_seconds or 0.0 for s in timed) / n, sum(s.compute_seconds or 0.0 for s in timed) / n)


def data_wait_fraction(steps: Sequence[StepRecord]) -> float | None:
    """The share of the steps' time spent waiting for data, over the steps after the first."""
    m = _mean(steps)
    if m is None or m[0] + m[1] <= 0:
        return None
    return m[0] / (m[0] + m[1])


def loader_advice(steps: Sequence[StepRecord], loaders: Sequence[LoaderStats], *, cores: int,
                  pin_helps: bool) -> LoaderAdvice | None:
    """Advice for the loader the loop waited on most, or None when data is no bottleneck.

    ``pin_helps``: the measured device copies from pinned host memory faster (its backend says).
    """
    m = _mean(steps)
    drawn = [ld for ld in loaders if ld.draws]
    if m is None or not drawn:
        return None
    data, compute = m
    fraction = data / (data + compute) if data + compute > 0 else 0.0
    if fraction < DATA_WAIT_THRESHOLD or data < MIN_DATA_SECONDS:
        return None
    ld = max(drawn, key=lambda x: x.wall_seconds)
    w0 = ld.num_workers
    busy = max(compute, 1e-6)
    # one batch's loading in one process: the wait itself in-process; with w0 workers each takes
    # w0 steps' time for its batch
    load = data if w0 == 0 else w0 * (data + compute)
    w = max(w0, min(cores, math.ceil(load / busy)))
    per_sample = ld.wall_seconds / ld.samples if w0 == 0 and ld.samples else None
    cpu_bound = ld.cpu_seconds / ld.wall_seconds >= _CPU_BOUND if w0 == 0 and ld.wall_seconds > 0 else None
    build_once = sum(1 for x in loaders if x.dataset_id == ld.dataset_id) > 1
    persistent = not ld.persistent_workers and (ld.iters > 1 or build_once)
    pin = pin_helps and not ld.pin_memory
    bottleneck = load / max(w, 1) > busy
    lines: list[str] = []
    changes = []
    if w != w0:
        changes.append(f"num_workers={w}")
    if pin:
        changes.append("pin_memory=True")
    if persistent and w > 0:
        changes.append("persistent_workers=True")
    wait = (f"the loop waits for data {fraction:.0%} of the step time ({format_seconds(data)} a step "
            f"against {format_seconds(compute)} of compute, after the first step)")
    if changes:
        why = []
        if w != w0:
            why.append(f"{w} worker{'s' if w != 1 else ''} load batches while the steps compute (this process may "
                       f"run on {cores} core{'s' if cores != 1 else ''}; num_workers={w0} now)")
        if pin:
            why.append("pinned batches copy to the device faster, and asynchronously with "
                       "`.to(device, non_blocking=True)`")
        if persistent and w > 0:
            why.append("workers are kept between passes instead of started again for each")
        lines.append(f"{wait}: build the DataLoader with {', '.join(changes)}: " + "; ".join(why))
    if build_once:
        lines.append("the loop builds a new DataLoader over the same data set for each pass: build it once, "
                     "before the loop, so its workers (persistent_workers=True) are started once")
    if bottleneck:
        cost = (f"loading one sample takes {format_seconds(per_sample)} in the main process (`__getitem__` and "
                f"its share of collate"
                + ("" if cpu_bound is None else f", {'CPU work' if cpu_bound else 'mostly waiting, not CPU'}")
                + ")") if per_sample is not None else \
            f"loading one batch takes about {format_seconds(load)} in a worker"
        lines.append(f"{cost}: even {w} worker{'s' if w != 1 else ''} load a batch in about "
                     f"{format_seconds(load / max(w, 1))} against {format_seconds(compute)} of compute, so "
                     "`__getitem__` is the bottleneck: do its work once ahead of training (decode, resize, "
                     "tokenise into a tensor file) or make it cheaper")
    if not lines:
        return None
    return LoaderAdvice(fraction, data, compute, w0, w, cores, per_sample, cpu_bound, pin, persistent and w > 0,
                        build_once, bottleneck, tuple(lines))


def host_advice(loaders: Sequence[LoaderStats], host_peak: int | None, host_total: int | None) -> tuple[str, ...]:
    """Advice when DataLoader workers hold their own copies of the data: each forked worker starts
    sharing the parent's pages, and reading Python objects (reference counts) copies the pages."""
    with_workers = [ld for ld in loaders if ld.worker_pids and ld.worker_private_bytes is not None]
    if not with_workers:
        return ()
    ld = max(with_workers, key=lambda x: (x.worker_private_bytes or 0) * len(x.worker_pids))
    n, private = ld.num_workers or len(ld.worker_pids), ld.worker_private_bytes or 0
    copies = n * private
    big = (host_total is not None and copies > host_total / 10) or (
        n >= 2 and private >= _COPY_MIN and host_peak is not None and copies >= _COPY_SHARE * host_peak)
    if not big:
        return ()
    fewer = max(1, n // 2)
    return (
        f"{n} DataLoader workers each hold up to {format_bytes(private)} of their own memory "
        f"({format_bytes(copies)} together, beside the main process's {format_bytes(host_peak)}): a data set held in "
        "RAM as Python objects is copied into every worker as the workers read it",
        f"use fewer workers (num_workers={fewer}), or keep the data out of the workers' copies: one numpy array "
        "or tensor instead of Python objects, a memory-mapped file (`np.load(path, mmap_mode='r')`), or lazy "
        "loading in `__getitem__` (pandas `read_csv(..., chunksize=...)` to write it out in chunks first); "
        "with persistent_workers=True the workers are not forked again for each pass",
    )

"""``gpumagic.track``: measure a block, or plan it on fake tensors (``dry_run=True``).

The public entry point above the tracker (:mod:`gpumagic.tracking`) and the planner
(:mod:`gpumagic.dryrun`); importing it imports neither IPython nor a renderer."""

from __future__ import annotations

import sys
from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from gpumagic.devices import DeviceLike
from gpumagic.gpus import GPU
from gpumagic.tracking import MAX_RECORDS, Tracker

if TYPE_CHECKING:
    from gpumagic.report import MemoryReport

__all__ = ["track", "what_if"]


def track(
    device: DeviceLike = None,
    budget: str | int | None = None,
    *,
    max_records: int = MAX_RECORDS,
    dry_run: bool = False,
    gpu: str | GPU | None = None,
    steps: int = 3,
    namespace: MutableMapping[str, Any] | None = None,
) -> Tracker:
    """Measure a block: peak memory of the block and of each training step, per-step loss and time.

    ``device``: "cpu", "cuda", "cuda:1", "mps", or a model/tensor (its device); default: cuda if
    available, else mps, else cpu. ``budget``: a simulated device capacity ("2GiB", "800MB" or
    bytes); on cpu an allocation past it raises ``torch.OutOfMemoryError``. ``max_records``:
    past this many steps, records are merged pairwise (peaks keep their max). ``gpu``: a catalog
    GPU ("T4", "A100-80GB", ...; see :mod:`gpumagic.gpus`): its capacity is the budget.

    ``dry_run=True`` plans instead of measuring: the block runs on fake tensors (no data, no
    compute, no device needed) and stops quietly after ``steps`` optimizer steps; the report has
    ``dry_run=True`` and no losses. Objects made before the block are read from ``namespace``
    (default: the caller's module globals, which is the notebook's namespace in Jupyter): its
    tensors, models, optimizers, schedulers and scalers are rebound to fake copies for the block
    and everything is rebound as before afterwards (see :mod:`gpumagic.dryrun`).

    >>> with track(device="cpu") as t:              # doctest: +SKIP
    ...     train()
    >>> t.report.peak_delta_bytes                     # doctest: +SKIP
    >>> with track(dry_run=True, gpu="T4") as t:     # doctest: +SKIP
    ...     train()
    """
    if not dry_run:
        if gpu is not None:
            from gpumagic.gpus import lookup

            if budget is not None:
                raise ValueError("give either gpu= or budget=, not both")
            budget = (lookup(gpu) if isinstance(gpu, str) else gpu).capacity_bytes
        return Tracker(device, budget, max_records=max_records)
    from gpumagic.dryrun import DryTracker

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if device is not None and not isinstance(device, str):
        raise ValueError(f"a dry run needs device as a string ('cpu', 'cuda', 'mps'), got {type(device).__name__}")
    ns = namespace if namespace is not None else sys._getframe(1).f_globals
    return DryTracker(ns, device=device, gpu=gpu, budget=budget, steps=steps)


def what_if(
    fn: Callable[[], Any],
    *,
    device: str | None = None,
    budget: str | int | None = None,
    gpu: str | GPU | None = None,
    steps: int = 3,
    namespace: MutableMapping[str, Any] | None = None,
) -> MemoryReport:
    """Plan ``fn()`` as written and once per memory remedy that applies (``%%gpumem --what-if``).

    A ``with`` block runs once and cannot be planned again per remedy, so the code comes as a
    callable. Its objects are read from ``namespace`` (default: ``fn``'s module globals) and
    fake-copied for every plan; nothing of yours changes. The batch knob is a global ``fn``
    reads (a DataLoader, or an int equal to the batch size). Returns the plan's
    :class:`~gpumagic.report.MemoryReport` with ``what_if`` set.

    >>> rep = gpumagic.what_if(train, device="cpu", budget="1GiB")   # doctest: +SKIP
    >>> [(r.name, r.batch_size_that_fits) for r in rep.what_if]     # doctest: +SKIP
    """
    from gpumagic.devices import resolve_budget
    from gpumagic.dryrun import plan_target
    from gpumagic.remedies import plan_what_if

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not callable(fn):
        raise TypeError(f"what_if needs a callable taking no arguments, got {type(fn).__name__}")
    bud = resolve_budget(budget)
    plan_target(device, gpu, bud)  # the options' errors before any plan
    ns = namespace if namespace is not None else getattr(fn, "__globals__", None)
    if ns is None:
        raise ValueError("what_if needs namespace= for a callable without module globals")
    code = getattr(fn, "__code__", None)
    names: set[str] = set()
    stack = [code] if code is not None else []
    while stack:  # the globals fn and the functions it defines read
        c = stack.pop()
        names.update(c.co_names)
        stack.extend(k for k in c.co_consts if hasattr(k, "co_names"))
    return plan_what_if(fn, ns, device=device, gpu=gpu, budget=bud, steps=steps,
                        source=" ".join(sorted(names)) if code is not None else None)

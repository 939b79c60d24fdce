"""``gpumagic.track``: measure a block, or plan it on fake tensors (``dry_run=True``).

The public entry point above the tracker (:mod:`gpumagic.tracking`) and the planner
(:mod:`gpumagic.dryrun`); importing it imports neither IPython nor a renderer."""

from __future__ import annotations

import sys
from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from gpumagic.devices import DeviceLike
from gpumagic.gpus import GPU
from gpumagic.tracking import MAX_RECORDS, StopTrial, Tracker

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
    what_if: bool = False,
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

    ``what_if=True`` (``%%gpumem --what-if`` for a block) plans the block as ``dry_run=True`` does,
    then plans the block's code again once per memory remedy that applies: ``t.report.what_if``.
    The code is the ``with`` statement's own body, read from its source (a notebook cell or a
    file), and runs in the caller's global namespace (a block inside a function: pass the
    function to :func:`what_if` instead).

    >>> with track(what_if=True, device="cpu", budget="1GiB") as t:   # doctest: +SKIP
    ...     train()
    >>> [(r.name, r.saved_bytes) for r in t.report.what_if]          # doctest: +SKIP
    """
    if what_if:
        return _what_if_block(sys._getframe(1), device, budget, gpu, steps, namespace)
    if not dry_run:
        if gpu is not None:
            from gpumagic.gpus import lookup

            if budget is not None:
                raise ValueError("give either gpu= or budget=, not both")
            budget = (lookup(gpu) if isinstance(gpu, str) else gpu).capacity_bytes
        return Tracker(device, budget, max_records=max_records)
    from gpumagic.dryrun import DryTracker

    kind, bud = _plan_options(device, budget, gpu, steps)
    ns = namespace if namespace is not None else sys._getframe(1).f_globals
    return DryTracker(ns, device=kind, gpu=gpu, budget=bud, steps=steps)


def _plan_options(device: Any, budget: str | int | None, gpu: str | GPU | None,
                  steps: int) -> tuple[str | None, int | None]:
    """The options of a plan (a dry run, a what-if), checked before anything runs: (the device as
    given, a string; the budget in bytes); BadOptions (a ValueError) naming the field otherwise."""
    from gpumagic.dryrun import plan_target
    from gpumagic.options import BadOptions, check_size, parse_budget

    check_size("steps", steps)
    if device is not None and not isinstance(device, str):
        raise BadOptions(f"a plan needs `device` as a string ('cpu', 'cuda', 'mps'), got {type(device).__name__}")
    bud = parse_budget(budget)
    plan_target(device, gpu, bud)
    return device, bud


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
    from gpumagic.remedies import plan_what_if

    if not callable(fn):
        raise TypeError(f"what_if needs a callable taking no arguments, got {type(fn).__name__}")
    device, bud = _plan_options(device, budget, gpu, steps)
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


def _what_if_block(frame: Any, device: DeviceLike, budget: str | int | None, gpu: str | GPU | None, steps: int,
                   namespace: MutableMapping[str, Any] | None) -> Tracker:
    """A dry-run tracker for the ``with`` block at ``frame``'s current line whose report, at the end
    of the block, is the what-if plan of the block's own code."""
    import ast
    import linecache

    from gpumagic.dryrun import DryTracker
    from gpumagic.remedies import plan_what_if

    kind, bud = _plan_options(device, budget, gpu, steps)
    if frame.f_code.co_name != "<module>" and namespace is None:
        raise ValueError("track(what_if=True) plans a block of a notebook cell or a module: inside a function, "
                         "pass the function to gpumagic.what_if(fn, ...) instead")
    filename, line = frame.f_code.co_filename, frame.f_lineno
    source = "".join(linecache.getlines(filename, frame.f_globals))
    block = None
    try:
        tree = ast.parse(source)
    except SyntaxError:
        tree = None
    for node in ast.walk(tree) if tree is not None else ():
        if isinstance(node, ast.With) and node.lineno <= line < node.body[0].lineno:
            block = node
            break
    if block is None:
        raise ValueError(f"track(what_if=True) could not read the with block's code at {filename}:{line}: "
                         "use gpumagic.what_if(fn, ...) with the block as a function")
    body = ast.Module(body=block.body, type_ignores=[])
    code = compile(body, filename, "exec")
    text = ast.get_source_segment(source, block) or ""
    ns: MutableMapping[str, Any] = namespace if namespace is not None else frame.f_globals
    globs: dict[str, Any] = ns if isinstance(ns, dict) else dict(ns)
    planned_on = kind

    class WhatIfBlock(DryTracker):
        def __exit__(self, et: Any, ev: Any, tb: Any) -> Any:
            done = super().__exit__(et, ev, tb)
            # a plan stops quietly after ``steps`` optimizer steps (StopTrial): the block was planned
            if (ev is None or isinstance(ev, StopTrial)) and self._report is not None:
                self._report = plan_what_if(lambda: exec(code, globs), ns, device=planned_on, gpu=gpu, budget=bud,
                                            steps=steps, source=text)
            return done

    return WhatIfBlock(ns, device=kind, gpu=gpu, budget=bud, steps=steps)

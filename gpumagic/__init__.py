"""gpumagic: see how much device memory your PyTorch training uses, per cell and per step.

In Jupyter: ``%load_ext gpumagic``, then ``%%gpumem`` on a training cell, ``%find_batch`` to pick
a batch size, and out-of-memory errors explained with numbers. The same engine as a plain API::

    import gpumagic
    with gpumagic.track(device="cpu", budget="2GiB") as t:
        train()
    print(t.report)

Importing gpumagic is cheap: it never imports IPython, ipywidgets or matplotlib and never
initialises CUDA; the heavy parts load on first use.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from gpumagic import views
from gpumagic._version import __version__
from gpumagic.units import format_bytes, parse_size

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

    from gpumagic.batch import find_batch
    from gpumagic.devices import device_status, free_memory
    from gpumagic.measure import track, what_if
    from gpumagic.noise import NoiseScale
    from gpumagic.oom import Advice, AdviceContext, OOMInfo, advise
    from gpumagic.oom import parse as parse_oom
    from gpumagic.options import BadOptions, SearchOptions
    from gpumagic.report import (
        BatchSearchResult,
        DeviceStatus,
        Fit,
        MemoryBreakdown,
        MemoryReport,
        RankRecord,
        StepRecord,
        Trial,
    )
    from gpumagic.sweep import batch_sweep
    from gpumagic.sweep_results import SweepResult, SweepRun
    from gpumagic.tracking import Tracker

__all__ = [
    "Advice",
    "AdviceContext",
    "BadOptions",
    "BatchSearchResult",
    "DeviceStatus",
    "Fit",
    "MemoryBreakdown",
    "MemoryReport",
    "NoiseScale",
    "OOMInfo",
    "RankRecord",
    "SearchOptions",
    "StepRecord",
    "SweepResult",
    "SweepRun",
    "Tracker",
    "Trial",
    "__version__",
    "advise",
    "batch_sweep",
    "device_status",
    "find_batch",
    "format_bytes",
    "free_memory",
    "load_ipython_extension",
    "parse_oom",
    "parse_size",
    "track",
    "unload_ipython_extension",
    "what_if",
]

# results render through the registry; the widgets register when the first result renders
views.add_module("gpumagic.render.widgets")
views.add_module("gpumagic.render.sweep_widgets")

# name -> module that defines it; imported on first attribute access (PEP 562), so that
# %load_ext pays for none of it (the result types' dataclasses alone cost ~18 ms to create)
_LAZY = {
    **dict.fromkeys(("BatchSearchResult", "DeviceStatus", "Fit", "MemoryBreakdown", "MemoryReport", "RankRecord",
                     "StepRecord", "Trial"), "gpumagic.report"),
    "track": "gpumagic.measure",
    "what_if": "gpumagic.measure",
    "Tracker": "gpumagic.tracking",
    "find_batch": "gpumagic.batch",
    **dict.fromkeys(("BadOptions", "SearchOptions"), "gpumagic.options"),
    "batch_sweep": "gpumagic.sweep",
    **dict.fromkeys(("SweepResult", "SweepRun"), "gpumagic.sweep_results"),
    "NoiseScale": "gpumagic.noise",
    "device_status": "gpumagic.devices",
    "free_memory": "gpumagic.devices",
    "OOMInfo": "gpumagic.oom",
    "Advice": "gpumagic.oom",
    "AdviceContext": "gpumagic.oom",
    "advise": "gpumagic.oom",
    "parse_oom": "gpumagic.oom",
}


_SUBMODULES = (
    "report", "oom", "options", "tracking", "batch", "search", "sweep", "noise", "devices", "distributed", "render",
    "views", "widgets", "monitor", "magics", "autoload",
)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"gpumagic.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gpumagic' has no attribute {name!r}")
    import importlib

    attr = "parse" if name == "parse_oom" else name
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if os.environ.get("GPUMAGIC_CHILD_REPORTS"):
    # started from a %%gpumem cell (like coverage's COVERAGE_PROCESS_START): measure this process
    from gpumagic.distributed import start_from_environment

    start_from_environment()


def load_ipython_extension(ipython: InteractiveShell) -> None:
    """Called by ``%load_ext gpumagic``: registers the magics (idempotent)."""
    from gpumagic import magics

    magics.load(ipython)


def unload_ipython_extension(ipython: InteractiveShell) -> None:
    """Called by ``%unload_ext gpumagic``: removes the magics and every global hook."""
    from gpumagic import magics

    magics.unload(ipython)

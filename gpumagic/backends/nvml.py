"""NVML (nvidia-ml-py, imported as ``pynvml``): device totals, utilisation and GPU processes.

Optional by nature: with no driver every function returns None and the caller says so.
NVML indexes physical GPUs; with ``CUDA_VISIBLE_DEVICES`` set, index i maps to the i-th
listed device when the list is numeric (:func:`visible_indices` is the one reader of it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from gpumagic.report import ProcessMemory

__all__ = ["GPUInfo", "device_count", "gpu_info", "visible_indices"]

_state: dict[str, Any] = {"ok": None, "mod": None}


@dataclass(frozen=True)
class GPUInfo:
    index: int
    name: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    utilization_percent: int | None
    processes: tuple[ProcessMemory, ...]


def _nvml() -> Any:
    if _state["ok"] is None:
        try:
            import pynvml

            pynvml.nvmlInit()
            _state["mod"], _state["ok"] = pynvml, True
        except Exception:  # no library, no driver, no permission: NVML is simply unavailable
            _state["ok"] = False
    return _state["mod"] if _state["ok"] else None


def visible_indices() -> list[int] | None:
    """The physical GPUs ``CUDA_VISIBLE_DEVICES`` lists, in order; None when it is unset or not
    numeric (UUIDs). An empty value hides every GPU: ``[]``."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return None
    parts = [p.strip() for p in visible.split(",") if p.strip()]
    return [int(p) for p in parts] if all(p.isdigit() for p in parts) else None


def _physical_index(index: int) -> int:
    visible = visible_indices()
    return visible[index] if visible and index < len(visible) else index


def _proc_name(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() or None
    except OSError:
        return None


def gpu_info(index: int) -> GPUInfo | None:
    """NVML's view of CUDA device ``index``, or None when NVML is unavailable."""
    nv = _nvml()
    if nv is None:
        return None
    try:
        h = nv.nvmlDeviceGetHandleByIndex(_physical_index(index))
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        name = nv.nvmlDeviceGetName(h)
        if isinstance(name, bytes):
            name = name.decode()
        try:
            util: int | None = int(nv.nvmlDeviceGetUtilizationRates(h).gpu)
        except Exception:
            util = None
        procs = []
        for p in nv.nvmlDeviceGetComputeRunningProcesses(h) or ():
            used = getattr(p, "usedGpuMemory", None)
            procs.append(ProcessMemory(int(p.pid), int(used) if used is not None else None, _proc_name(int(p.pid))))
        return GPUInfo(index, str(name), int(mem.total), int(mem.used), int(mem.free), util, tuple(procs))
    except Exception:
        return None


def device_count() -> int:
    """How many GPUs NVML can read for this process (the visible ones); 0 without a driver."""
    if gpu_info(0) is None:  # initialises NVML once; every failure means "not here"
        return 0
    visible = visible_indices()
    if visible is not None:
        return len(visible)
    try:
        return int(_nvml().nvmlDeviceGetCount())
    except Exception:
        return 0

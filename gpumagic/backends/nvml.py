"""NVML (nvidia-ml-py, imported as ``pynvml``): device totals, utilisation and GPU processes.

Optional by nature: with no driver every function returns None and the caller says so.
NVML indexes physical GPUs; with ``CUDA_VISIBLE_DEVICES`` set, index i maps to the i-th
listed device when the list is numeric.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

__all__ = ["GPUInfo", "NVMLProcess", "gpu_info"]

_state: dict[str, Any] = {"ok": None, "mod": None}


@dataclass(frozen=True)
class NVMLProcess:
    pid: int
    used_bytes: int | None
    name: str | None


@dataclass(frozen=True)
class GPUInfo:
    index: int
    name: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    utilization_percent: int | None
    processes: tuple[NVMLProcess, ...]


def _nvml() -> Any:
    if _state["ok"] is None:
        try:
            import pynvml

            pynvml.nvmlInit()
            _state["mod"], _state["ok"] = pynvml, True
        except Exception:  # no library, no driver, no permission: NVML is simply unavailable
            _state["ok"] = False
    return _state["mod"] if _state["ok"] else None


def _physical_index(index: int) -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    parts = [p.strip() for p in visible.split(",") if p.strip()]
    if parts and all(p.isdigit() for p in parts) and index < len(parts):
        return int(parts[index])
    return index


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
            procs.append(NVMLProcess(int(p.pid), int(used) if used is not None else None, _proc_name(int(p.pid))))
        return GPUInfo(index, str(name), int(mem.total), int(mem.used), int(mem.free), util, tuple(procs))
    except Exception:
        return None

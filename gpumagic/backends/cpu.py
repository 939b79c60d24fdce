"""The CPU as a device: host RAM for status and capacity, the exact tracker as its session.

The session (every live tensor storage counted, a budget enforced by a simulated OOM) lives in
:mod:`gpumagic.backends.cpu_exact` and is imported only when a session opens, so the monitor's CPU
source runs without torch. :func:`host_memory` is the one reader of the machine's RAM.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from gpumagic.backends import BackendBase
from gpumagic.report import DeviceSample, DeviceStatus

if TYPE_CHECKING:
    import torch

    from gpumagic.backends import PlannedMemory
    from gpumagic.backends.cpu_exact import CPUSession
    from gpumagic.gpus import GPU

__all__ = ["BACKEND", "CPUBackend", "CPUPlan", "CPUSource", "host_memory"]


def host_memory() -> tuple[int | None, int | None]:
    """(total, available) bytes of the machine's RAM; available is MemAvailable where Linux has it."""
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total: int | None = page * os.sysconf("SC_PHYS_PAGES")
        avail: int | None = page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None, None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024  # free plus what the kernel can reclaim
                    break
    except (OSError, ValueError, IndexError):
        pass
    return total, avail


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None  # not Linux: the peak RSS from resource would be mistaken for the current one


def _tracker_bytes() -> int | None:
    # Only when the tracker's module is already imported: a tracker can't be active otherwise,
    # and importing it would import torch.
    cpu = sys.modules.get("gpumagic.backends.cpu_exact")
    fn = getattr(cpu, "live_tracker_bytes", None)
    if fn is None:
        return None
    value = fn()
    return None if value is None else int(value)


class CPUSource:
    """This process's resident memory against the machine's RAM, and its CPU utilisation."""

    name = "cpu"

    def __init__(self) -> None:
        self._last: tuple[float, float] | None = None
        self._cpus = os.cpu_count() or 1

    def _utilization(self) -> float | None:
        now = (time.monotonic(), time.process_time())
        last, self._last = self._last, now
        if last is None or now[0] <= last[0]:
            return None
        return min(100.0, 100.0 * (now[1] - last[1]) / (now[0] - last[0]) / self._cpus)

    def __call__(self) -> list[DeviceSample]:
        rss = _rss_bytes()
        total, avail = host_memory()
        used = None if total is None or avail is None else total - avail
        other = None if rss is None or used is None else max(0, used - rss)
        return [DeviceSample("cpu", "CPU RAM", used, total, self._utilization(), rss, other, _tracker_bytes(),
                             utilization_label="CPU")]


class CPUPlan:
    """A dry run for the host: fake CPU tensors are the device's own, counted like the exact tracker."""

    host = True
    caching_allocator = False
    named_gpu = False
    foreach_optimizers = False
    fused_attention = False
    moves_from: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def stands_in(self) -> bool:
        return False

    def kernels_refuse_fakes(self) -> bool:
        return False

    def standin_patches(self, memory: PlannedMemory, gpu: GPU | None) -> list[tuple[Any, str, Any]]:
        return []


class CPUBackend(BackendBase):
    name = "cpu"
    session_enforces_capacity = True
    plans_on_fake_tensors = True
    indexed = False
    oom_device_types: tuple[str, ...] = ()  # the host's errors: advice falls back to the host anyway
    dry_run = CPUPlan()

    def available(self) -> bool:
        return True

    def parse(self, index: int | None) -> torch.device:
        import torch

        if index not in (None, 0):
            raise ValueError(f"device 'cpu:{index}' does not exist: there is one CPU device, 'cpu'")
        return torch.device("cpu")

    def owns(self, device: torch.device) -> bool:
        return device.type == "cpu"

    def open_session(self, device: torch.device, budget: int | None, exclude: Iterable[int]) -> CPUSession:
        from gpumagic.backends.cpu_exact import CPUSession

        return CPUSession(budget, exclude=exclude)

    def status(self, device: torch.device) -> DeviceStatus:
        from gpumagic.backends.cpu_exact import live_storages

        allocated = sum(int(st.nbytes()) for st in live_storages("cpu").values())
        total, avail = host_memory()
        return DeviceStatus(
            "cpu", "cpu", allocated, None, total, avail, "host memory",
            notes=("allocated = live CPU tensor storages reachable from Python; total/free = host RAM",),
        )

    def capacity(self, device: torch.device) -> int | None:
        return host_memory()[1]

    def empty_cache(self) -> None:
        return None  # the CPU allocator returns freed memory itself

    def rng_state(self) -> Any:
        import torch

        return torch.get_rng_state()

    def set_rng_state(self, state: Any) -> None:
        import torch

        torch.set_rng_state(state)

    def sample_source(self) -> CPUSource:
        return CPUSource()


BACKEND = CPUBackend()

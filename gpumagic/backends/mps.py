"""Apple's MPS through ``torch.mps``'s counters.

MPS has no peak counter, so the per-window peak is the larger of the live bytes at the window's
two ends: a lower bound, said so in the report's notes. Importing this module does not import torch.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from gpumagic.backends import BackendBase
from gpumagic.report import DeviceSample, DeviceStatus

if TYPE_CHECKING:
    import torch

    from gpumagic.backends import PlannedMemory
    from gpumagic.gpus import GPU

__all__ = ["BACKEND", "MPSBackend", "MPSPlan", "MPSSession", "MPSSource", "recommended_max_memory"]


def _mps() -> Any:
    import torch

    return torch.mps


def recommended_max_memory(mps: Any) -> int | None:
    """What Metal recommends this process stays under (the device's capacity); None on old torch."""
    rec = getattr(mps, "recommended_max_memory", None)
    return int(rec()) if rec is not None else None


class MPSSession:
    """Live bytes sampled at window ends. ``api`` is ``torch.mps`` by default: tests pass a scripted one."""

    backend = "mps"

    incomplete: str | None = None

    def __init__(self, budget: int | None = None, *, api: Any = None) -> None:
        if budget is not None:
            raise ValueError(
                "--budget is supported on cpu (simulated device) and cuda, not on mps; "
                "use PYTORCH_MPS_HIGH_WATERMARK_RATIO to cap MPS memory"
            )
        self.device = "mps"
        self.budget_bytes: int | None = None
        self.notes = ["mps has no peak counter: peaks are sampled at step boundaries (a lower bound)"]
        self._api = api if api is not None else _mps()
        self._peak = 0
        self._last = 0
        self._driver_peak = 0

    def start(self) -> int:
        self._last = self._peak = int(self._api.current_allocated_memory())
        self._driver_peak = int(self._api.driver_allocated_memory())
        return self._last

    def current(self) -> int:
        return int(self._api.current_allocated_memory())

    def take_window_peak(self) -> int:
        now = self.current()
        p = max(now, self._last)
        self._last = now
        self._peak = max(self._peak, p)
        self._driver_peak = max(self._driver_peak, int(self._api.driver_allocated_memory()))
        return p

    def peak(self) -> int:
        return max(self._peak, self.current())

    def reserved_peak(self) -> int | None:
        return self._driver_peak

    def capacity(self) -> int | None:
        return recommended_max_memory(self._api)

    def stop(self) -> None:
        return None


class MPSSource:
    """torch.mps's counters for the monitor (this process's view of the Apple GPU)."""

    name = "mps"

    def __call__(self) -> list[DeviceSample]:
        mps = sys.modules["torch"].mps
        allocated = int(mps.current_allocated_memory())
        driver = int(mps.driver_allocated_memory()) if hasattr(mps, "driver_allocated_memory") else None
        used = driver if driver is not None else allocated
        return [DeviceSample("mps", "Apple MPS", used, recommended_max_memory(mps), None, used, None)]


def _available(torch: Any) -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


class MPSPlan:
    """A dry run for mps: always on fake CPU tensors standing in, counted like the cpu's."""

    host = False
    caching_allocator = False
    named_gpu = False
    foreach_optimizers = False
    fused_attention = False
    moves_from: tuple[str, ...] = ("cuda",)  # the code's .cuda() lands on mps too: .to("cuda") does the same
    notes: tuple[str, ...] = ("mps planned like cpu: Metal's own allocator rounding is not modelled",)

    def stands_in(self) -> bool:
        return True

    def kernels_refuse_fakes(self) -> bool:
        return False

    def standin_patches(self, memory: PlannedMemory, gpu: GPU | None) -> list[tuple[Any, str, Any]]:
        return []


class MPSBackend(BackendBase):
    name = "mps"
    session_enforces_capacity = False
    plans_on_fake_tensors = False  # a plan models mps like cpu: too rough to pick the sizes to verify
    indexed = False
    oom_device_types = ("mps",)
    dry_run = MPSPlan()

    def available(self) -> bool:
        import torch

        return _available(torch)

    def parse(self, index: int | None) -> torch.device:
        import torch

        if not _available(torch):
            raise ValueError("device 'mps' is not available here (torch.backends.mps.is_available() is False)")
        if index not in (None, 0):
            raise ValueError(f"device 'mps:{index}' does not exist: there is one MPS device, 'mps'")
        return torch.device("mps")

    def owns(self, device: torch.device) -> bool:
        return device.type == "mps"

    def open_session(self, device: torch.device, budget: int | None, exclude: Iterable[int]) -> MPSSession:
        return MPSSession(budget)

    def status(self, device: torch.device) -> DeviceStatus:
        mps = _mps()
        total = recommended_max_memory(mps)
        driver = int(mps.driver_allocated_memory())
        return DeviceStatus(
            "mps", "mps", int(mps.current_allocated_memory()), driver, total,
            None if total is None else total - driver, "Apple GPU",
        )

    def capacity(self, device: torch.device) -> int | None:
        return recommended_max_memory(_mps())

    def empty_cache(self) -> None:
        if self.available():
            _mps().empty_cache()

    def rng_state(self) -> Any:
        return None  # torch.mps's generator is reseeded by torch.manual_seed; nothing saved before

    def set_rng_state(self, state: Any) -> None:
        _mps().set_rng_state(state)

    def sample_source(self) -> MPSSource | None:
        torch = sys.modules.get("torch")  # never imported by the monitor
        if torch is not None and _available(torch) and hasattr(torch, "mps"):
            return MPSSource()
        return None


BACKEND = MPSBackend()

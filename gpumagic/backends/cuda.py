"""CUDA (and ROCm) through torch's caching-allocator counters; NVML for device-wide figures.

Everything here is host-side bookkeeping of the allocator: reading and resetting peak stats
does not synchronise the device, so tracking adds no stall to the training loop. Nothing here
initialises CUDA unless a CUDA device is asked for, and importing this module does not import
torch (the monitor's sources run without it).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from gpumagic.backends import BackendBase, nvml
from gpumagic.report import DeviceSample, DeviceStatus, ProcessMemory

if TYPE_CHECKING:
    import torch

    from gpumagic.backends import PlannedMemory
    from gpumagic.gpus import GPU

__all__ = ["BACKEND", "CUDABackend", "CUDAPlan", "CUDASession", "NVMLSource", "TorchCUDASource", "nvml_source"]


def _cuda() -> Any:
    import torch

    return torch.cuda


class CUDASession:
    """Peaks from the caching allocator; a budget through the per-process memory fraction.

    ``api`` is the allocator's counters (``torch.cuda`` by default): tests pass a scripted one,
    so this code runs in CPU-only CI.
    """

    backend = "cuda"

    incomplete: str | None = None

    def __init__(self, index: int, budget: int | None = None, *, api: Any = None) -> None:
        self.index = index
        self.device = f"cuda:{index}"
        self.budget_bytes = budget
        self.notes: list[str] = []
        self._api = api if api is not None else _cuda()
        self._old_fraction: float | None = None
        self._peak = 0
        self._reserved_peak = 0

    def start(self) -> int:
        cuda, i = self._api, self.index
        if self.budget_bytes is not None:
            total = cuda.get_device_properties(i).total_memory
            if self.budget_bytes > total:
                self.notes.append(
                    f"the budget ({self.budget_bytes} bytes) is larger than the device ({total} bytes): "
                    "the device is the limit"
                )
            getter = getattr(cuda, "get_per_process_memory_fraction", None)
            self._old_fraction = float(getter(i)) if getter is not None else 1.0
            cuda.set_per_process_memory_fraction(min(1.0, self.budget_bytes / total), i)
        cuda.reset_peak_memory_stats(i)
        base = int(cuda.memory_allocated(i))
        self._peak = base
        self._reserved_peak = int(cuda.memory_reserved(i))
        return base

    def current(self) -> int:
        return int(self._api.memory_allocated(self.index))

    def take_window_peak(self) -> int:
        cuda, i = self._api, self.index
        p = int(cuda.max_memory_allocated(i))
        self._reserved_peak = max(self._reserved_peak, int(cuda.max_memory_reserved(i)))
        cuda.reset_peak_memory_stats(i)
        self._peak = max(self._peak, p)
        return p

    def peak(self) -> int:
        return max(self._peak, int(self._api.max_memory_allocated(self.index)))

    def reserved_peak(self) -> int | None:
        return max(self._reserved_peak, int(self._api.max_memory_reserved(self.index)))

    def capacity(self) -> int | None:
        if self.budget_bytes is not None:
            return self.budget_bytes
        return int(self._api.get_device_properties(self.index).total_memory)

    def stop(self) -> None:
        if self._old_fraction is not None:
            old, self._old_fraction = self._old_fraction, None
            self._api.set_per_process_memory_fraction(old, self.index)


# ---------------------------------------------------------------------------------------------
# monitor sources


def _torch_reserved(index: int) -> int | None:
    """What torch's caching allocator holds on cuda:index, without ever initialising CUDA."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    try:
        return int(torch.cuda.memory_reserved(index))
    except Exception:  # an index torch cannot see (CUDA_VISIBLE_DEVICES given as UUIDs)
        return None


class NVMLSource:
    """Every visible NVIDIA GPU through NVML: totals, utilisation, and this process's share."""

    name = "nvml"

    def __init__(self, count: int) -> None:
        self.count = count

    def __call__(self) -> list[DeviceSample]:
        pid = os.getpid()
        out = []
        for i in range(self.count):
            info = nvml.gpu_info(i)
            if info is None:
                out.append(DeviceSample(f"cuda:{i}", None, None, None, None, None, None))
                continue
            mine = [p.used_bytes for p in info.processes if p.pid == pid and p.used_bytes is not None]
            # In a container NVML reports host pids; then torch's allocator is the best count we have.
            process = sum(mine) if mine else _torch_reserved(i)
            other = None if process is None else max(0, info.used_bytes - process)
            util = None if info.utilization_percent is None else float(info.utilization_percent)
            out.append(DeviceSample(f"cuda:{i}", info.name, info.used_bytes, info.total_bytes, util, process, other))
        return out


def nvml_source() -> NVMLSource | None:
    """An NVML source when a driver answers, else None (no library, no driver, no GPU)."""
    count = nvml.device_count()
    return NVMLSource(count) if count else None


class TorchCUDASource:
    """torch's counters for the CUDA devices (this process only); used when NVML is unavailable.

    Only devices this process already uses are read: asking any other CUDA device for its free
    memory would create a context there (hundreds of MiB).
    """

    name = "torch.cuda"

    def __call__(self) -> list[DeviceSample]:
        cuda = sys.modules["torch"].cuda
        current = int(cuda.current_device())
        out = []
        for i in range(int(cuda.device_count())):
            reserved = int(cuda.memory_reserved(i))
            name = str(cuda.get_device_name(i))
            if i != current and reserved == 0:
                total = int(cuda.get_device_properties(i).total_memory)
                out.append(DeviceSample(f"cuda:{i}", name, None, total, None, 0, None))
                continue
            free, total = (int(v) for v in cuda.mem_get_info(i))
            used = total - free
            out.append(DeviceSample(f"cuda:{i}", name, used, total, None, reserved, max(0, used - reserved)))
        return out


# ---------------------------------------------------------------------------------------------
# dry runs


def _device_props(gpu: GPU) -> Any:
    return SimpleNamespace(
        name=f"{gpu.name} (planned by gpumagic)", total_memory=gpu.total_bytes, major=gpu.compute_capability[0],
        minor=gpu.compute_capability[1], multi_processor_count=0, is_integrated=False,
    )


def _cuda_answers(memory: PlannedMemory, gpu: GPU | None) -> dict[str, Any]:
    """Answers of the ``torch.cuda`` queries for the planned GPU, as {name: replacement}."""
    g = gpu
    total = g.total_bytes if g is not None else (memory.capacity() or 0)

    def none(*a: Any, **k: Any) -> None:
        return None

    def alloc(*a: Any, **k: Any) -> int:
        return memory.current()

    def peak(*a: Any, **k: Any) -> int:
        return memory.peak()

    def reserved(*a: Any, **k: Any) -> int:
        return memory.reserved() or 0

    def max_reserved(*a: Any, **k: Any) -> int:
        return memory.reserved_peak() or 0

    def mem_get_info(*a: Any, **k: Any) -> tuple[int, int]:
        cap = memory.capacity() or total
        return max(0, cap - (memory.reserved() or 0)), total

    return {
        "is_available": lambda: True,
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "get_device_name": lambda *a, **k: g.name if g is not None else "planned GPU",
        "get_device_capability": lambda *a, **k: g.compute_capability if g is not None else (8, 0),
        "get_device_properties": lambda *a, **k: _device_props(g) if g is not None else SimpleNamespace(
            name="planned GPU", total_memory=total, major=8, minor=0, multi_processor_count=0),
        "is_bf16_supported": lambda *a, **k: g.bf16 if g is not None else True,
        "synchronize": none, "empty_cache": none, "set_device": none, "reset_peak_memory_stats": none,
        "reset_max_memory_allocated": none, "reset_accumulated_memory_stats": none,
        "manual_seed": none, "manual_seed_all": none, "seed": none, "seed_all": none,
        "memory_allocated": alloc, "max_memory_allocated": peak, "memory_reserved": reserved,
        "max_memory_reserved": max_reserved, "mem_get_info": mem_get_info,
    }


class CUDAPlan:
    """A dry run for cuda: the caching allocator modelled, a catalog GPU accepted, foreach optimizers;
    without CUDA, fake CPU tensors stand in and ``torch.cuda`` answers for the planned GPU."""

    host = False
    caching_allocator = True
    named_gpu = True
    foreach_optimizers = True
    fused_attention = True
    moves_from: tuple[str, ...] = ()
    notes: tuple[str, ...] = ("reserved memory predicted by a model of the CUDA caching allocator (512-byte rounding, "
                               "2 MiB small and 20 MiB large segments); the CUDA context is not in these figures",)

    def stands_in(self) -> bool:
        return not _cuda().is_available()

    def kernels_refuse_fakes(self) -> bool:
        return self.stands_in()  # a fake CUDA tensor in a kernel aborts a build without CUDA

    def standin_patches(self, memory: PlannedMemory, gpu: GPU | None) -> list[tuple[Any, str, Any]]:
        import torch

        cuda = torch.cuda
        patches: list[tuple[Any, str, Any]] = [
            (cuda, name, fn) for name, fn in _cuda_answers(memory, gpu).items() if hasattr(cuda, name)
        ]
        autocast_cls = torch.amp.autocast_mode.autocast
        original_init = autocast_cls.__init__

        def init(ac: Any, device_type: str, dtype: Any = None, enabled: bool = True,
                 cache_enabled: Any = None) -> None:
            if device_type == "cuda":  # autocast("cuda") runs on the stand-in, in cuda's default dtype
                dtype = dtype if dtype is not None else torch.float16
                device_type = "cpu"
            original_init(ac, device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)

        patches.append((autocast_cls, "__init__", init))
        return patches


# ---------------------------------------------------------------------------------------------
# the backend


class CUDABackend(BackendBase):
    name = "cuda"
    session_enforces_capacity = False
    plans_on_fake_tensors = True
    indexed = True
    oom_device_types = ("cuda",)
    dry_run = CUDAPlan()
    loader_pin_memory = True

    def available(self) -> bool:
        return bool(_cuda().is_available())

    def parse(self, index: int | None) -> torch.device:
        import torch

        cuda = torch.cuda
        if not cuda.is_available():
            text = "cuda" if index is None else f"cuda:{index}"
            raise ValueError(f"device {text!r} is not available here (torch.cuda.is_available() is False); use 'cpu'")
        i = index if index is not None else int(cuda.current_device())
        if i >= cuda.device_count():
            raise ValueError(f"device 'cuda:{i}' does not exist: {cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", i)

    def owns(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def open_session(self, device: torch.device, budget: int | None, exclude: Iterable[int]) -> CUDASession:
        return CUDASession(device.index or 0, budget)

    def status(self, device: torch.device) -> DeviceStatus:
        cuda, i = _cuda(), device.index or 0
        free, total = cuda.mem_get_info(i)
        info = nvml.gpu_info(i)
        return DeviceStatus(
            "cuda", str(device), int(cuda.memory_allocated(i)), int(cuda.memory_reserved(i)),
            int(total), int(free), cuda.get_device_name(i), info.processes if info else (),
            () if info else ("NVML unavailable: no per-process figures",),
        )

    def capacity(self, device: torch.device) -> int | None:
        return int(_cuda().get_device_properties(device).total_memory)

    def empty_cache(self) -> None:
        cuda = _cuda()
        if cuda.is_available() and cuda.is_initialized():
            cuda.empty_cache()

    def rng_state(self) -> Any:
        cuda = _cuda()
        return cuda.get_rng_state_all() if cuda.is_available() and cuda.is_initialized() else None

    def set_rng_state(self, state: Any) -> None:
        _cuda().set_rng_state_all(state)

    def sample_source(self) -> NVMLSource | TorchCUDASource | None:
        nv = nvml_source()
        if nv is not None:
            return nv
        torch = sys.modules.get("torch")  # never imported (nor CUDA initialised) by the monitor
        return TorchCUDASource() if torch is not None and torch.cuda.is_initialized() else None

    def processes(self, device: torch.device) -> tuple[ProcessMemory, ...]:
        info = nvml.gpu_info(device.index or 0)
        me = os.getpid()
        return () if info is None else tuple(p for p in info.processes if p.pid != me)

    def rank_device(self, local_rank: int) -> torch.device | None:
        import torch

        return torch.device("cuda", local_rank) if local_rank < _cuda().device_count() else None


BACKEND = CUDABackend()

"""CUDA (and ROCm) through torch's caching-allocator counters; NVML for device-wide figures.

Everything here is host-side bookkeeping of the allocator: reading and resetting peak stats
does not synchronise the device, so tracking adds no stall to the training loop.
"""

from __future__ import annotations

import torch

__all__ = ["CUDASession"]


class CUDASession:
    backend = "cuda"

    incomplete: str | None = None

    def __init__(self, index: int, budget: int | None = None) -> None:
        self.index = index
        self.device = f"cuda:{index}"
        self.budget_bytes = budget
        self.notes: list[str] = []
        self._old_fraction: float | None = None
        self._peak = 0
        self._reserved_peak = 0
        self._started = False

    def start(self) -> int:
        i = self.index
        if self.budget_bytes is not None:
            total = torch.cuda.get_device_properties(i).total_memory
            if self.budget_bytes > total:
                self.notes.append(
                    f"the budget ({self.budget_bytes} bytes) is larger than the device ({total} bytes): "
                    "the device is the limit"
                )
            getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
            self._old_fraction = float(getter(i)) if getter is not None else 1.0
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.budget_bytes / total), i)
        torch.cuda.reset_peak_memory_stats(i)
        self._started = True
        base = torch.cuda.memory_allocated(i)
        self._peak = base
        self._reserved_peak = torch.cuda.memory_reserved(i)
        return base

    def current(self) -> int:
        return torch.cuda.memory_allocated(self.index)

    def take_window_peak(self) -> int:
        i = self.index
        p = torch.cuda.max_memory_allocated(i)
        self._reserved_peak = max(self._reserved_peak, torch.cuda.max_memory_reserved(i))
        torch.cuda.reset_peak_memory_stats(i)
        self._peak = max(self._peak, p)
        return p

    def peak(self) -> int:
        return max(self._peak, torch.cuda.max_memory_allocated(self.index))

    def reserved_peak(self) -> int | None:
        return max(self._reserved_peak, torch.cuda.max_memory_reserved(self.index))

    def capacity(self) -> int | None:
        if self.budget_bytes is not None:
            return self.budget_bytes
        return int(torch.cuda.get_device_properties(self.index).total_memory)

    def stop(self) -> None:
        if self._old_fraction is not None:
            old, self._old_fraction = self._old_fraction, None
            torch.cuda.set_per_process_memory_fraction(old, self.index)
        self._started = False

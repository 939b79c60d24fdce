"""Apple's MPS through ``torch.mps``'s counters.

MPS has no peak counter, so the per-window peak is the larger of the live bytes at the window's
two ends: a lower bound, said so in the report's notes.
"""

from __future__ import annotations

import torch

__all__ = ["MPSSession"]


class MPSSession:
    backend = "mps"

    incomplete: str | None = None

    def __init__(self, budget: int | None = None) -> None:
        if budget is not None:
            raise ValueError(
                "--budget is supported on cpu (simulated device) and cuda, not on mps; "
                "use PYTORCH_MPS_HIGH_WATERMARK_RATIO to cap MPS memory"
            )
        self.device = "mps"
        self.budget_bytes: int | None = None
        self.notes = ["mps has no peak counter: peaks are sampled at step boundaries (a lower bound)"]
        self._peak = 0
        self._last = 0
        self._driver_peak = 0

    def start(self) -> int:
        self._last = self._peak = int(torch.mps.current_allocated_memory())
        self._driver_peak = int(torch.mps.driver_allocated_memory())
        return self._last

    def current(self) -> int:
        return int(torch.mps.current_allocated_memory())

    def take_window_peak(self) -> int:
        now = self.current()
        p = max(now, self._last)
        self._last = now
        self._peak = max(self._peak, p)
        self._driver_peak = max(self._driver_peak, int(torch.mps.driver_allocated_memory()))
        return p

    def peak(self) -> int:
        return max(self._peak, self.current())

    def reserved_peak(self) -> int | None:
        return self._driver_peak

    def capacity(self) -> int | None:
        rec = getattr(torch.mps, "recommended_max_memory", None)
        return int(rec()) if rec is not None else None

    def stop(self) -> None:
        return None

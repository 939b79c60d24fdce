"""Device backends: one module per kind of device, all behind :class:`MemorySession`.

A session measures one tracked block on one device: the baseline when it starts, the live
allocated bytes, the peak per window (a training step), and optionally enforces a budget.
``cuda`` reads torch's allocator counters (no device sync), ``mps`` torch.mps's counters, and
``cpu`` is an exact tracker of live tensor storages (see :mod:`gpumagic.backends.cpu`).
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["MemorySession"]


class MemorySession(Protocol):
    """What the step tracker needs from a device. All figures are ints in bytes."""

    backend: str
    """"cuda", "mps" or "cpu"."""
    device: str
    """"cuda:0", "mps", "cpu"."""
    budget_bytes: int | None
    notes: list[str]
    incomplete: str | None
    """Why the figures may miss something (an internal failure kept out of the user's code), else None."""

    def start(self) -> int:
        """Begin measuring; returns the baseline (bytes allocated now)."""

    def current(self) -> int:
        """Bytes allocated now."""

    def peak(self) -> int:
        """Peak allocated since start()."""

    def take_window_peak(self) -> int:
        """Peak allocated since the previous call (or start); starts a new window."""

    def reserved_peak(self) -> int | None:
        """Peak reserved by the caching allocator, where the backend has one."""

    def capacity(self) -> int | None:
        """Device capacity in bytes (the budget when one is set), None when unknown."""

    def stop(self) -> None:
        """Stop measuring and undo every change made by start(); idempotent."""

"""Host memory of this process and of its DataLoader workers, read from the kernel.

On Linux the kernel keeps each process's peak resident memory (``VmHWM`` in
``/proc/PID/status``), and writing ``5`` to ``/proc/self/clear_refs`` resets it to the current
resident size: the peak of any interval is exact and costs a write and a read of two files kept
open (about 7 µs). Elsewhere (or where ``clear_refs`` cannot be written) the resident size is
sampled at interval ends, and :attr:`HostPeak.sampled` says so.

Resetting the mark is process-wide: after a tracked block, ``VmHWM`` and ``ru_maxrss`` give the
peak since the block's last step, not since the process started.

>>> peak = HostPeak()               # doctest: +SKIP
>>> base = peak.start(); work(); peak.take() - base   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["HostPeak", "process_memory"]


def _field(status: bytes, name: bytes) -> int | None:
    """A ``kB`` field of a ``/proc/PID/status`` text, in bytes."""
    i = status.find(name)
    if i < 0:
        return None
    j = status.find(b"kB", i)
    try:
        return int(status[i + len(name) : j]) * 1024
    except ValueError:
        return None


def process_memory(pid: int) -> tuple[int | None, int | None]:
    """(peak resident, private resident) bytes of process ``pid`` now; None where unknown.

    Private is what the process does not share with others (its copy-on-write copies of a forked
    parent's pages, what it allocated): ``Private_Clean + Private_Dirty`` of ``smaps_rollup``.
    """
    peak = private = None
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            peak = _field(f.read(), b"VmHWM:")
    except OSError:
        return None, None
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            text = f.read()
        clean, dirty = _field(text, b"Private_Clean:"), _field(text, b"Private_Dirty:")
        if clean is not None and dirty is not None:
            private = clean + dirty
    except OSError:
        pass
    return peak, private


class HostPeak:
    """Peak resident memory of this process over consecutive intervals.

    :meth:`start` begins the first interval and returns the resident size then (the baseline);
    each :meth:`take` returns the peak since the previous one (or the start) and begins the next.
    """

    def __init__(self, *, exact: bool = True) -> None:
        """``exact=False`` samples even where the kernel's peak could be read (what other systems get)."""
        self._status: int | None = None
        self._clear: int | None = None
        self.sampled = True
        """True when peaks are the resident size sampled at interval ends (a lower bound)."""
        with contextlib.suppress(OSError, AttributeError):
            self._status = os.open("/proc/self/status", os.O_RDONLY)
        if self._status is not None and exact:
            try:
                self._clear = os.open("/proc/self/clear_refs", os.O_WRONLY)
                self.sampled = False
            except OSError:
                self._clear = None

    def _read(self) -> tuple[int | None, int | None]:
        """(VmHWM, VmRSS) now."""
        if self._status is None:
            return None, _psutil_rss()
        try:
            text = os.pread(self._status, 8192, 0)
        except OSError:
            return None, None
        return _field(text, b"VmHWM:"), _field(text, b"VmRSS:")

    def _reset(self) -> None:
        if self._clear is not None:
            try:
                os.write(self._clear, b"5")
            except OSError:
                self.sampled = True
                self._close_clear()

    def start(self) -> int | None:
        """Begin measuring; the resident size now (None when unknown)."""
        self._reset()
        return self._read()[1]

    def take(self) -> int | None:
        """The peak since the last call (or :meth:`start`), and begin the next interval."""
        hwm, rss = self._read()
        if self.sampled:
            return rss
        self._reset()
        return hwm

    def current(self) -> int | None:
        return self._read()[1]

    def _close_clear(self) -> None:
        fd, self._clear = self._clear, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        self._close_clear()
        fd, self._status = self._status, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def _psutil_rss() -> int | None:
    """The resident size where there is no /proc (macOS, Windows), if psutil is installed."""
    try:
        import psutil  # type: ignore[import-untyped]
    except ImportError:
        return None
    try:
        return int(psutil.Process().memory_info().rss)
    except Exception:  # psutil's own errors (AccessDenied, ...) are no reason to fail
        return None

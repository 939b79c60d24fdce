"""The live monitor behind ``%gpumon``: a background thread sampling device memory into a ring buffer.

A :class:`Monitor` asks a *source* (any callable returning :class:`DeviceSample` s) every
``interval`` seconds and keeps the last ten minutes. The default source is the first backend
(:mod:`gpumagic.backends`) that can be sampled now: NVML (every visible NVIDIA GPU, other
processes included), else torch's own CUDA counters (only when this process has already
initialised CUDA: the monitor never does), else MPS, else the CPU (this process's resident
memory against the machine's, plus the live bytes of gpumagic's CPU tracker while one runs).
Nothing here imports torch, IPython or ipywidgets; the panel is drawn by
:func:`gpumagic.render.widgets.monitor_widget`.

>>> mon = Monitor(interval=0.5)   # doctest: +SKIP
>>> mon.start(); ...; mon.stop()  # doctest: +SKIP
"""

from __future__ import annotations

import atexit
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from gpumagic import backends
from gpumagic.backends import SampleSource
from gpumagic.backends.cpu import CPUSource
from gpumagic.options import BadOptions
from gpumagic.report import DeviceSample

__all__ = [
    "MAX_INTERVAL",
    "MIN_INTERVAL",
    "CPUSource",
    "DeviceSample",
    "Monitor",
    "Sample",
    "SampleSource",
    "default_source",
    "nvml_source",
    "running_monitors",
    "stop_all",
]

MIN_INTERVAL = 0.1
MAX_INTERVAL = 60.0
HISTORY_SECONDS = 600.0
"""How much history the ring buffer keeps (at most ``HISTORY_SECONDS / interval`` samples)."""
THREAD_PREFIX = "gpumagic-monitor"


@dataclass(frozen=True)
class Sample:
    """Every device at one moment; ``time`` is ``time.time()``."""

    time: float
    devices: tuple[DeviceSample, ...]
    source: str


def default_source() -> SampleSource:
    """The first registered backend that can be sampled now: NVML, else torch's CUDA counters
    if CUDA is in use, else MPS, else the CPU. Never imports torch nor initialises a device."""
    for backend in backends.registry():
        source = backend.sample_source()
        if source is not None:
            return source
    return CPUSource()


def nvml_source() -> SampleSource | None:
    """An NVML source when a driver answers, else None (no library, no driver, no GPU)."""
    from gpumagic.backends.cuda import nvml_source as make

    return make()


# ---------------------------------------------------------------------------------------------
# the monitor

Callback = Callable[[Sample | None], None]
"""Called from the monitor's thread with each new sample, and with None once it has stopped."""

_REGISTRY: set[Monitor] = set()
_REGISTRY_LOCK = threading.Lock()
_IDS = itertools.count(1)


class Monitor:
    """Samples a source every ``interval`` seconds in a daemon thread; keeps the last ten minutes.

    >>> mon = Monitor(interval=1.0)      # doctest: +SKIP
    >>> mon.start()                      # doctest: +SKIP
    >>> mon.samples()[-1].devices[0]     # doctest: +SKIP
    >>> mon.stop()                       # doctest: +SKIP
    """

    def __init__(
        self,
        interval: float = 1.0,
        source: SampleSource | None = None,
        *,
        history_seconds: float = HISTORY_SECONDS,
    ) -> None:
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not (
            MIN_INTERVAL <= interval <= MAX_INTERVAL
        ):
            raise BadOptions(f"`interval` must be between {MIN_INTERVAL:g} and {MAX_INTERVAL:g} seconds, "
                             f"got {interval!r}")
        if isinstance(history_seconds, bool) or not isinstance(history_seconds, (int, float)) or not (
            history_seconds >= interval
        ):
            raise ValueError(f"history_seconds must be >= interval ({interval:g}), got {history_seconds!r}")
        self.interval = float(interval)
        self.source: SampleSource = source if source is not None else default_source()
        self.id = next(_IDS)
        self._buffer: deque[Sample] = deque(maxlen=max(2, math.ceil(history_seconds / self.interval)))
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._callbacks: list[Callback] = []
        self.last_error: BaseException | None = None
        """The last exception from the source or a callback (the thread keeps sampling)."""

    @property
    def capacity(self) -> int:
        """The most samples kept."""
        return self._buffer.maxlen or 0

    @property
    def is_running(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive()

    @property
    def thread_name(self) -> str:
        return f"{THREAD_PREFIX}-{self.id}"

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return (f"<Monitor {self.id} {state}: {self.source.name} every {self.interval:g} s, "
                f"{len(self._buffer)} samples>")

    # -- sampling -----------------------------------------------------------------------------
    def sample_now(self) -> Sample:
        """Take one sample in the calling thread, store it and return it (no callbacks)."""
        s = Sample(time.time(), tuple(self.source()), self.source.name)
        with self._lock:
            self._buffer.append(s)
        return s

    def samples(self) -> tuple[Sample, ...]:
        """A snapshot of the ring buffer, oldest first."""
        with self._lock:
            return tuple(self._buffer)

    def latest(self) -> Sample | None:
        with self._lock:
            return self._buffer[-1] if self._buffer else None

    # -- callbacks ----------------------------------------------------------------------------
    def add_callback(self, fn: Callback) -> None:
        with self._lock:
            if fn not in self._callbacks:
                self._callbacks.append(fn)

    def remove_callback(self, fn: Callback) -> None:
        with self._lock:
            if fn in self._callbacks:
                self._callbacks.remove(fn)

    def _notify(self, sample: Sample | None) -> None:
        with self._lock:
            callbacks = list(self._callbacks)
        for fn in callbacks:
            try:
                fn(sample)
            except Exception as e:  # a closed panel must not stop the sampling; kept for inspection
                self.last_error = e

    # -- the thread ---------------------------------------------------------------------------
    def start(self) -> Monitor:
        """Start sampling (the first sample is taken at once); a no-op when already running."""
        with _REGISTRY_LOCK:
            if self.is_running:
                return self
            self._stop_event = threading.Event()
            self._thread = threading.Thread(
                target=self._run, args=(self._stop_event,), name=self.thread_name, daemon=True
            )
            _REGISTRY.add(self)
            self._thread.start()
        return self

    def _run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    s = self.sample_now()
                except Exception as e:  # a driver hiccup: record it, try again next period
                    self.last_error = e
                else:
                    self._notify(s)
                stop.wait(self.interval)
        finally:
            self._notify(None)

    def stop(self, timeout: float | None = 5.0) -> bool:
        """Stop sampling and wait for the thread to end; idempotent.

        Returns True when the thread has ended (False only if a source call outlived ``timeout``).
        """
        self._stop_event.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
        ended = t is None or not t.is_alive()
        if ended:
            with _REGISTRY_LOCK:
                _REGISTRY.discard(self)
        return ended

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def running_monitors() -> tuple[Monitor, ...]:
    """Every monitor started and not yet stopped, oldest first."""
    with _REGISTRY_LOCK:
        return tuple(sorted(_REGISTRY, key=lambda m: m.id))


def stop_all(timeout: float | None = 5.0) -> int:
    """Stop every running monitor (``%gpumon --stop``, ``%unload_ext``, interpreter exit).

    Returns how many were running.
    """
    monitors = running_monitors()
    running = sum(m.is_running for m in monitors)
    for m in monitors:
        m.stop(timeout)
    return running


atexit.register(stop_all, 1.0)  # join before the interpreter tears down what a source call uses

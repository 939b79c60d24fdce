"""The live monitor behind ``%gpumon``: a background thread sampling device memory into a ring buffer.

A :class:`Monitor` asks a *source* (any callable returning :class:`DeviceSample` s) every
``interval`` seconds and keeps the last ten minutes. The default source picks what this
machine has: NVML (every visible NVIDIA GPU, other processes included), else torch's own CUDA
counters (only when this process has already initialised CUDA: the monitor never does), else
MPS, else the CPU (this process's resident memory against the machine's, plus the live bytes
of gpumagic's CPU tracker while one runs). Nothing here imports torch, IPython or ipywidgets;
the panel is drawn by :func:`gpumagic.widgets.monitor_widget`.

>>> mon = Monitor(interval=0.5)   # doctest: +SKIP
>>> mon.start(); ...; mon.stop()  # doctest: +SKIP
"""

from __future__ import annotations

import atexit
import itertools
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "MAX_INTERVAL",
    "MIN_INTERVAL",
    "CPUSource",
    "DeviceSample",
    "Monitor",
    "Sample",
    "SampleSource",
    "TorchSource",
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
class DeviceSample:
    """One device at one moment. Bytes are ints; ``None`` means "not known here"."""

    device: str
    """"cuda:0", "mps" or "cpu"."""
    name: str | None
    used_bytes: int | None
    """In use on the device by everyone (for the CPU: the machine's RAM in use)."""
    total_bytes: int | None
    utilization_percent: float | None
    """Busy time in the last sampling period (GPU: NVML's utilisation; CPU: this process's CPU time)."""
    process_bytes: int | None
    """Used by this process (NVML's count for our pid, else what torch's allocator holds; CPU: RSS)."""
    other_bytes: int | None
    """Everything else in use: other processes, the driver, and for NVML the CUDA context overhead."""
    tracked_bytes: int | None = None
    """Live tensor bytes counted by gpumagic's CPU tracker while a tracked cell runs."""


@dataclass(frozen=True)
class Sample:
    """Every device at one moment; ``time`` is ``time.time()``."""

    time: float
    devices: tuple[DeviceSample, ...]
    source: str


class SampleSource(Protocol):
    """What a monitor samples: a callable returning one :class:`DeviceSample` per device.

    ``name`` says where the numbers come from ("nvml", "torch.cuda", "mps", "cpu", or a test's).
    A source is only ever called from one thread at a time.
    """

    name: str

    def __call__(self) -> Sequence[DeviceSample]: ...


# ---------------------------------------------------------------------------------------------
# sources


def _visible_count(nvml: Any) -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        parts = [p.strip() for p in visible.split(",") if p.strip()]
        if all(p.isdigit() for p in parts):
            return len(parts)  # "" hides every GPU
    return int(nvml.nvmlDeviceGetCount())


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

    def __init__(self, nvml: Any, count: int) -> None:
        self._nvml = nvml
        self.count = count

    def __call__(self) -> list[DeviceSample]:
        from gpumagic.backends.nvml import gpu_info

        pid = os.getpid()
        out = []
        for i in range(self.count):
            info = gpu_info(i)
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
    from gpumagic.backends.nvml import gpu_info

    if gpu_info(0) is None:  # initialises NVML once; every failure means "not here"
        return None
    import pynvml

    count = _visible_count(pynvml)
    return NVMLSource(pynvml, count) if count > 0 else None


class TorchSource:
    """torch's counters for CUDA (this process only) or MPS; used when NVML is unavailable.

    Only devices this process already uses are read: asking any other CUDA device for its free
    memory would create a context there (hundreds of MiB).
    """

    def __init__(self, kind: str) -> None:
        if kind not in ("cuda", "mps"):
            raise ValueError(f"kind must be 'cuda' or 'mps', got {kind!r}")
        self.name = "torch.cuda" if kind == "cuda" else "mps"
        self.kind = kind

    def __call__(self) -> list[DeviceSample]:
        torch = sys.modules["torch"]
        if self.kind == "mps":
            mps = torch.mps
            allocated = int(mps.current_allocated_memory())
            driver = int(mps.driver_allocated_memory()) if hasattr(mps, "driver_allocated_memory") else None
            total = int(mps.recommended_max_memory()) if hasattr(mps, "recommended_max_memory") else None
            used = driver if driver is not None else allocated
            return [DeviceSample("mps", "Apple MPS", used, total, None, used, None)]
        cuda = torch.cuda
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


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None  # not Linux: the peak RSS from resource would be mistaken for the current one


def _system_memory() -> tuple[int | None, int | None]:
    """(total, in use) bytes of the machine's RAM; in use is total minus MemAvailable."""
    try:
        total: int | None = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = None
    used = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:") and total is not None:
                    used = total - int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    return total, used


def _tracker_bytes() -> int | None:
    # Only when the CPU backend is already imported: a tracker can't be active otherwise, and
    # importing it would import torch.
    cpu = sys.modules.get("gpumagic.backends.cpu")
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
        total, used = _system_memory()
        other = None if rss is None or used is None else max(0, used - rss)
        return [DeviceSample("cpu", "CPU RAM", used, total, self._utilization(), rss, other, _tracker_bytes())]


def default_source() -> SampleSource:
    """The best source here: NVML, else torch's CUDA or MPS counters if in use, else the CPU."""
    nv = nvml_source()
    if nv is not None:
        return nv
    torch = sys.modules.get("torch")  # never imported (nor CUDA initialised) by the monitor
    if torch is not None:
        if torch.cuda.is_initialized():
            return TorchSource("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available() and hasattr(torch, "mps"):
            return TorchSource("mps")
    return CPUSource()


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
            raise ValueError(f"--interval must be between {MIN_INTERVAL:g} and {MAX_INTERVAL:g} seconds, "
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

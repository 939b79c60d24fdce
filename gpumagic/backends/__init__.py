"""Device backends: one object per kind of device, in one ordered registry.

A :class:`Backend` owns everything gpumagic knows about one kind of device: whether it is
here, which ``torch.device`` a name like ``"cuda:1"`` means, a measuring session with an
optional budget, the device's status and capacity, emptying its cache, its RNG state, a
source of samples for the live monitor, and the processes holding its memory. Everything
else (tracking, the batch search, the monitor, the magics) loops over :func:`registry` and
never branches on a device name.

Order matters: the first available backend is the default device (cuda, then mps, then cpu).
Adding a device is one module with a ``BACKEND`` object and one :func:`register` call::

    from gpumagic import backends
    backends.register(MyBackend())      # after the built-ins; or index=0 to come first

Importing this package is cheap: it never imports torch (the monitor runs without it).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from gpumagic.report import DeviceSample, DeviceStatus, ProcessMemory

__all__ = ["Backend", "MemorySession", "SampleSource", "get", "register", "registry", "unregister"]


class MemorySession(Protocol):
    """What the step tracker needs from a device while a block runs. All figures are ints in bytes."""

    backend: str
    """The backend's name: "cuda", "mps", "cpu"."""
    device: str
    """"cuda:0", "mps", "cpu"."""
    budget_bytes: int | None
    incomplete: str | None
    """Why the figures may miss something (an internal failure kept out of the user's code), else None."""

    @property
    def notes(self) -> list[str]:
        """What the report should say about this measurement (limits, approximations)."""

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


class SampleSource(Protocol):
    """What a monitor samples: a callable returning one :class:`DeviceSample` per device.

    ``name`` says where the numbers come from ("nvml", "torch.cuda", "mps", "cpu", or a test's).
    A source is only ever called from one thread at a time.
    """

    name: str

    def __call__(self) -> Sequence[DeviceSample]: ...


class Backend(Protocol):
    """One kind of device. Methods that take a device get one this backend's :meth:`parse` made."""

    name: str
    """The word users write: ``-d cuda:1`` selects the backend named "cuda"."""
    session_enforces_capacity: bool
    """True when the device has no allocator limit of its own (cpu): a batch-size search then
    hands the capacity to the session as a budget, and says so in a note."""
    plans_on_fake_tensors: bool
    """True when a dry run (:mod:`gpumagic.dryrun`) can stand in for this device, so a real search
    may plan on fake tensors first. Optional: a backend without it is never planned for."""

    def available(self) -> bool:
        """Whether this device can be used in this process (never initialises it)."""

    def parse(self, index: int | None) -> torch.device:
        """The device ``name[:index]`` means here; ValueError naming the device when it is not here."""

    def owns(self, device: torch.device) -> bool:
        """Whether tensors on ``device`` are this backend's (to follow a model's device)."""

    def open_session(self, device: torch.device, budget: int | None, exclude: Iterable[int]) -> MemorySession:
        """A not-yet-started measuring session; ``exclude``: storages that are gpumagic's own."""

    def status(self, device: torch.device) -> DeviceStatus:
        """The device now: allocated, reserved, total, free, processes."""

    def capacity(self, device: torch.device) -> int | None:
        """What the device can hold (cpu: the host memory free now), None when unknown."""

    def empty_cache(self) -> None:
        """Return cached blocks to the driver, if this device is in use; never initialises it."""

    def rng_state(self) -> Any:
        """This device's RNG state to restore later, or None when there is none to save."""

    def set_rng_state(self, state: Any) -> None:
        """Restore what :meth:`rng_state` returned (never None)."""

    def sample_source(self) -> SampleSource | None:
        """A monitor source for this device when it can be sampled now without initialising it."""

    def processes(self, device: torch.device) -> tuple[ProcessMemory, ...]:
        """Other processes holding memory on ``device`` (empty when unknown)."""


_BUILTIN = ("gpumagic.backends.cuda", "gpumagic.backends.mps", "gpumagic.backends.host")
_REGISTRY: list[Backend] = []


def _load() -> list[Backend]:
    if not _REGISTRY:
        _REGISTRY.extend(importlib.import_module(m).BACKEND for m in _BUILTIN)
    return _REGISTRY


def registry() -> tuple[Backend, ...]:
    """Every registered backend, in order of preference."""
    return tuple(_load())


def register(backend: Backend, index: int | None = None) -> None:
    """Add ``backend`` (at the end, or at ``index``); a backend of the same name is replaced."""
    reg = _load()
    unregister(backend.name)
    reg.insert(len(reg) if index is None else index, backend)


def unregister(name: str) -> Backend | None:
    """Remove the backend called ``name``; returns it (None when there was none)."""
    reg = _load()
    for b in reg:
        if b.name == name:
            reg.remove(b)
            return b
    return None


def get(name: str) -> Backend | None:
    """The backend called ``name``, or None."""
    return next((b for b in _load() if b.name == name), None)

"""Device backends: one object per kind of device, in one ordered registry.

A :class:`Backend` owns everything gpumagic knows about one kind of device: whether it is
here, which ``torch.device`` a name like ``"cuda:1"`` means, a measuring session with an
optional budget, the device's status and capacity, emptying its cache, its RNG state, a
source of samples for the live monitor, the processes holding its memory, which device a
local rank uses, which words of an out-of-memory message name it, and what a dry run needs to
plan for it (:class:`DryRunTarget`). Everything else (tracking, the dry run, the batch search,
the monitor, the magics) loops over :func:`registry` and never branches on a device name.

Order matters: the first available backend is the default device (cuda, then mps, then cpu).
Adding a device is one module with a ``BACKEND`` object and one :func:`register` call::

    from gpumagic import backends
    backends.register(MyBackend())      # after the built-ins; or index=0 to come first

The optional members (:data:`OPTIONAL`) have their defaults in :class:`BackendBase`; a backend
that does not subclass it gets every missing one from :func:`register`, so the rest of gpumagic
reads them as plain attributes of any registered backend.

Importing this package is cheap: it never imports torch (the monitor runs without it).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

if TYPE_CHECKING:
    import torch

    from gpumagic.gpus import GPU
    from gpumagic.report import DeviceSample, DeviceStatus, ProcessMemory

__all__ = [
    "OPTIONAL", "Backend", "BackendBase", "BackendCore", "DryRunTarget", "MemorySession", "PeakWindows",
    "PlannedMemory", "SampleSource", "dry_run_target", "get", "register", "registry", "unregister",
]


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


class PeakWindows:
    """The peak bookkeeping of a session that counts bytes itself (the cpu tracker, the dry run).

    The session keeps ``_cur`` (bytes live now) and raises ``_wpeak`` when ``_cur`` passes it;
    ``_peak`` holds the highest of the windows already taken.
    """

    _cur = 0
    _wpeak = 0
    _peak = 0

    def current(self) -> int:
        return self._cur

    def take_window_peak(self) -> int:
        p = self._wpeak
        if p > self._peak:
            self._peak = p
        self._wpeak = self._cur
        return p

    def peak(self) -> int:
        return max(self._peak, self._wpeak)


class SampleSource(Protocol):
    """What a monitor samples: a callable returning one :class:`DeviceSample` per device.

    ``name`` says where the numbers come from ("nvml", "torch.cuda", "mps", "cpu", or a test's).
    A source is only ever called from one thread at a time.
    """

    name: str

    def __call__(self) -> Sequence[DeviceSample]: ...


class PlannedMemory(Protocol):
    """The figures of a dry run's session (:class:`gpumagic.dryrun.FakeSession`), in bytes, that a
    stand-in's answers read while the code runs."""

    def current(self) -> int: ...

    def peak(self) -> int: ...

    def reserved(self) -> int | None: ...

    def reserved_peak(self) -> int | None: ...

    def capacity(self) -> int | None: ...


class DryRunTarget(Protocol):
    """What a dry run (:mod:`gpumagic.dryrun`) needs from a device kind it plans memory for.

    A plan runs the code on fake tensors. Where fake tensors of the device cannot exist here, fake
    CPU tensors *stand in* for them and the device's own API answers as the planned device::

        target = backends.get("cuda").dry_run
        target.stands_in()        # True on a machine without CUDA
    """

    host: bool
    """The planned memory is the host's, where fake tensors live (cpu): real CPU tensors held
    before the block count toward the baseline, and nothing stands in."""
    caching_allocator: bool
    """Memory goes through a caching allocator: a model of it (:mod:`gpumagic._allocator`) rounds
    sizes and predicts reserved memory."""
    named_gpu: bool
    """A catalog GPU (``--gpu T4``, :mod:`gpumagic.gpus`) can be planned for on this device."""
    foreach_optimizers: bool
    """Optimizers take their foreach implementation by default here (torch's choice for this
    device's tensors): the plan makes them take it on fake CPU tensors too."""
    fused_attention: bool
    """scaled_dot_product_attention runs a fused kernel picked by GPU and dtype: the plan's notes
    name the one it assumed."""
    moves_from: tuple[str, ...]
    """Other device types whose moves in the code (``.to("cuda")``) land on this device while
    it is stood in for."""
    notes: tuple[str, ...]
    """What every plan for this device says about its approximations."""

    def stands_in(self) -> bool:
        """Whether fake CPU tensors stand in for this device's (cuda without CUDA, mps); False when
        fake tensors of the device itself can exist here, or the device is the host."""

    def kernels_refuse_fakes(self) -> bool:
        """Whether a fake tensor of this device would fail in a kernel here (cuda without CUDA: a
        CPU build aborts), so a stand-in refuses such a tensor before it reaches one."""

    def standin_patches(self, memory: PlannedMemory, gpu: GPU | None) -> list[tuple[Any, str, Any]]:
        """(owner, attribute, value) to set while the code runs on a stand-in, each restored after:
        the device module's queries answered for the planned device (``gpu``, else ``memory``'s
        capacity), its autocast run on the CPU. Empty when nothing needs answering."""


class BackendCore(Protocol):
    """The members every backend must have; :class:`Backend` adds the optional ones. Methods that
    take a device get one this backend's :meth:`parse` made."""

    name: str
    """The word users write: ``-d cuda:1`` selects the backend named "cuda"."""
    session_enforces_capacity: bool
    """True when the device has no allocator limit of its own (cpu): a batch-size search then
    hands the capacity to the session as a budget, and says so in a note."""

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


class Backend(BackendCore, Protocol):
    """One kind of device, with the optional members (defaults in :class:`BackendBase`; every
    backend in the :func:`registry` has them all)."""

    plans_on_fake_tensors: bool
    """True when a real search on this device may plan on fake tensors first (its dry run is close
    enough to pick the sizes to verify). Optional: a backend without it is never planned for."""
    indexed: bool
    """There can be several of this device, named ``name:N`` (cuda); else ``name`` is the one
    device. Optional: False when absent."""
    oom_device_types: tuple[str, ...]
    """The ``device_type`` words of a parsed out-of-memory message (:class:`gpumagic.oom.OOMInfo`)
    that mean this device: advice after such an error inspects and measures it. Optional: none."""
    dry_run: DryRunTarget | None
    """How a dry run plans memory for this device; None: it cannot be planned for. Optional: None."""
    loader_pin_memory: bool
    """Whether a DataLoader feeding this device should pin its batches (``pin_memory=True``: the
    copy to the device is faster and can be asynchronous); loader advice says so. Optional: False."""

    def processes(self, device: torch.device) -> tuple[ProcessMemory, ...]:
        """Other processes holding memory on ``device`` (empty when unknown)."""

    def rank_device(self, local_rank: int) -> torch.device | None:
        """The device local rank ``local_rank`` of a multi-process run measures when this backend
        was named without an index (cuda: the rank's own GPU, when there is one); None: the device
        named for all ranks. Optional: None when absent."""


class BackendBase:
    """The defaults of a backend's optional members: subclass it and set only what differs.

    A backend that does not subclass it gets the same defaults from :func:`register`.
    """

    plans_on_fake_tensors = False
    indexed = False
    oom_device_types: tuple[str, ...] = ()
    dry_run: DryRunTarget | None = None
    loader_pin_memory = False

    def processes(self, device: torch.device) -> tuple[ProcessMemory, ...]:
        return ()

    def rank_device(self, local_rank: int) -> torch.device | None:
        return None


OPTIONAL = ("plans_on_fake_tensors", "indexed", "oom_device_types", "dry_run", "loader_pin_memory", "processes",
            "rank_device")
"""The members of :class:`Backend` a backend may leave out: :class:`BackendBase` has their defaults."""


def _complete(backend: BackendCore) -> Backend:
    """``backend`` itself, given each optional member it lacks (the default of :class:`BackendBase`,
    a method bound to it); TypeError naming the member when the object takes no new attributes."""
    for member in OPTIONAL:
        if hasattr(backend, member):
            continue
        default = getattr(BackendBase, member)
        value = default.__get__(backend) if callable(default) else default
        try:
            setattr(backend, member, value)
        except (AttributeError, TypeError) as e:
            raise TypeError(
                f"backend {backend.name!r} has no {member!r} and cannot be given the default ({e}): "
                f"define it, or subclass gpumagic.backends.BackendBase"
            ) from None
    return cast("Backend", backend)  # every optional member is there now


_BUILTIN = ("gpumagic.backends.cuda", "gpumagic.backends.mps", "gpumagic.backends.cpu")
_REGISTRY: list[Backend] = []


def _load() -> list[Backend]:
    if not _REGISTRY:
        # all or nothing: a Ctrl-C between two imports must not leave a registry of the first only
        loaded = [importlib.import_module(m).BACKEND for m in _BUILTIN]
        _REGISTRY[:] = loaded
    return _REGISTRY


def registry() -> tuple[Backend, ...]:
    """Every registered backend, in order of preference."""
    return tuple(_load())


def register(backend: BackendCore, index: int | None = None) -> None:
    """Add ``backend`` (at the end, or at ``index``); a backend of the same name is replaced.
    Each optional member it lacks is set on it with its default (:class:`BackendBase`)."""
    completed = _complete(backend)
    reg = _load()
    unregister(completed.name)
    reg.insert(len(reg) if index is None else index, completed)


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


def dry_run_target(backend: Backend) -> DryRunTarget | None:
    """``backend``'s dry-run target, None when it cannot be planned for (also when it has none)."""
    return backend.dry_run

"""Choosing a device, opening a measuring session on it, and the device's state right now.

Device-specific knowledge lives in :mod:`gpumagic.backends`; this module loops over the registry.

Nothing here initialises CUDA unless a CUDA device is asked for (or is the default because one
exists and the caller's tensors live there).
"""

from __future__ import annotations

import dataclasses
import gc
import re
import traceback
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

import torch

from gpumagic import backends
from gpumagic._tensors import is_fake, storages
from gpumagic._units import format_bytes, parse_size
from gpumagic.backends import Backend, MemorySession
from gpumagic.report import DeviceStatus

__all__ = [
    "device_label",
    "device_status",
    "free_memory",
    "holders",
    "open_session",
    "release_memory",
    "resolve",
    "resolve_budget",
    "resolve_device",
    "storage_bytes",
]

_DEVICE_RE = re.compile(r"^([a-z_]+)(?::(\d+))?$")
DeviceLike = str | torch.device | torch.nn.Module | torch.Tensor | None


def _device_of(obj: Any, measurable_only: bool = False) -> torch.device | None:
    """The device of a tensor or model; with ``measurable_only``, meta and fake tensors (no memory
    on any device: shapes for tracing, a model not yet materialised) say nothing."""

    def ok(t: torch.Tensor) -> bool:
        return not measurable_only or (_DEVICE_RE.match(t.device.type) is not None and not is_fake(t))

    if isinstance(obj, torch.Tensor):
        return obj.device if ok(obj) else None
    if isinstance(obj, torch.nn.Module):
        for p in obj.parameters():
            if ok(p):
                return p.device
        for b in obj.buffers():
            if ok(b):
                return b.device
    return None


def _owner(device: torch.device) -> Backend | None:
    return next((b for b in backends.registry() if b.owns(device)), None)


def _allowed() -> str:
    names = ", ".join(repr(b.name) for b in backends.registry())
    return f"one of {names} (with ':N' for an index)"


def resolve(device: DeviceLike = None, hints: Iterable[Any] = ()) -> tuple[Backend, torch.device]:
    """The backend and device to measure; see :func:`resolve_device`."""
    if isinstance(device, (torch.nn.Module, torch.Tensor)):
        found = _device_of(device)
        device = found if found is not None else torch.device("cpu")
    if device is None:
        order = {b.name: i for i, b in enumerate(backends.registry())}
        best: tuple[int, Backend, torch.device] | None = None
        for h in hints:
            d = _device_of(h, measurable_only=True)
            owner = None if d is None else _owner(d)
            if d is not None and owner is not None and (best is None or order[owner.name] < best[0]):
                best = (order[owner.name], owner, d)
        if best is not None:
            return best[1], best[1].parse(best[2].index)
        for b in backends.registry():
            if b.available():
                return b, b.parse(None)
        raise ValueError("no device is available: no registered backend answers")
    if isinstance(device, torch.device):
        owner = _owner(device)
        if owner is None:
            raise ValueError(f"device must be {_allowed()}, got {str(device)!r}")
        return owner, owner.parse(device.index)
    text = str(device)
    m = _DEVICE_RE.match(text)
    backend = backends.get(m.group(1)) if m else None
    if m is None or backend is None:
        raise ValueError(f"device must be {_allowed()}, got {text!r}")
    return backend, backend.parse(None if m.group(2) is None else int(m.group(2)))


def resolve_device(device: DeviceLike = None, hints: Iterable[Any] = ()) -> torch.device:
    """The device to measure.

    ``device`` may be a string ("cpu", "cuda", "cuda:1", "mps", or any registered backend's
    name), a ``torch.device``, or a model/tensor whose device is used. Without one, the device
    of the first model or tensor in ``hints`` that is on an accelerator wins; then the CPU if
    hints were all on the CPU; then the first available backend (cuda, else mps, else cpu).

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    return resolve(device, hints)[1]


def device_label(backend: Backend | None, device: torch.device) -> str:
    """How reports name ``device``: "cuda:0", "mps", "cpu", or a registered backend's name."""
    if backend is None:
        return str(device)
    return backend.name if device.index is None else f"{backend.name}:{device.index}"


def resolve_budget(budget: str | int | None, name: str = "budget") -> int | None:
    """Bytes of a budget given as "2GiB", "800MB" or bytes; ``name`` is what error messages call it."""
    return None if budget is None else parse_size(budget, name=name)


def open_session(device: torch.device, budget: int | None = None, exclude: Iterable[int] = ()) -> MemorySession:
    """A not-yet-started measuring session for ``device``."""
    backend = _owner(device)
    if backend is None:
        raise ValueError(f"no backend measures {device}")
    return backend.open_session(device, budget, exclude)


def storage_bytes(t: Any, device: torch.device, seen: set[int]) -> int:
    """Bytes of the buffers of ``t`` (a tensor on ``device``) not in ``seen`` (then added), else 0.

    Sparse tensors count their indices and values; fake and unreadable (opaque) tensors count 0.
    """
    if not isinstance(t, torch.Tensor):
        return 0
    try:
        if t.device.type != device.type or (device.index is not None and t.device.index not in (None, device.index)):
            return 0
        parts = storages(t)
    except Exception:  # a subclass whose attributes raise
        return 0
    n = 0
    for key, st in parts or ():
        if key not in seen:
            seen.add(key)
            n += int(st.nbytes())
    return n


def _tensors_in(value: Any, depth: int = 0) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, torch.nn.Module):
        yield from value.parameters()
        yield from value.buffers()
        for p in value.parameters():
            if p.grad is not None:
                yield p.grad
    elif isinstance(value, torch.optim.Optimizer):
        for state in value.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    yield v
    elif depth < 2 and isinstance(value, (list, tuple)):
        for v in value[:10_000]:
            yield from _tensors_in(v, depth + 1)
    elif depth < 2 and isinstance(value, Mapping):
        for v in list(value.values())[:10_000]:
            yield from _tensors_in(v, depth + 1)


def holders(namespace: Mapping[str, Any], device: torch.device, top: int = 5) -> list[tuple[str, int]]:
    """Names in ``namespace`` that hold the most memory on ``device``: [(name, bytes)], largest first.

    Tensors, models (parameters, buffers, gradients), optimizers (state) and lists/dicts of them
    are counted; a storage shared by two names counts for each.
    """
    out = []
    for name, value in list(namespace.items()):
        if name.startswith("_") or isinstance(value, type) or (callable(value) and not isinstance(
            value, torch.nn.Module
        )):
            continue
        seen: set[int] = set()
        n = sum(storage_bytes(t, device, seen) for t in _tensors_in(value))
        if n:
            out.append((name, n))
    out.sort(key=lambda kv: -kv[1])
    return out[:top]


def device_status(device: DeviceLike = None) -> DeviceStatus:
    """The device now: allocated / reserved / total / free and, through NVML, GPU processes."""
    backend, dev = resolve(device)
    return backend.status(dev)


def release_memory(exc: BaseException | None) -> None:
    """Free what a failed block's frames hold (their locals keep the tensors alive), collect
    garbage and return cached blocks. The traceback itself stays usable (``%tb`` still works)."""
    if exc is not None:
        ctx: BaseException | None = exc
        while ctx is not None and ctx.__traceback__ is not None:
            traceback.clear_frames(ctx.__traceback__)
            tb: TracebackType | None = ctx.__traceback__
            while tb is not None:
                # a frame whose locals were read (a traceback formatter showing arguments, a
                # debugger) keeps a snapshot dict that clear() leaves (CPython < 3.13); reading
                # f_locals again re-syncs it with the now empty locals, dropping the tensors
                tb.tb_frame.f_locals  # noqa: B018
                tb = tb.tb_next
            ctx = ctx.__context__
    gc.collect()
    for backend in backends.registry():
        backend.empty_cache()


def free_memory(namespace: Mapping[str, Any] | None = None, device: DeviceLike = None) -> DeviceStatus:
    """Collect garbage, return cached blocks to the driver, and report what is still held.

    ``%gpumem --free`` runs this; the names still holding memory are listed in the notes.
    """
    backend, dev = resolve(device)
    gc.collect()
    backend.empty_cache()
    status = backend.status(dev)
    if namespace is not None:
        held = holders(namespace, dev)
        extra = tuple(f"still held by {name!r}: {format_bytes(n)}" for name, n in held)
        status = dataclasses.replace(status, notes=status.notes + extra)
    return status

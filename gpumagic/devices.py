"""Choosing a device, opening a measuring session on it, and the device's state right now.

Nothing here initialises CUDA unless a CUDA device is asked for (or is the default because one
exists and the caller's tensors live there).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import re
import traceback
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from gpumagic._tensors import is_fake, storages
from gpumagic._units import parse_size
from gpumagic.backends import MemorySession
from gpumagic.report import DeviceStatus, ProcessMemory

__all__ = [
    "device_status",
    "free_memory",
    "holders",
    "open_session",
    "release_memory",
    "resolve_budget",
    "resolve_device",
    "storage_bytes",
]

_DEVICE_RE = re.compile(r"^(cpu|mps|cuda)(?::(\d+))?$")
DeviceLike = str | torch.device | torch.nn.Module | torch.Tensor | None


def _cuda_ok() -> bool:
    return bool(torch.cuda.is_available())


def _mps_ok() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


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


def resolve_device(device: DeviceLike = None, hints: Iterable[Any] = ()) -> torch.device:
    """The device to measure.

    ``device`` may be a string ("cpu", "cuda", "cuda:1", "mps"), a ``torch.device``, or a
    model/tensor whose device is used. Without one, the device of the first model or tensor in
    ``hints`` that is not on the CPU wins (meta and fake tensors are ignored); then CPU if hints
    were all on the CPU; then cuda if available, else mps, else cpu.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if isinstance(device, (torch.nn.Module, torch.Tensor)):
        found = _device_of(device)
        device = found if found is not None else torch.device("cpu")
    if device is None:
        seen_cpu = False
        for h in hints:
            d = _device_of(h, measurable_only=True)
            if d is None:
                continue
            if d.type != "cpu":
                device = d
                break
            seen_cpu = True
        else:
            device = "cpu" if seen_cpu else ("cuda" if _cuda_ok() else "mps" if _mps_ok() else "cpu")
    text = str(device)
    m = _DEVICE_RE.match(text)
    if m is None:
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {text!r}")
    kind, index = m.group(1), m.group(2)
    if kind == "cuda":
        if not _cuda_ok():
            raise ValueError(f"device {text!r} is not available here (torch.cuda.is_available() is False); use 'cpu'")
        i = int(index) if index is not None else torch.cuda.current_device()
        if i >= torch.cuda.device_count():
            raise ValueError(f"device {text!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", i)
    if kind == "mps":
        if not _mps_ok():
            raise ValueError(f"device {text!r} is not available here (torch.backends.mps.is_available() is False)")
        return torch.device("mps")
    if index not in (None, "0"):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {text!r}")
    return torch.device("cpu")


def resolve_budget(budget: str | int | None, name: str = "budget") -> int | None:
    """Bytes of a budget given as "2GiB", "800MB" or bytes; ``name`` is what error messages call it."""
    return None if budget is None else parse_size(budget, name=name)


def open_session(device: torch.device, budget: int | None = None, exclude: Iterable[int] = ()) -> MemorySession:
    """A not-yet-started measuring session for ``device``."""
    if device.type == "cuda":
        from gpumagic.backends.cuda import CUDASession

        return CUDASession(device.index or 0, budget)
    if device.type == "mps":
        from gpumagic.backends.mps import MPSSession

        return MPSSession(budget)
    from gpumagic.backends.cpu import CPUSession

    return CPUSession(budget, exclude=exclude)


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


def _host_memory() -> tuple[int | None, int | None]:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        return int(total), int(avail)
    except (ValueError, OSError, AttributeError):
        return None, None


def device_status(device: DeviceLike = None) -> DeviceStatus:
    """The device now: allocated / reserved / total / free and, through NVML, GPU processes."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        from gpumagic.backends import nvml

        i = dev.index or 0
        free, total = torch.cuda.mem_get_info(i)
        info = nvml.gpu_info(i)
        procs = tuple(ProcessMemory(p.pid, p.used_bytes, p.name) for p in info.processes) if info else ()
        notes = () if info else ("NVML unavailable: no per-process figures",)
        return DeviceStatus(
            "cuda", str(dev), int(torch.cuda.memory_allocated(i)), int(torch.cuda.memory_reserved(i)),
            int(total), int(free), torch.cuda.get_device_name(i), procs, notes,
        )
    if dev.type == "mps":
        rec = getattr(torch.mps, "recommended_max_memory", None)
        total_mps = int(rec()) if rec is not None else None
        alloc = int(torch.mps.current_allocated_memory())
        driver = int(torch.mps.driver_allocated_memory())
        return DeviceStatus(
            "mps", "mps", alloc, driver, total_mps,
            None if total_mps is None else total_mps - driver, "Apple GPU",
        )
    from gpumagic.backends.cpu import live_storages

    allocated = sum(int(st.nbytes()) for st in live_storages("cpu").values())
    total_host, avail = _host_memory()
    return DeviceStatus(
        "cpu", "cpu", allocated, None, total_host, avail, "host memory",
        notes=("allocated = live CPU tensor storages reachable from Python; total/free = host RAM",),
    )


def release_memory(exc: BaseException | None) -> None:
    """Free what a failed block's frames hold (their locals keep the tensors alive), collect
    garbage and return cached blocks. The traceback itself stays usable (``%tb`` still works)."""
    if exc is not None:
        ctx: BaseException | None = exc
        while ctx is not None and ctx.__traceback__ is not None:
            traceback.clear_frames(ctx.__traceback__)
            ctx = ctx.__context__
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    if _mps_ok():
        torch.mps.empty_cache()


def free_memory(namespace: Mapping[str, Any] | None = None, device: DeviceLike = None) -> DeviceStatus:
    """Collect garbage, return cached blocks to the driver, and report what is still held.

    ``%gpumem --free`` runs this; the names still holding memory are listed in the notes.
    """
    dev = resolve_device(device)
    gc.collect()
    if dev.type == "cuda" and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    elif dev.type == "mps":
        torch.mps.empty_cache()
    status = device_status(dev)
    if namespace is not None:
        held = holders(namespace, dev)
        from gpumagic._units import format_bytes

        extra = tuple(f"still held by {name!r}: {format_bytes(n)}" for name, n in held)
        status = dataclasses.replace(status, notes=status.notes + extra)
    return status

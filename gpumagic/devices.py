"""Choosing a device, opening a measuring session on it, and the device's state right now.

Device-specific knowledge lives in :mod:`gpumagic.backends`; this module loops over the registry.

Nothing here initialises CUDA unless a CUDA device is asked for (or is the default because one
exists and the caller's tensors live there).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import re
import traceback
import weakref
from collections.abc import Iterable, Mapping, MutableMapping
from types import FrameType, FunctionType, TracebackType
from typing import Any

import torch

from gpumagic import backends
from gpumagic._tensors import is_fake, storages
from gpumagic.backends import Backend, MemorySession
from gpumagic.report import DeviceStatus
from gpumagic.units import format_bytes, parse_size

__all__ = [
    "Bindings",
    "device_label",
    "device_status",
    "free_memory",
    "holders",
    "open_session",
    "release_memory",
    "release_names",
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


def _clear_call_closure(frame: FrameType) -> None:
    """Empty the closure of torch's per-call ``Module._call_impl.<locals>.inner`` (the path a
    module call takes while a global hook is registered): it holds the call's arguments, and
    its frame keeps the function, so clearing the frame leaves the inputs of the failed call
    alive (the next run at a size that fits would run out of memory on them)."""
    code = frame.f_code
    if getattr(code, "co_qualname", code.co_name) != "Module._call_impl.<locals>.inner":
        return
    for fn in gc.get_referents(frame):
        if isinstance(fn, FunctionType) and fn.__code__ is code:
            for cell in fn.__closure__ or ():
                with contextlib.suppress(ValueError):  # already empty
                    del cell.cell_contents


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
                _clear_call_closure(tb.tb_frame)
                tb = tb.tb_next
            ctx = ctx.__context__
    gc.collect()
    for backend in backends.registry():
        backend.empty_cache()


_PLAIN = (int, float, complex, str, bytes, bool, type(None))
_SHELL_NAMES = frozenset({"In", "Out", "exit", "quit", "get_ipython"})


class Bindings:
    """Which object each name of a namespace is bound to, without keeping the objects alive.

    Taken before a cell runs, it tells which names the cell bound or rebound (also from inside
    functions, through ``global``) and what they were bound to before, when that still exists.
    Plain values (numbers, strings) are kept, objects by weak reference, the rest by identity.

    >>> b = Bindings({"x": 1}); b.same("x", 1), b.same("y", 2)
    (True, False)
    """

    __slots__ = ("_no_grad", "_refs", "_stateful")

    def __init__(self, namespace: Mapping[str, Any]) -> None:
        self._refs: dict[str, tuple[int, Any, bool]] = {}  # name -> (id, weakref or plain value, plain)
        self._no_grad: dict[str, frozenset[int]] = {}  # model name -> parameters without a gradient
        self._stateful: dict[str, frozenset[int]] = {}  # optimizer name -> parameters with state
        for name, value in list(namespace.items()):
            if name.startswith("_"):
                continue
            if isinstance(value, torch.nn.Module):
                self._no_grad[name] = frozenset(id(p) for p in value.parameters() if p.grad is None)
            elif isinstance(value, torch.optim.Optimizer):
                self._stateful[name] = frozenset(id(p) for p in value.state)
            if isinstance(value, _PLAIN):  # plain values hold no device memory: keep them
                self._refs[name] = (id(value), value, True)
                continue
            try:
                ref: Any = weakref.ref(value)
            except TypeError:  # lists, dicts, tuples: identity only
                ref = None
            self._refs[name] = (id(value), ref, False)

    def same(self, name: str, value: Any) -> bool:
        """Whether ``name`` is still bound to the object it was bound to before."""
        entry = self._refs.get(name)
        if entry is None:
            return False
        ident, ref, plain = entry
        if plain:
            return ref is value
        if ref is not None:
            return bool(ref() is value)
        return ident == id(value)

    def previous(self, name: str) -> tuple[bool, Any]:
        """(True, the value before) when the name was bound to an object that still exists."""
        entry = self._refs.get(name)
        if entry is None:
            return False, None
        _, ref, plain = entry
        if plain:
            return True, ref
        value = ref() if ref is not None else None
        return value is not None, value


def _graph_tensors(t: torch.Tensor, limit: int = 100_000) -> Iterable[torch.Tensor]:
    """Tensors an autograd graph saved for backward (activations), reached from ``t``'s grad_fn."""
    fn = t.grad_fn
    if fn is None:
        return
    seen: set[int] = set()
    todo = [fn]
    while todo and len(seen) < limit:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for attr in dir(node):
            if not attr.startswith("_saved_"):
                continue
            try:
                saved = getattr(node, attr)
            except Exception:  # freed by a backward that ran, or not a tensor
                continue
            for v in saved if isinstance(saved, (tuple, list)) else (saved,):
                if isinstance(v, torch.Tensor):
                    yield v
        todo.extend(nxt for nxt, _ in getattr(node, "next_functions", ()))


def release_names(
    namespace: MutableMapping[str, Any], before: Bindings, device: torch.device
) -> tuple[tuple[str, int], ...]:
    """After an out-of-memory error: release the names a failed cell bound that hold memory on ``device``.

    A name the cell bound or rebound (``out``, ``loss``, a batch, a list of outputs) whose value
    holds tensors on the device is put back to its value from before the cell when that still
    exists, and deleted otherwise; its autograd graph goes with it. Names the cell only used (the
    model, the data, the optimizer) are left alone. Returns ``(name, bytes)`` per released name:
    the bytes only it held (tensors and saved activations), not counting what kept names share.
    """
    changed = [
        n for n, v in list(namespace.items())
        if not n.startswith("_") and n not in _SHELL_NAMES and not before.same(n, v)
    ]
    holding: list[tuple[str, list[torch.Tensor]]] = []
    for name in changed:
        tensors = [t for t in _tensors_in(namespace[name]) if _on(t, device)]
        if tensors:
            holding.append((name, tensors))
    added = _drop_added_state(namespace, before, device)
    if not holding:
        return added
    released = {n for n, _ in holding}
    seen: set[int] = set()
    for name, value in list(namespace.items()):  # what kept names hold is not freed by releasing
        if name not in released and not name.startswith("_"):
            for t in _tensors_in(value):
                storage_bytes(t, device, seen)
    out = []
    for name, tensors in holding:
        n = 0
        for t in tensors:
            n += storage_bytes(t, device, seen)
            n += sum(storage_bytes(s, device, seen) for s in _graph_tensors(t))
        out.append((name, n))
        found, value = before.previous(name)
        if found:
            namespace[name] = value
        else:
            del namespace[name]
    return tuple(out) + added


def _drop_added_state(
    namespace: MutableMapping[str, Any], before: Bindings, device: torch.device
) -> tuple[tuple[str, int], ...]:
    """Gradients and optimizer state that a failed cell added to the models and optimizers it used.

    They did not exist before the cell (an OOM in the first ``backward()`` or in Adam's first
    ``step()`` leaves some): dropping them puts the memory back; what existed before stays.
    """
    out = []
    for name, value in list(namespace.items()):
        if not before.same(name, value):
            continue
        seen: set[int] = set()
        n = 0
        if isinstance(value, torch.nn.Module) and name in before._no_grad:
            had_none = before._no_grad[name]
            for p in value.parameters():
                if p.grad is not None and id(p) in had_none and _on(p.grad, device):
                    n += storage_bytes(p.grad, device, seen)
                    p.grad = None
            what = "gradients"
        elif isinstance(value, torch.optim.Optimizer) and name in before._stateful:
            had_state = before._stateful[name]
            for key in [k for k in value.state if id(k) not in had_state]:
                n += sum(storage_bytes(t, device, seen) for t in value.state[key].values())
                del value.state[key]
            what = "state"
        if n:
            out.append((f"{name} ({what})", n))
    return tuple(out)


def _on(t: torch.Tensor, device: torch.device) -> bool:
    return t.device.type == device.type and (device.index is None or t.device.index in (None, device.index))


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

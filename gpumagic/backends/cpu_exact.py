"""An exact tracker of live CPU tensor memory, and a simulated device capacity (a *budget*).

How it counts: a ``TorchDispatchMode`` sees every op; each output
storage that is new is counted once, keyed by its data pointer, and uncounted when the storage
is freed (a weakref callback on the storage). Outputs of ops whose schema says they alias an
input (views, in-place and ``out=`` ops) are skipped without looking at them, which keeps the
per-op cost close to an empty mode's. Storages that existed before the block are found by one
scan of live tensors (the baseline) and watched the same way, so freeing them lowers the count.

With a budget, an allocation that would take the live bytes past it raises a genuine
``torch.OutOfMemoryError`` worded like PyTorch's CUDA allocator, so code written for GPUs (and
Lightning's and Accelerate's finders, which match the wording) reacts as on a real device.

What it cannot see: memory allocated below the dispatcher (inside a kernel, inside a
``torch.compile``-generated graph), tensors made from NumPy buffers, and tensors created in
other threads (e.g. DataLoader pin-memory threads) or other processes (worker processes).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gpumagic._gcscan import instances_of
from gpumagic._safe import describe
from gpumagic._tensors import storages, unreadable_kind
from gpumagic.backends import PeakWindows
from gpumagic.units import format_size_torch

__all__ = [
    "CPUSession",
    "compile_graphs_exist",
    "live_storages",
    "live_tracker_bytes",
    "simulated_oom_message",
    "unreadable_note",
]

_Tensor = torch.Tensor
_SEQ = (tuple, list)
_ACTIVE: list[CPUSession] = []


def live_tracker_bytes() -> int | None:
    """Live bytes counted by the active CPU tracker, or None when none is active."""
    active = list(_ACTIVE)  # read once: the monitor thread calls this while the block runs
    return active[-1].current() if active else None


class _Ref(weakref.ref):  # type: ignore[type-arg]
    """A weakref on a storage that remembers what to uncount when the storage dies."""

    __slots__ = ("key", "nbytes")
    key: int
    nbytes: int


def live_storages(
    device_type: str = "cpu", exclude: Iterable[int] = (), unreadable: dict[str, int] | None = None
) -> dict[int, Any]:
    """Every live tensor storage on ``device_type`` reachable as a Python tensor: data_ptr -> storage.

    One fast pass over the garbage collector's objects (:func:`gpumagic._gcscan.instances_of`).
    Sparse tensors give their index and value storages; tensors whose memory cannot be read
    (opaque, some subclasses) are counted by kind in ``unreadable`` when it is given.
    """
    excluded = set(exclude)
    found: dict[int, Any] = {}
    for t in instances_of((_Tensor,)):
        try:
            if t.device.type != device_type:
                continue
            parts = storages(t)
        except Exception:  # a subclass whose attributes raise: it cannot be read
            parts = None
        if parts is None:
            if unreadable is not None:
                kind = unreadable_kind(t)
                unreadable[kind] = unreadable.get(kind, 0) + 1
            continue
        for key, st in parts:
            if key not in excluded and key not in found and st.nbytes():
                found[key] = st
    return found


def unreadable_note(counts: dict[str, int]) -> str | None:
    """"not counted: 2 mkldnn tensors, 1 MyTensor tensor" (None when nothing was skipped)."""
    if not counts:
        return None
    parts = [f"{n} {kind} tensor{'s' if n != 1 else ''}" for kind, n in sorted(counts.items())]
    return "not counted: " + ", ".join(parts) + " (their memory cannot be read on cpu)"


def simulated_oom_message(requested: int, allocated: int, budget: int) -> str:
    """The CUDA caching allocator's wording (PyTorch >= 2.1), with a note that it is simulated."""
    free = max(budget - allocated, 0)
    return (
        f"CUDA out of memory. Tried to allocate {format_size_torch(requested)}. "
        f"GPU 0 has a total capacity of {format_size_torch(budget)} of which {format_size_torch(free)} is free. "
        f"Including non-PyTorch memory, this process has {format_size_torch(allocated)} memory in use. "
        f"Of the allocated memory {format_size_torch(allocated)} is allocated by PyTorch, and "
        f"0 bytes is reserved by PyTorch but unallocated. "
        f"(simulated by gpumagic: cpu with a {format_size_torch(budget)} budget)"
    )


# Ops whose outputs never need a look: they alias an input (views, in-place, out=).
# Decided once per op from its schema; lift_fresh wraps a tensor made outside the dispatcher
# (torch.tensor(...)), so it is new memory even though the schema says alias.
# Ops that put new memory under an existing tensor (resize_, set_ to a storage made outside the
# dispatcher, torch.UntypedStorage(n)) alias their input too: they are told apart as _RESTORAGE.
_ALIAS: dict[Any, Any] = {}
_RESTORAGE = "restorage"
_RESTORAGE_OPS = ("resize_", "resize_as_", "set_")


def _aliases(func: Any) -> Any:
    try:
        result: Any = any(r.alias_info is not None for r in func._schema.returns)
    except AttributeError:
        result = False
    name = str(getattr(func, "__name__", ""))
    if "lift_fresh" in name:
        result = False
    if name.split(".")[0] in _RESTORAGE_OPS:
        result = _RESTORAGE
    _ALIAS[func] = result
    return result


class _Mode(TorchDispatchMode):
    """The hot path. Kept tiny: one dict lookup for aliasing ops, a few attribute reads otherwise.

    torch wraps every ``__torch_dispatch__`` in a dynamo-disable shim, a Python-level cost on
    every op. This class opts out of the shim; :class:`_CompileSafeMode` keeps it, and is used
    once torch.compile has made a graph in the process (so dynamo can never trace the handler).
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # Without this, torch.compile falls back to eager under the mode and then never
        # compiles that code again: measuring must not change the user's model. The price:
        # buffers inside a compiled graph are not seen on cpu (the report says so).
        return True

    def __init__(self, session: CPUSession) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.s = session

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        alias = _ALIAS.get(func)
        if alias is None:
            alias = _aliases(func)
        if alias is _RESTORAGE:
            return self.s._restorage(func, args, kwargs or {})
        out = func(*args, **kwargs) if kwargs else func(*args)
        if alias:
            return out
        s = self.s
        try:  # free unless it raises: any error of ours degrades the report, never the user's op
            if type(out) is _Tensor:
                over = out.is_cpu and s._add(out)
            elif type(out) in _SEQ:
                over = False
                for o in out:
                    if isinstance(o, _Tensor) and o.is_cpu and (s._add(o) if type(o) is _Tensor else s._add_other(o)):
                        over = True
                        break
            elif isinstance(out, _Tensor):  # a subclass: fake, a wrapper, ...
                over = out.is_cpu and s._add_other(out)
            else:
                return out
        except Exception as e:
            s._fault(func, e)
            return out
        if over:
            out = o = None  # the traceback keeps this frame: let the failed op's outputs go
            s._raise_oom()
        return out


class _CompileSafeMode(_Mode):
    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return True

    __torch_dispatch__ = _Mode.__torch_dispatch__  # re-declared so torch wraps it


def compile_graphs_exist() -> bool:
    """Whether torch.compile has made a graph in this process (read without importing dynamo)."""
    import sys

    dynamo = sys.modules.get("torch._dynamo")
    counters = getattr(getattr(dynamo, "utils", None), "counters", None)
    return bool(counters and counters.get("stats", {}).get("unique_graphs", 0))


def _register_dynamo_skips() -> bool:
    """Tell dynamo, once, never to trace the hot path (no per-call cost, unlike the shim).

    Returns False when this torch has no such registry; the shimmed mode is used then.
    """
    try:
        # dynamo's C half: importing torch._dynamo itself would import sympy (and its half-import,
        # should a Ctrl-C land there, would break every later cell), for a registry that lives here
        from torch._C._dynamo import eval_frame
    except ImportError:
        return False
    action = getattr(eval_frame, "_FrameAction", None)
    make = getattr(eval_frame, "_FrameExecStrategy", None)
    register = getattr(eval_frame, "set_code_exec_strategy", None)
    if action is None or make is None or register is None:
        return False
    strategy = make(action.SKIP, action.SKIP)
    for fn in (_Mode.__torch_dispatch__, CPUSession._add, CPUSession._add_other, CPUSession._free,
               CPUSession._raise_oom):
        register(fn.__code__, strategy)
    return True


_FAST_OK: list[bool] = []


class CPUSession(PeakWindows):
    """Exact live-bytes accounting for CPU tensors, with an optional budget (simulated capacity).

    >>> s = CPUSession(budget=64 * 2**20); s.start()      # doctest: +SKIP
    """

    backend = "cpu"

    def __init__(self, budget: int | None = None, exclude: Iterable[int] = ()) -> None:
        self.device = "cpu"
        self.budget_bytes = budget
        self._notes: list[str] = []
        self.incomplete: str | None = None
        self._unreadable: dict[str, int] = {}
        self._limit = budget if budget is not None else math.inf
        self._exclude = set(exclude)
        self._refs: dict[int, _Ref] = {}
        self._cur = 0
        self._wpeak = 0
        self._peak = 0
        self._pending = 0
        self._mode: _Mode | None = None

    # -- accounting -------------------------------------------------------------------------
    def _free(self, ref: _Ref) -> None:
        if self._refs.pop(ref.key, None) is not None:
            self._cur -= ref.nbytes

    def _watch(self, st: Any, key: int, n: int) -> None:
        r = _Ref(st, self._free)
        r.key = key
        r.nbytes = n
        self._refs[key] = r
        self._cur += n

    def _add(self, t: torch.Tensor) -> bool:
        """Count t's storage if new. Returns True when it would exceed the budget."""
        try:
            st = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # sparse, opaque: several buffers or none readable
            return self._add_other(t)
        key = st.data_ptr()
        if key in self._refs or not key:
            return False
        n = st.nbytes()
        cur = self._cur + n
        if cur > self._limit:
            self._pending = n
            return True
        r = _Ref(st, self._free)
        r.key = key
        r.nbytes = n
        self._refs[key] = r
        self._cur = cur
        if cur > self._wpeak:
            self._wpeak = cur
        return False

    def _add_other(self, t: torch.Tensor) -> bool:
        """Sparse tensors, subclasses and opaque tensors: count the buffers that can be read."""
        parts = storages(t)
        if parts is None:
            kind = unreadable_kind(t)
            self._unreadable[kind] = self._unreadable.get(kind, 0) + 1
            self._note_unreadable()
            return False
        new = [(key, st, st.nbytes()) for key, st in parts if key not in self._refs]
        n = sum(nb for _, _, nb in new)
        if self._cur + n > self._limit:
            self._pending = n
            return True
        for key, st, nb in new:
            if key not in self._refs:  # two parts may share a buffer
                self._watch(st, key, nb)
        if self._cur > self._wpeak:
            self._wpeak = self._cur
        return False

    def _restorage(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        """resize_ / resize_as_ / set_: the memory they put under ``args[0]`` is counted, and checked
        against the budget before the op runs (a failed resize leaves the tensor as it was)."""
        t = args[0]
        try:
            old = t.untyped_storage()
            old_key, old_n = old.data_ptr(), old.nbytes()
            grow = self._growth(func, args, old_n)
        except Exception as e:
            self._fault(func, e)
            return func(*args, **kwargs)
        if grow > 0 and self._cur + grow > self._limit:
            self._pending = grow
            self._raise_oom()
        out = func(*args, **kwargs)
        try:
            st = t.untyped_storage()
            key = st.data_ptr()
            if st is old and key != old_key:  # reallocated: the old buffer lived until the copy was made
                r = self._refs.pop(old_key, None)
                if r is not None:
                    self._wpeak = max(self._wpeak, self._cur + st.nbytes())
                    self._cur -= r.nbytes
            r = self._refs.get(key)
            if r is not None and r.nbytes != st.nbytes():
                self._cur += st.nbytes() - r.nbytes
                r.nbytes = st.nbytes()
            elif r is None and key:
                self._watch(st, key, st.nbytes())
            self._wpeak = max(self._wpeak, self._cur)
        except Exception as e:
            self._fault(func, e)
        return out

    def _growth(self, func: Any, args: Any, old_bytes: int) -> int:
        """Bytes the op will add: a resize past the storage's size, or a storage not counted yet."""
        t = args[0]
        name = func.__name__.split(".")[0]
        if name in ("resize_", "resize_as_") and len(args) > 1:
            shape = args[1].shape if isinstance(args[1], torch.Tensor) else args[1]
            needed = (t.storage_offset() + math.prod(int(d) for d in shape)) * t.element_size()
            return needed if needed > old_bytes else 0  # a new buffer, the old one freed after the copy
        if name == "set_" and len(args) > 1:
            src = args[1]
            st = src.untyped_storage() if isinstance(src, torch.Tensor) else \
                src.untyped() if isinstance(src, torch.TypedStorage) else src
            key = st.data_ptr()
            return int(st.nbytes()) if key and key not in self._refs else 0
        return 0

    def _note_unreadable(self) -> None:
        note = unreadable_note(self._unreadable)
        old = [n for n in self._notes if n.startswith("not counted: ")]
        if old:
            self._notes.remove(old[0])
        if note is not None:
            self._notes.append(note)

    def _fault(self, func: Any, e: Exception) -> None:
        if self.incomplete is None:
            self.incomplete = f"the cpu tracker failed after {getattr(func, '__name__', func)}: {describe(e)}"

    def _raise_oom(self) -> None:
        assert self.budget_bytes is not None
        msg = simulated_oom_message(self._pending, self._cur, self.budget_bytes)
        raise torch.OutOfMemoryError(msg)

    # -- MemorySession ----------------------------------------------------------------------
    @property
    def notes(self) -> list[str]:
        notes = list(self._notes)
        if compile_graphs_exist():  # torch.compile'd code allocates below the dispatcher
            notes.append(
                "torch.compile graphs exist in this process: on cpu, memory allocated inside a compiled graph "
                "(its activations and temporaries) is not seen by the tracker; on cuda the allocator counts it"
            )
        return notes

    def start(self) -> int:
        if self._mode is not None:
            raise RuntimeError("this CPU session is already started")
        # unreadable tensors made before the block are not named: they may be anyone's, anywhere
        for key, st in live_storages("cpu", self._exclude).items():
            self._watch(st, key, st.nbytes())
        self._wpeak = self._peak = self._cur
        if self.budget_bytes is not None and self._cur > self.budget_bytes:
            self._notes.append(
                f"memory alive before the block ({self._cur} bytes) already exceeds the budget "
                f"({self.budget_bytes} bytes): the first allocation will fail"
            )
        if not _FAST_OK:
            _FAST_OK.append(_register_dynamo_skips())
        fast = _FAST_OK[0] and not compile_graphs_exist()
        self._mode = _Mode(self) if fast else _CompileSafeMode(self)
        self._mode.__enter__()  # type: ignore[no-untyped-call]
        _ACTIVE.append(self)
        return self._cur

    def reserved_peak(self) -> int | None:
        return None

    def capacity(self) -> int | None:
        return self.budget_bytes

    def stop(self) -> None:
        mode, self._mode = self._mode, None
        try:
            if mode is not None:
                mode.__exit__(None, None, None)  # type: ignore[no-untyped-call]
        finally:
            if self in _ACTIVE:
                _ACTIVE.remove(self)
            # Dropping the weakrefs also drops their callbacks: nothing of ours outlives the block.
            self._refs = {}


"""Taking the state that running user code may change, and putting it back: the one module that does it.

Two parts, neither of which has to know what kind of object it protects:

- **The undo log** (:class:`UndoLog`): a ``TorchDispatchMode`` under which the code runs. Every
  op whose schema marks an argument as written (``Tensor(a!)``: in-place ops, ``out=`` ops,
  ``resize_``, ``set_``, the optimizers' ``_foreach_*_`` and fused kernels, gradient accumulation)
  is looked at before it runs; when a written tensor's storage existed before the snapshot, the
  storage is copied once to host memory (an ``UntypedStorage``, which no device tracker counts) and
  the tensor's size, strides and storage are noted. :meth:`Snapshot.restore` writes the copies
  back. Whatever holds the tensor (a model in a closure, a plain tensor in an object, a TorchScript
  module) does not matter: the write is what is logged.
- **Shallow copies of what is reachable** from the namespace and the given objects: every list,
  dict and set (in place), every object's ``__dict__`` (modules' parameters, hooks and ``training``
  flags, optimizers' state and param groups, a user's counters), tensors' ``.grad``,
  ``requires_grad`` and ``.data``, numpy arrays, random generators, closures' cells; plus the
  process-wide settings a cell can change (threads, default dtype, matmul precision, cuDNN flags,
  warnings filters, log levels, environment, working directory), the RNG states of every backend,
  and the namespace's bindings.

Restoring never stops half-way: each item is put back on its own, and what fails, or what could
not be copied at all, is named in the returned list, never raised. A tensor whose version counter
moved although the log saw no write to it (written inside ``torch.compile``'d code) is named too.

:class:`Bindings` is the light form used around every cell: which object each name was bound to,
without keeping the objects alive (the OOM handler reads it).

>>> snap = Snapshot.take([model], namespace=globals())       # doctest: +SKIP
>>> for b in (8, 16):                                        # doctest: +SKIP
...     with snap.recording():
...         train(b)
...     problems = snap.restore()
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import logging
import os
import random
import sys
import types
import warnings
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from gpumagic import backends
from gpumagic._gcscan import instances_of
from gpumagic._quiet import ignored_warnings
from gpumagic._safe import describe

__all__ = ["MISSING", "SHELL_NAMES", "Bindings", "Snapshot", "UndoLog", "history_name"]

MISSING = object()
"""A name or attribute that did not exist."""

SHELL_NAMES = frozenset({"In", "Out", "exit", "quit", "get_ipython"})
"""Names IPython puts in every namespace: never a cell's result."""
_HISTORY = frozenset({"_", "__", "___", "_i", "_ii", "_iii", "_oh", "_ih", "In", "Out", "_dh", "_exit_code"})


def history_name(name: str) -> bool:
    """A name IPython binds for its history (``_``, ``_i3``, ``Out``): never the user's to restore."""
    return name in _HISTORY or (name[:2] in ("_i", "_o") and name[2:].isdigit()) or (
        name[:1] == "_" and name[1:].isdigit())


# ---------------------------------------------------------------------------------------------
# the undo log

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_WRITTEN: dict[Any, tuple[tuple[int, str], ...]] = {}
"""op -> the (position, name) of each argument its schema marks as written; () for most ops."""

_UNMARKED_WRITES = frozenset({"running_mean", "running_var"})
"""Arguments written by contract although the schema does not say so: the batch-norm family
(``native_batch_norm``, ``cudnn_batch_norm``, ...) updates its running statistics in place with
schemas that carry no ``(a!)``."""


def _written(func: Any) -> tuple[tuple[int, str], ...]:
    try:
        args = func._schema.arguments
        spec = tuple((-1 if a.kwarg_only else i, a.name) for i, a in enumerate(args)
                     if (a.alias_info is not None and a.alias_info.is_write) or
                     (a.name in _UNMARKED_WRITES and "backward" not in func._schema.name))
    except AttributeError:  # a higher-order op without a schema: it writes nothing itself
        spec = ()
    _WRITTEN[func] = spec
    return spec


def _host_storage(st: Any) -> Any:
    """A copy of an untyped storage in host memory (not a tensor: no tracker scan counts it)."""
    out = torch.UntypedStorage(st.nbytes())
    if st.nbytes():
        out.copy_(st)
    return out


class UndoLog(TorchDispatchMode):
    """Copies each storage that existed before it was made, once, before the first write to it.

    ``existing``: the storages to protect (``_cdata`` -> weak reference); a storage not among them
    was made by the code under the log and is its own business. :meth:`undo` writes back what the
    last recording changed; the copies stay for the next recording (a storage put back holds the
    copy's values again, so it is never copied twice).
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True  # like the tracker's mode: torch.compile keeps compiling under it

    def __init__(self, existing: dict[int, Any]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.existing = existing
        self.copies: dict[int, Any] = {}
        """storage key -> host copy, kept for the snapshot's life."""
        self.dirty: dict[int, Any] = {}
        """storage key -> the storage, written since the last undo."""
        self.shapes: dict[int, tuple[torch.Tensor, Any, int, tuple[int, ...], tuple[int, ...], int]] = {}
        """id(tensor) -> (tensor, storage, offset, size, stride, version) before its first write since the
        last undo."""
        self.faults: list[str] = []
        self.last_written: set[int] = set()
        """Keys of the storages the last undo put back."""
        self.wrappers: dict[int, tuple[torch.Tensor, int]] = {}
        """id(wrapper subclass tensor) -> (it, its version before its first write since the last undo)."""
        self.last_wrappers: set[int] = set()
        """ids of the wrapper tensors whose inner tensors the last undo put back."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        spec = _WRITTEN.get(func)
        if spec is None:
            spec = _written(func)
        if spec:
            try:
                for pos, name in spec:
                    value = args[pos] if 0 <= pos < len(args) else (kwargs or {}).get(name)
                    if isinstance(value, torch.Tensor):
                        self._before_write(value)
                    elif isinstance(value, (list, tuple)):
                        for t in value:
                            if isinstance(t, torch.Tensor):
                                self._before_write(t)
            except Exception as e:  # ours failed: the op still runs, the restore will say what is missing
                if len(self.faults) < 5:
                    self.faults.append(f"the undo log could not copy what {getattr(func, '__name__', func)} "
                                       f"wrote ({describe(e)})")
        return func(*args, **kwargs) if kwargs else func(*args)

    def _before_write(self, t: torch.Tensor) -> None:
        if t.is_meta:
            return
        if type(t) not in _PLAIN_TENSORS and hasattr(t, "__tensor_flatten__"):
            # a wrapper (DTensor, a user's subclass) runs its inner ops after this mode has handed the
            # op on, where the log no longer sees them: log its inner tensors now
            names, _ = t.__tensor_flatten__()
            if names:
                self.wrappers.setdefault(id(t), (t, t._version))
                for name in names:
                    inner = getattr(t, name, None)
                    if isinstance(inner, torch.Tensor):
                        self._before_write(inner)
                return
        try:
            st = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # sparse, opaque: no single storage
            return
        key = st._cdata
        ref = self.existing.get(key)
        if ref is None or ref() is None:
            return
        if id(t) not in self.shapes:
            self.shapes[id(t)] = (t, st, int(t.storage_offset()), tuple(t.size()), tuple(t.stride()), t._version)
        if key in self.dirty:
            return
        if key not in self.copies:
            with _disable_current_modes():  # the copy is ours: no tracker below may count it
                self.copies[key] = _host_storage(st)
        self.dirty[key] = st

    def undo(self) -> list[str]:
        """Put back every storage and tensor shape written since the last undo; what failed, named."""
        problems = list(self.faults)
        self.faults = []
        shapes, self.shapes = self.shapes, {}
        dirty, self.dirty = self.dirty, {}
        self.last_written = set(dirty)
        wrappers, self.wrappers = self.wrappers, {}
        self.last_wrappers = set(wrappers)
        with _disable_current_modes(), torch.no_grad():
            for t, st, offset, size, stride, _ in shapes.values():
                try:
                    if (t.untyped_storage()._cdata != st._cdata or t.storage_offset() != offset
                            or tuple(t.size()) != size or tuple(t.stride()) != stride):
                        t.set_(st, offset, size, stride)
                except Exception as e:
                    problems.append(f"could not put back the shape of a tensor of size {size}: {describe(e)}")
            for key, st in dirty.items():
                saved = self.copies[key]
                try:
                    if st.nbytes() != saved.nbytes():
                        st.resize_(saved.nbytes())
                    if saved.nbytes():
                        st.copy_(saved)
                except Exception as e:
                    problems.append(f"could not put back a storage of {saved.nbytes()} bytes: {describe(e)}")
            # the values are as before, so are the version counters: an autograd graph recorded before
            # (a `loss` from an earlier cell) still runs backward. Views share their base's counter:
            # the earliest version noted is set last.
            versions = [(e[0], e[5]) for e in reversed(shapes.values())] + list(wrappers.values())
            for t, version in versions:
                with contextlib.suppress(Exception):
                    torch._C._autograd._unsafe_set_version_counter((t,), (version,))
        return problems

    @property
    def copied_bytes(self) -> int:
        """Host bytes the log holds."""
        return sum(int(c.nbytes()) for c in self.copies.values())


def existing_storages() -> dict[int, Any]:
    """Every tensor storage alive now (any device; fake and meta ones left out): key -> weakref."""
    found: dict[int, Any] = {}
    for t in instances_of((torch.Tensor,)):
        try:
            if t.is_meta or type(t).__name__ in ("FakeTensor", "FunctionalTensor"):
                continue
            st = t.untyped_storage()
            key = st._cdata
            if key not in found:
                found[key] = weakref.ref(st, lambda _r, k=key: found.pop(k, None))  # type: ignore[misc]
        except Exception:  # sparse, opaque, a subclass that cannot say: not logged
            continue
    return found


# ---------------------------------------------------------------------------------------------
# what the log cannot see: shallow copies of what is reachable

_MAX_OBJECTS = 200_000
"""Objects walked from the roots at most; beyond, the snapshot says it stopped."""
_MAX_ARRAY_COPY = 256 * 2**20
"""NumPy arrays larger than this are checksummed instead of copied: a change is named, not undone."""
_SKIP_MODULES = ("IPython", "ipykernel", "traitlets", "zmq", "tornado", "asyncio", "threading", "logging",
                 "concurrent", "multiprocessing", "gpumagic", "jupyter_client", "_io", "io", "socket",
                 "ipywidgets", "matplotlib", "weakref", "_weakrefset")
_ATOMS = (int, float, complex, str, bytes, bool, type(None), range, slice, torch.dtype, torch.device,
          torch.Size, type, types.ModuleType, types.BuiltinFunctionType, types.CodeType, weakref.ref)


def _skipped(obj: Any) -> bool:
    """Objects that are not the user's state: those of the listed packages, and functions those
    packages made (gpumagic's own trial bodies and callbacks close over its bookkeeping, which a
    restore must never put back)."""
    mod = getattr(type(obj), "__module__", None) or ""
    if isinstance(obj, (types.FunctionType, types.MethodType, functools.partial)):
        mod = getattr(getattr(obj, "func", obj), "__module__", None) or ""
    return mod.split(".", 1)[0] in _SKIP_MODULES


class _Walk:
    """Shallow copies of the mutable objects reachable from some roots, and how to put them back."""

    def __init__(self, copy_grads: bool = True) -> None:
        self.copy_grads = copy_grads
        """Host copies of gradients, for code that drops them (``zero_grad()``); without, only the object."""
        self.seen: set[int] = set()
        self.slots: list[tuple[Any, dict[str, Any]]] = []
        self.versions: dict[int, int] = {}
        """id(tensor) -> its version counter after the snapshot or the last restore: a write the undo
        log did not see (inside torch.compile'd code, in a dry run) still moves it, and is named."""
        self.keep: list[Any] = []  # what the copies describe, alive as long as the snapshot
        self.lists: list[tuple[list[Any], list[Any]]] = []
        self.dicts: list[tuple[dict[Any, Any], dict[Any, Any]]] = []
        self.sets: list[tuple[set[Any], set[Any]]] = []
        self.deques: list[tuple[collections.deque[Any], list[Any]]] = []
        self.attrs: list[tuple[Any, dict[str, Any]]] = []
        self.cells: list[tuple[Any, Any]] = []
        self.tensors: list[tuple[torch.Tensor, bool, Any, Any, torch.Tensor | None, Any]] = []
        self.arrays: list[tuple[Any, Any, str]] = []
        self.generators: list[tuple[Any, Any, str]] = []
        self.host_tensors: list[torch.Tensor] = []  # host copies of .grad (excluded from device baselines)
        self.truncated = False
        self.names: dict[int, str] = {}

    def label(self, obj: Any) -> str:
        name = self.names.get(id(obj))
        return f"{name!r} ({type(obj).__name__})" if name else f"a {type(obj).__name__}"

    def walk(self, roots: Iterable[Any]) -> None:
        np = sys.modules.get("numpy")
        ndarray = getattr(np, "ndarray", ())
        np_gens: tuple[Any, ...] = tuple(c for c in (getattr(getattr(np, "random", None), "Generator", None),
                                    getattr(getattr(np, "random", None), "RandomState", None)) if c is not None)
        todo = list(roots)
        todo.reverse()
        while todo:
            obj = todo.pop()
            if isinstance(obj, _ATOMS) or id(obj) in self.seen:
                continue
            if len(self.seen) >= _MAX_OBJECTS:
                self.truncated = True
                return
            self.seen.add(id(obj))
            try:
                self._one(obj, todo, ndarray, np_gens)
            except Exception:  # an object that cannot be read is left as it is
                continue

    def _one(self, obj: Any, todo: list[Any], ndarray: Any, np_gens: tuple[Any, ...]) -> None:
        if isinstance(obj, torch.Tensor):
            self._tensor(obj, todo)
            return
        if ndarray and isinstance(obj, ndarray):
            self._array(obj)
            return
        if isinstance(obj, torch.Generator):
            if obj.device.type != "meta":
                self.keep.append(obj)
                state = obj.get_state()
                self.host_tensors.append(state)
                self.generators.append((obj, state, "torch"))
            return
        if np_gens and isinstance(obj, np_gens):
            self.keep.append(obj)
            kind = "numpy" if hasattr(obj, "bit_generator") else "legacy"
            self.generators.append((obj, copy.deepcopy(obj.bit_generator.state if kind == "numpy"
                                                       else obj.get_state()), kind))
            return
        if isinstance(obj, random.Random):
            self.keep.append(obj)
            self.generators.append((obj, obj.getstate(), "random"))
            return
        if _skipped(obj):
            return
        if isinstance(obj, list):
            self.keep.append(obj)
            self.lists.append((obj, list(obj)))
            todo.extend(obj[:100_000])
        elif isinstance(obj, dict):
            self.keep.append(obj)
            saved = dict(obj)
            self.dicts.append((obj, saved))
            todo.extend(list(saved.values())[:100_000])
        elif isinstance(obj, set):
            self.keep.append(obj)
            self.sets.append((obj, set(obj)))
        elif isinstance(obj, collections.deque):  # the other mutable sequence of the standard library
            self.keep.append(obj)
            self.deques.append((obj, list(obj)))
            todo.extend(list(obj)[:100_000])
        elif isinstance(obj, (tuple, frozenset)):
            todo.extend(list(obj)[:100_000])
        elif isinstance(obj, types.FunctionType):
            for cell in obj.__closure__ or ():
                with contextlib.suppress(ValueError):  # an empty cell
                    self.keep.append(cell)
                    self.cells.append((cell, cell.cell_contents))
                    todo.append(cell.cell_contents)
            todo.extend(obj.__defaults__ or ())
            todo.extend((obj.__kwdefaults__ or {}).values())
        elif isinstance(obj, types.MethodType):
            todo.append(obj.__self__)
        if isinstance(obj, (dict, types.FunctionType)):
            return
        slots = _slot_names(type(obj))
        if slots:
            values = {n: getattr(obj, n, MISSING) for n in slots}
            self.keep.append(obj)
            self.slots.append((obj, values))
            todo.extend(v for v in values.values() if v is not MISSING)
        d = getattr(obj, "__dict__", None)
        if isinstance(d, dict):
            self.keep.append(obj)
            self.attrs.append((obj, dict(d)))
            todo.extend(list(d.values())[:100_000])

    def _tensor(self, t: torch.Tensor, todo: list[Any]) -> None:
        if t.is_meta or type(t).__name__ in ("FakeTensor", "FunctionalTensor"):
            return
        self.keep.append(t)
        leaf = t.is_leaf
        grad = t.grad if leaf else None  # a non-leaf's .grad warns, and is not state
        host_grad = None
        if grad is not None and self.copy_grads:
            with torch.no_grad():
                host_grad = grad.detach().to("cpu", copy=True)
            self.host_tensors.append(host_grad)
        data = None
        with contextlib.suppress(Exception):
            data = (t.untyped_storage(), t.storage_offset(), tuple(t.size()), tuple(t.stride()))
        # the grad object by weak reference: a trial's zero_grad() may free it, as the real run would
        gref = None if grad is None else weakref.ref(grad)
        self.versions[id(t)] = t._version
        self.tensors.append((t, t.requires_grad, gref, (grad is not None, grad.device if grad is not None else None),
                             host_grad, data))
        d = getattr(t, "__dict__", None)
        if d:
            self.attrs.append((t, dict(d)))
            todo.extend(d.values())

    def _array(self, a: Any) -> None:
        if not a.flags.writeable:
            return
        self.keep.append(a)
        if a.nbytes <= _MAX_ARRAY_COPY:
            self.arrays.append((a, a.copy(), "copy"))
        else:
            self.arrays.append((a, (a.shape, _crc(a)), "crc"))

    # -- restore ---------------------------------------------------------------------------------
    def restore(self, problems: list[str], logged: set[int] | None = None) -> None:
        """Put back what was copied; ``logged``: keys of the storages (and ids of the wrapper tensors)
        the undo log put back (None: no log ran, so any write to a tensor is one nobody undid)."""
        def attempt(obj: Any, fn: Callable[..., None], *args: Any) -> None:
            try:
                fn(*args)
            except Exception as e:
                problems.append(f"could not put back {self.label(obj)}: {describe(e)}")

        for obj, saved in self.attrs:
            attempt(obj, _put_attrs, obj, saved)
        for obj, saved_slots in self.slots:
            attempt(obj, _put_slots, obj, saved_slots)
        for lst, saved_l in self.lists:
            attempt(lst, _put_list, lst, saved_l)
        for dct, saved_d in self.dicts:
            attempt(dct, _put_dict, dct, saved_d)
        for st, saved_s in self.sets:
            attempt(st, _put_set, st, saved_s)
        for dq, saved_q in self.deques:
            attempt(dq, _put_deque, dq, saved_q)
        for cell, contents in self.cells:
            attempt(contents, _put_cell, cell, contents)
        unseen = [entry[0] for entry in self.tensors if entry[0]._version != self.versions.get(id(entry[0]))
                  and (logged is None or (_key(entry[0]) not in logged and id(entry[0]) not in logged))]
        if unseen:
            problems.append(f"not restored: {len(unseen)} tensor{'s' if len(unseen) > 1 else ''} "
                            f"({', '.join(sorted({self.label(t) for t in unseen})[:5])}) written where the undo log "
                            "cannot see (inside torch.compile'd code, or without the log): their values are "
                            "what the code left")
        for entry in self.tensors:
            attempt(entry[0], _put_tensor, *entry)
        for entry in self.tensors:
            self.versions[id(entry[0])] = entry[0]._version
        for arr, saved_a, how in self.arrays:
            if how == "copy":
                attempt(arr, _put_array, arr, saved_a)
            elif (arr.shape, _crc(arr)) != saved_a:
                problems.append(f"not restored: {self.label(arr)} of {arr.nbytes:,} bytes changed (arrays over "
                                f"{_MAX_ARRAY_COPY // 2**20} MiB are checked, not copied)")
        for gen, state, kind in self.generators:
            attempt(gen, _put_rng, gen, state, kind)


def _slot_names(cls: type) -> tuple[str, ...]:
    names: list[str] = []
    for c in cls.__mro__:
        if c.__module__ == "builtins":
            continue
        declared = c.__dict__.get("__slots__", ())
        names.extend(n for n in ((declared,) if isinstance(declared, str) else declared)
                     if n not in ("__dict__", "__weakref__"))
    return tuple(names)


def _put_slots(obj: Any, saved: dict[str, Any]) -> None:
    for name, value in saved.items():
        now = getattr(obj, name, MISSING)
        if now is value:
            continue
        if value is MISSING:
            object.__delattr__(obj, name)
        else:
            object.__setattr__(obj, name, value)


def _key(t: torch.Tensor) -> int | None:
    try:
        return int(t.untyped_storage()._cdata)
    except Exception:
        return None


def _crc(a: Any) -> int:
    return zlib.crc32(a.data if a.flags.c_contiguous else a.tobytes())


def _put_attrs(obj: Any, saved: dict[str, Any]) -> None:
    _put_dict(obj.__dict__, saved)


def _put_dict(d: Any, saved: dict[Any, Any]) -> None:
    if d.keys() == saved.keys() and all(d[k] is v for k, v in saved.items()):
        return
    for k in [k for k in d if k not in saved]:
        del d[k]
    for k, v in saved.items():
        if d.get(k, MISSING) is not v:
            d[k] = v


def _put_list(lst: list[Any], saved: list[Any]) -> None:
    if len(lst) != len(saved) or any(a is not b for a, b in zip(lst, saved, strict=True)):
        lst[:] = saved


def _put_deque(dq: collections.deque[Any], saved: list[Any]) -> None:
    if len(dq) != len(saved) or any(a is not b for a, b in zip(dq, saved, strict=True)):
        dq.clear()
        dq.extend(saved)


def _put_set(s: set[Any], saved: set[Any]) -> None:
    if s != saved:
        s.clear()
        s.update(saved)


def _put_cell(cell: Any, contents: Any) -> None:
    try:
        now = cell.cell_contents
    except ValueError:
        now = MISSING
    if now is not contents:
        cell.cell_contents = contents


def _put_tensor(t: torch.Tensor, requires_grad: bool, gref: Any, had: tuple[bool, Any],
                host_grad: torch.Tensor | None, data: Any) -> None:
    with _disable_current_modes(), torch.no_grad():
        if data is not None:  # `t.data = other` is not an op the log sees
            st, offset, size, stride = data
            if t.untyped_storage()._cdata != st._cdata or tuple(t.size()) != size:
                t.set_(st, offset, size, stride)
        if not t.is_leaf:
            return
        if t.requires_grad != requires_grad:
            t.requires_grad_(requires_grad)
        had_grad, grad_device = had
        if not had_grad:
            if t.grad is not None:
                t.grad = None
            return
        grad = gref()
        if grad is not None:
            if t.grad is not grad:
                t.grad = grad  # its values were written back by the undo log
        else:  # freed by the trial (zero_grad): a new tensor with the saved values
            if host_grad is None:
                raise RuntimeError("its gradient was dropped and no copy of it was kept")
            t.grad = host_grad.to(grad_device, copy=True)


def _put_array(a: Any, saved: Any) -> None:
    if a.shape != saved.shape:
        a.resize(saved.shape, refcheck=False)
    if a.dtype != saved.dtype:
        raise TypeError(f"its dtype changed from {saved.dtype} to {a.dtype}")
    a[...] = saved


def _put_rng(gen: Any, state: Any, kind: str) -> None:
    if kind == "torch":
        gen.set_state(state)
    elif kind == "numpy":
        gen.bit_generator.state = copy.deepcopy(state)
    elif kind == "legacy":
        gen.set_state(state)
    else:
        gen.setstate(state)


# ---------------------------------------------------------------------------------------------
# process-wide settings


_Setting = tuple[str, Callable[[], Any], Callable[[Any], None]]


def _attr_setting(name: str, owner: Any, attr: str) -> _Setting:
    def read() -> Any:
        return getattr(owner, attr)

    def write(value: Any) -> None:
        setattr(owner, attr, value)

    return name, read, write


def _deterministic() -> tuple[bool, bool]:
    return torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()


def _set_deterministic(v: tuple[bool, bool]) -> None:
    torch.use_deterministic_algorithms(v[0], warn_only=v[1])


def _set_grad_mode(v: bool) -> None:
    torch.set_grad_enabled(v)


def _filters() -> list[Any]:
    return list(warnings.filters)


def _environ() -> dict[str, str]:
    return dict(os.environ)


def _settings() -> list[_Setting]:
    """(name, read, write) of every process-wide setting a cell can change."""
    out: list[_Setting] = [
        ("torch threads", torch.get_num_threads, torch.set_num_threads),
        ("default dtype", torch.get_default_dtype, torch.set_default_dtype),
        ("float32 matmul precision", torch.get_float32_matmul_precision, torch.set_float32_matmul_precision),
        ("grad mode", torch.is_grad_enabled, _set_grad_mode),
        ("deterministic algorithms", _deterministic, _set_deterministic),
        ("warnings filters", _filters, _set_filters),
        ("log levels", _log_levels, _set_log_levels),
        ("environment variables", _environ, _set_environ),
        ("working directory", os.getcwd, os.chdir),
    ]
    import torch.nn.modules.module as modmod

    out.append(_attr_setting("full backward hook flag", modmod, "_global_is_full_backward_hook"))
    cudnn = getattr(torch.backends, "cudnn", None)
    for flag in ("benchmark", "deterministic", "enabled", "allow_tf32"):
        if cudnn is not None and hasattr(cudnn, flag):
            out.append(_attr_setting(f"cudnn.{flag}", cudnn, flag))
    matmul = getattr(getattr(torch.backends, "cuda", None), "matmul", None)
    for flag in ("allow_tf32", "allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction"):
        if matmul is not None:
            out.append(_attr_setting(f"cuda.matmul.{flag}", matmul, flag))
    return out


def _global_hook_tables() -> list[Any]:
    """torch's process-wide hook tables (``register_module_forward_hook``, optimizer step hooks):
    a cell that registers one adds to these dicts, which the walk then puts back."""
    import torch.nn.modules.module as modmod
    import torch.optim.optimizer as optmod

    return [v for mod in (modmod, optmod) for k, v in vars(mod).items()
            if k.startswith("_global_") and isinstance(v, dict)]


def _set_filters(saved: list[Any]) -> None:
    warnings.filters[:] = saved  # type: ignore[index]
    warnings._filters_mutated()  # type: ignore[attr-defined]


def _log_levels() -> dict[str, tuple[int, bool]]:
    loggers = {"": logging.getLogger()}
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if isinstance(lg, logging.Logger):
            loggers[name] = lg
    out = {name: (lg.level, lg.disabled) for name, lg in loggers.items()}
    out["<disable>"] = (logging.root.manager.disable, False)
    return out


def _set_log_levels(saved: dict[str, tuple[int, bool]]) -> None:
    for name, (level, disabled) in saved.items():
        if name == "<disable>":
            if logging.root.manager.disable != level:
                logging.disable(level)
            continue
        lg = logging.getLogger(name or None)
        if lg.level != level:
            lg.setLevel(level)
        lg.disabled = disabled


def _set_environ(saved: dict[str, str]) -> None:
    for k in [k for k in os.environ if k not in saved]:
        del os.environ[k]
    for k, v in saved.items():
        if os.environ.get(k) != v:
            os.environ[k] = v


# ---------------------------------------------------------------------------------------------
# the snapshot


class Snapshot:
    """Everything code may change, taken before it runs and put back after, any number of times.

    :meth:`take` once; run the code inside :meth:`recording` (the undo log); :meth:`restore`
    after each run. ``problems`` names what could not be copied when it was taken.
    """

    def __init__(self, copy_grads: bool = True) -> None:
        self.log: UndoLog | None = None
        self.walk = _Walk(copy_grads)
        self.rng: dict[str, Any] = {}
        self.settings: list[tuple[str, Callable[[], Any], Callable[[Any], None], Any]] = []
        self.namespace: MutableMapping[str, Any] | None = None
        self.bindings: dict[str, Any] = {}
        self.storage_keys: set[int] = set()
        """Data pointers of the snapshot's host tensors, which a tracker must not count."""
        self.problems: list[str] = []

    @property
    def names(self) -> dict[int, str]:
        return self.walk.names

    def describe(self, obj: Any) -> str:
        """"'model' (Sequential)" where the namespace names the object, else "a Sequential"."""
        return self.walk.label(obj)

    @classmethod
    def take(cls, objects: Iterable[Any] = (), namespace: MutableMapping[str, Any] | None = None, *,
             roots: Iterable[Any] = (), log: bool = True) -> Snapshot:
        """Snapshot ``objects``, ``roots`` (e.g. a trial function: its closure is walked) and the
        namespace's values, the RNGs and the process-wide settings. ``log``: protect every
        tensor storage alive now with the undo log (used while :meth:`recording`); without it (a
        dry run, whose code never writes a real tensor) gradients are kept by reference only."""
        snap = cls(copy_grads=log)
        objects = list(objects)
        top: list[Any] = [*objects, *roots]
        if namespace is not None:
            snap.namespace = namespace
            snap.bindings = dict(namespace)
            user = [(k, v) for k, v in snap.bindings.items()
                    if not k.startswith("_") and k not in ("In", "Out", "exit", "quit", "get_ipython")]
            snap.walk.names = {id(v): k for k, v in reversed(user)}
            top.extend(v for _, v in user)
        top.extend(_global_hook_tables())
        with ignored_warnings():  # torch's warnings about what it reads are not the user's
            snap.walk.walk(top)
        if snap.walk.truncated:
            snap.problems.append(f"more than {_MAX_OBJECTS:,} objects are reachable from the namespace: only "
                                 "those first reached were copied; tensor values are put back all the same")
        for backend in backends.registry():
            with contextlib.suppress(Exception):
                state = backend.rng_state()
                if state is not None:
                    snap.rng[backend.name] = state
        snap.rng["random"] = random.getstate()
        np = sys.modules.get("numpy")
        if np is not None:
            snap.rng["numpy"] = np.random.get_state()
        for name, read, write in _settings():
            try:
                snap.settings.append((name, read, write, read()))
            except Exception:  # a setting this build does not have
                continue
        for t in [*snap.walk.host_tensors, *(v for v in snap.rng.values() if isinstance(v, torch.Tensor))]:
            with contextlib.suppress(Exception):
                snap.storage_keys.add(t.untyped_storage().data_ptr())
        if log:
            snap.log = UndoLog(existing_storages())
        return snap

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Run the block under the undo log (a no-op for a snapshot taken with ``log=False``)."""
        if self.log is None:
            yield
            return
        self.log.__enter__()  # type: ignore[no-untyped-call]
        try:
            yield
        finally:
            self.log.__exit__(None, None, None)  # type: ignore[no-untyped-call]

    def run(self, fn: Callable[[], Any]) -> tuple[Any, list[str]]:
        """``fn()`` under the log, then everything put back (also when it raises): (its value, problems)."""
        problems: list[str] = []
        try:
            with self.recording():
                value = fn()
        finally:
            problems = self.restore()
        return value, problems

    def close(self) -> None:
        """Drop the copies, after the last :meth:`restore`: a traceback that still reaches this
        snapshot (the frames of a search that raised) then keeps nothing of the user's alive."""
        self.log = None
        self.walk = _Walk(self.walk.copy_grads)
        self.rng = {}
        self.settings = []
        self.namespace = None
        self.bindings = {}
        self.storage_keys = set()

    def restore(self) -> list[str]:
        """Put everything back; returns what could not be restored (empty when all was). Never raises
        for a single item: each is put back on its own."""
        problems = list(self.problems)
        if self.log is not None:
            problems.extend(self.log.undo())
        self.walk.restore(problems, None if self.log is None else self.log.last_written | self.log.last_wrappers)
        for backend in backends.registry():
            if backend.name in self.rng:
                try:
                    backend.set_rng_state(self.rng[backend.name])
                except Exception as e:
                    problems.append(f"could not put back the {backend.name} random state: {describe(e)}")
        random.setstate(self.rng["random"])
        if "numpy" in self.rng:
            with contextlib.suppress(Exception):
                sys.modules["numpy"].random.set_state(self.rng["numpy"])
        for name, read, write, value in self.settings:
            try:
                if read() != value:
                    write(value)
            except Exception as e:
                problems.append(f"could not put back the {name}: {describe(e)}")
        ns = self.namespace
        if ns is not None:
            for name in [n for n in list(ns) if n not in self.bindings and not history_name(n)]:
                with contextlib.suppress(KeyError):
                    del ns[name]
            for name, v in self.bindings.items():
                if ns.get(name, MISSING) is not v:
                    ns[name] = v
        return problems


# ---------------------------------------------------------------------------------------------
# which names a cell bound (the light form, kept while every cell runs)

_PLAIN_VALUES = (int, float, complex, str, bytes, bool, type(None))


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
            if isinstance(value, _PLAIN_VALUES):  # plain values hold no device memory: keep them
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

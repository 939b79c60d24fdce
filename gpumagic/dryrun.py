"""Dry runs: plan the memory of a training cell on fake tensors, for a device you may not have.

A dry run executes the user's unchanged code under ``FakeTensorMode``: tensors have shapes,
dtypes and storage sizes but no data, kernels compute nothing, and a step of a billion-parameter
model takes seconds and almost no host memory. Memory is counted like the exact CPU tracker
(:mod:`gpumagic.backends.cpu_exact`) counts it: each new output storage once, views and in-place
results never, a storage uncounted when it dies. The same :class:`~gpumagic.tracking.Tracker`
records the steps, so a plan and a measurement read the same.

What a dry run does to the world around the code:

* **Objects made before the block are fake-copied** for it: every name in the namespace (the
  notebook's, or the module globals given to :func:`gpumagic.track`) bound to a tensor, a model,
  an optimizer, an LR scheduler, a GradScaler, a container of them, or an object whose attributes
  hold them is rebound to a fake copy (one ``deepcopy`` under ``FakeCopyMode``, so an optimizer's
  parameters are its model's copied parameters). Afterwards every name is bound as before, names
  the block created are removed (they hold fake tensors), and plain lists/dicts are restored.
  Objects reached only through a closure or a module attribute are not copied: their tensors are
  turned into fake ones when an op uses them, so they are never changed, but their memory is not
  in the baseline.
* **A plan never writes** (:mod:`gpumagic._nowrite`): files opened for writing go to the null
  device, removals and renames do nothing, ``torch.save``/``pickle.dump``/numpy's savers are
  skipped; the report lists what was not written.
* **The user's hooks run**: tensor and optimizer hooks are carried onto the fake copies (a copy
  drops them), so a hook that fails a real run fails the plan.
* **Memory by a rule**: a tensor's storages whatever its layout (sparse, nested), memory that
  ``resize_``/``set_`` puts under a tensor, none for meta tensors; a sparse result whose size
  depends on the data is planned at its upper bound.
* **Random initialisation** (``uniform_``, ``normal_``, ...) is a no-op on fake tensors.
* **Data-dependent values** (``.item()``, ``float(loss)``, ``if loss < best``, formatting a loss)
  read a placeholder (1 or 1.0; 0 for counts of inf/NaN such as GradScaler's; a truth value
  that keeps the loop going) and the report lists the lines; **data-dependent shapes**
  (``nonzero``, boolean masks) stop the run with a
  :class:`DryRunError` that names the operation and the line.
* **Batches from a DataLoader** are drawn for real (a batch is small) and become fake tensors as
  they leave the iterator.
* **Planning for cuda without CUDA**: fake CUDA tensors cannot exist on a CPU-only build (a
  linear layer on one aborts the process), so the code runs on fake CPU tensors that *stand in*
  for cuda: ``.cuda()``, ``.to("cuda")``, ``device="cuda"``, ``torch.autocast("cuda")``,
  GradScaler and the ``torch.cuda`` queries behave as on the planned GPU; the memory that lands
  on the stand-in device is fed through a model of the CUDA caching allocator
  (:mod:`gpumagic._allocator`) for the allocated and reserved predictions. ``tensor.device``
  itself still reads ``cpu``. Optimizers take their cuda default (``foreach``) implementation.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import gc
import math
import random
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from types import TracebackType
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from gpumagic import backends
from gpumagic._plain import PLAIN
from gpumagic._quiet import ignored_warnings
from gpumagic.backends import DryRunTarget, PeakWindows
from gpumagic.gpus import GPU, lookup
from gpumagic.options import BadOptions
from gpumagic.tracking import BACKWARDS_PER_STEP_CAP, StopTrial, Tracker
from gpumagic.units import format_bytes

__all__ = ["DryRunError", "DryTracker", "FakeSession", "attention_kernel", "plan_target"]

_aten = torch.ops.aten
_FLAG_OPS = {"isnan", "isinf", "isneginf", "isposinf"}
_MAX_NOTED_LINES = 4
_HOST = "cpu"  # where fake tensors live: not a device kind to plan for, the one place they can run


_DEFERRED = [0]
"""How many one_collection blocks are open (plans are made on one thread)."""


@contextlib.contextmanager
def one_collection() -> Iterator[None]:
    """Plans made in this block skip the full garbage collection each makes at its end; one runs
    when the block ends. A full collection costs about 0.1 s in a process with torch loaded, and a
    row of plans (the remedies after an out-of-memory error, a search's planned trials) paid it
    once per plan. Between plans the leftover fake copies hold no memory (fake storages have no
    data) and no scan for real tensors counts them."""
    _DEFERRED[0] += 1
    try:
        yield
    finally:
        _DEFERRED[0] -= 1
        if not _DEFERRED[0]:
            gc.collect()


class DryRunError(RuntimeError):
    """The code cannot run on fake tensors: names the operation and the line of the user's code."""

    def __init__(self, what: str, where: str | None) -> None:
        at = f" at {where}" if where else ""
        super().__init__(
            f"the dry run cannot run this code on fake tensors: {what}{at}. "
            "Run it without --dry-run (dry_run=False), or move that line out of the planned cell."
        )
        self.what = what
        self.where = where

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


def attention_kernel(gpu: GPU | None, dtype: torch.dtype) -> str:
    """The fused attention kernel PyTorch picks on ``gpu`` for ``dtype`` (no dropout-free special cases).

    >>> from gpumagic.gpus import lookup
    >>> attention_kernel(lookup("T4"), torch.float16)
    'memory-efficient'
    """
    if gpu is not None and gpu.flash_attention and dtype in (torch.float16, torch.bfloat16):
        return "flash"
    return "memory-efficient"


def _plannable() -> list[tuple[str, DryRunTarget, backends.Backend]]:
    """(name, dry-run target, backend) of every registered device a dry run can plan for, in order."""
    out = []
    for b in backends.registry():
        target = backends.dry_run_target(b)
        if target is not None:
            out.append((b.name, target, b))
    return out


def _target_of(kind: str) -> DryRunTarget:
    """The dry-run target of the device kind ``kind`` (one :func:`plan_target` accepted)."""
    found = next((t for name, t, _ in _plannable() if name == kind), None)
    if found is None:
        raise ValueError(f"a dry run cannot plan for {kind!r}")
    return found


def plan_target(device: str | None, gpu: str | GPU | None, budget: int | None) -> tuple[str, GPU | None, int | None]:
    """(device kind, GPU, capacity) of a dry run; BadOptions (a ValueError) naming what is wrong.

    ``device``: a device a backend can plan for, "cpu", "cuda", "cuda:N" or "mps" (default: the
    first that takes a catalog GPU when one is named, else the first available in the registry's
    order: cuda, mps, cpu).
    """
    if gpu is not None and budget is not None:
        raise BadOptions("give either a GPU (`gpu`) or a budget (`budget`) for a dry run, not both")
    g = lookup(gpu) if isinstance(gpu, str) else gpu
    plannable = _plannable()
    if device is None:
        chosen = next((name for name, t, b in plannable if (t.named_gpu if g is not None else b.available())), None)
        if chosen is None:
            raise BadOptions("no registered device can be planned for" + (f" on `gpu` {g.name}" if g else ""))
        device = chosen
    kind = str(device).split(":")[0]
    names = [name for name, _, _ in plannable]
    if kind not in names or (":" in str(device) and not str(device).split(":")[1].isdigit()):
        allowed = [f"'{n}', '{n}:N'" if b.indexed else f"'{n}'" for n, _, b in plannable]
        raise BadOptions(f"`device` must be {', '.join(allowed[:-1])} or {allowed[-1]}, got {device!r}"
                         if len(allowed) > 1 else f"`device` must be {allowed[0]}, got {device!r}")
    if g is not None and not _target_of(kind).named_gpu:
        gpu_kinds = " or ".join(n for n, t, _ in plannable if t.named_gpu)
        raise BadOptions(f"`gpu` {g.name} plans for {gpu_kinds}; the `device` given is {device!r}")
    capacity = budget if budget is not None else (g.capacity_bytes if g is not None else None)
    return kind, g, capacity


# ---------------------------------------------------------------------------------------------
# where in the user's code


_MACHINERY = ("/gpumagic/", "/torch/_subclasses/", "/torch/utils/_python_dispatch", "/torch/_tensor.py",
              "/torch/overrides.py", "/torch/_ops.py", "/torch/_prims", "/torch/_decomp", "/torch/_refs",
              "/torch/utils/_stats.py", "/torch/_compile.py", "/torch/_dynamo/", "/contextlib.py")


def _user_line(direct: bool = False) -> str | None:
    """'line 7 in train(): x = model(batch)' for the innermost frame outside torch and gpumagic.

    ``direct``: only when the user's code itself made the call (``loss.item()``), not when torch's
    Python code did on its behalf (an optimizer reading its step count): None then.
    """
    import linecache

    f: Any = sys._getframe(1)
    while f is not None:
        name = f.f_code.co_filename.replace("\\", "/")
        if any(m in name for m in _MACHINERY):
            f = f.f_back
            continue
        if "/torch/" in name or "/IPython/" in name or name.endswith("/typing.py"):
            if direct:
                return None
            f = f.f_back
            continue
        line = linecache.getline(f.f_code.co_filename, f.f_lineno).strip()
        where = f"{f.f_code.co_name}()" if f.f_code.co_name != "<module>" else "the cell"
        return f"line {f.f_lineno} in {where}" + (f": {line}" if line else "")
    return None


# ---------------------------------------------------------------------------------------------
# accounting on fake storages


class _Ref(weakref.ref):  # type: ignore[type-arg]
    __slots__ = ("block", "counted", "key", "nbytes")
    key: int
    nbytes: int
    counted: bool
    block: int


def _key(t: torch.Tensor) -> tuple[Any, int]:
    st = t.untyped_storage()
    return st, int(st._cdata)


_RANDOM_INPLACE: set[Any] = set()
for _name in ("uniform_", "normal_", "bernoulli_", "random_", "exponential_", "geometric_", "log_normal_", "cauchy_"):
    _op = getattr(_aten, _name, None)
    if _op is not None:
        for _ov in _op.overloads():
            _RANDOM_INPLACE.add(getattr(_op, _ov))


def _fake_errors() -> tuple[type[BaseException], ...]:
    from torch._subclasses import fake_tensor as ft

    names = ("DynamicOutputShapeException", "DataDependentOutputException", "UnsupportedOperatorException",
             "UnsupportedFakeTensorException")
    return tuple(getattr(ft, n) for n in names if hasattr(ft, n))


class FakeSession(PeakWindows):
    """A :class:`~gpumagic.backends.MemorySession` over fake tensors: live bytes on the planned device.

    Storages are keyed by their StorageImpl; each carries the device kind it stands for ("cpu",
    or the planned kind for a stand-in), and only those of the planned kind are counted.
    """

    dry = True

    def __init__(self, kind: str, index: int, capacity: int | None, budget: int | None, gpu: GPU | None,
                 standin: bool, fake_mode: Any) -> None:
        from gpumagic._allocator import CachingAllocatorModel

        backend = backends.get(kind)
        self.target = _target_of(kind)
        self.backend = kind
        self.device = f"{kind}:{index}" if backend is not None and backend.indexed else kind
        self.kind = kind
        self.budget_bytes = budget
        self.gpu = gpu
        self.notes: list[str] = []
        self.standin = standin
        self.fake_mode = fake_mode
        self._capacity = capacity
        self._alloc = CachingAllocatorModel(capacity) if self.target.caching_allocator else None
        # a stand-in refuses tensors of these device kinds before a kernel sees one
        self.refused = {kind, *(n for n, t, _ in _plannable() if t.kernels_refuse_fakes())}
        self._refs: dict[int, _Ref] = {}
        self._flags: set[int] = set()  # storages of isnan/isinf results and what they feed
        self._cur = 0
        self._wpeak = 0
        self._peak = 0
        self._baseline_objects: list[Any] = []
        self._real_baseline = 0
        self._creating: list[str] = []
        self.placeholders: dict[str, int] = {}
        self.attention: set[str] = set()
        self.sparse_bounded: set[str] = set()
        """Ops whose sparse results were planned at their upper bound (non-zeros depend on the data)."""
        self._mode: _CountMode | None = None
        self._errors = _fake_errors()

    # -- accounting ------------------------------------------------------------------------
    def _free(self, ref: _Ref) -> None:
        if self._refs.pop(ref.key, None) is not None and ref.counted:
            if self._alloc is not None:
                self._alloc.free(ref.block)
                self._cur = self._alloc.allocated
            else:
                self._cur -= ref.nbytes
        self._flags.discard(ref.key)

    def watch(self, t: torch.Tensor, device_kind: str) -> None:
        """Count ``t``'s storages as live memory on ``device_kind`` (each once), whatever its layout:
        a sparse tensor's indices and values, a nested one's buffers. A meta tensor holds none."""
        if t.device.type == "meta":
            return
        if t.layout is torch.strided and not t.is_nested:
            self._watch_one(t, device_kind)
            return
        from gpumagic._tensors import components

        for part in components(t) or []:
            if part.device.type != "meta":
                self._watch_one(part, device_kind)

    def restorage(self, t: torch.Tensor, device_kind: str) -> None:
        """After resize_ / set_: count the storage now under ``t`` (new, or grown or shrunk in place)."""
        if t.device.type == "meta":
            return
        try:
            st, key = _key(t)
        except (RuntimeError, NotImplementedError):
            return
        r = self._refs.get(key)
        if r is None:
            self._watch_one(t, device_kind)
            return
        n = int(st.nbytes())
        if n == r.nbytes:
            return
        if r.counted:  # a grown buffer is new memory, the old one freed after the copy
            if self._alloc is not None:
                block = self._alloc.malloc(n)
                self._wpeak = max(self._wpeak, self._alloc.allocated)
                self._alloc.free(r.block)
                r.block = block
                self._cur = self._alloc.allocated
            else:
                self._wpeak = max(self._wpeak, self._cur + (n if n > r.nbytes and r.nbytes else 0))
                self._cur += n - r.nbytes
            self._wpeak = max(self._wpeak, self._cur)
        r.nbytes = n

    def sparse_bound(self, t: torch.Tensor, inputs: list[torch.Tensor], op: str, device_kind: str) -> None:
        """A sparse result whose number of non-zeros depends on the data (``to_sparse()`` of a dense
        tensor, ``coalesce()``): the fake kernel leaves it empty, so the plan counts its upper bound,
        every position non-zero (for a coalesce, at most the input's entries)."""
        try:
            if t._nnz() != 0 or not any(i.numel() for i in inputs):
                return
            values = t.values() if t.layout is not torch.sparse_coo else t._values()
            per_entry = math.prod(values.shape[1:])
            positions = t.numel() // max(per_entry, 1)
            if op in ("coalesce", "_coalesce"):
                positions = min([positions, *(i._nnz() for i in inputs if i.layout is torch.sparse_coo)])
            if t.layout is torch.sparse_coo:
                index_bytes = t.sparse_dim() * t._indices().element_size()
            else:
                plain = t.col_indices() if t.layout in (torch.sparse_csr, torch.sparse_bsr) else t.row_indices()
                index_bytes = plain.element_size()
            key = _storage_key(values)
        except (RuntimeError, NotImplementedError):
            return
        r = self._refs.get(key) if key is not None else None
        if r is None or r.nbytes or positions <= 0:
            return
        self.sparse_bounded.add(op)
        if not r.counted:
            r.nbytes = positions * (index_bytes + per_entry * t.element_size())
            return
        n = positions * (index_bytes + per_entry * t.element_size())
        if self._alloc is not None:
            self._alloc.free(r.block)
            r.block = self._alloc.malloc(n)
            self._cur = self._alloc.allocated
        else:
            self._cur += n
        r.nbytes = n
        self._wpeak = max(self._wpeak, self._cur)

    def _watch_one(self, t: torch.Tensor, device_kind: str) -> None:
        try:
            st, key = _key(t)
        except (RuntimeError, NotImplementedError):
            return
        if key in self._refs:
            return
        r = _Ref(st, self._free)
        r.key = key
        r.nbytes = int(st.nbytes())
        r.counted = device_kind == self.kind
        r.block = 0
        self._refs[key] = r
        if r.counted:
            if self._alloc is not None:
                r.block = self._alloc.malloc(r.nbytes)
                self._cur = self._alloc.allocated
            else:
                self._cur += r.nbytes
            if self._cur > self._wpeak:
                self._wpeak = self._cur

    def device_of(self, t: torch.Tensor) -> str:
        """The device kind ``t`` stands for (a real tensor: its own)."""
        from torch._subclasses.fake_tensor import FakeTensor

        if not isinstance(t, FakeTensor):
            return t.device.type
        try:
            r = self._refs.get(int(t.untyped_storage()._cdata))
        except (RuntimeError, NotImplementedError):
            return _HOST
        if r is None:
            return t.device.type
        return self.kind if r.counted else ("other" if self.target.host else _HOST)

    def tensor_bytes(self, t: Any, seen: set[int]) -> int:
        """Bytes of ``t``'s storage if counted on the planned device and not in ``seen`` (then added)."""
        if not isinstance(t, torch.Tensor):
            return 0
        if t.layout is not torch.strided or t.is_nested:
            from gpumagic._tensors import components

            return sum(self.tensor_bytes(p, seen) for p in components(t) or [] if p is not t)
        try:
            key = int(t.untyped_storage()._cdata)
        except (RuntimeError, NotImplementedError):
            return 0
        r = self._refs.get(key)
        if r is None or not r.counted or key in seen:
            return 0
        seen.add(key)
        from gpumagic._allocator import round_size

        return round_size(r.nbytes) if self._alloc is not None else r.nbytes

    def set_baseline(self, objects: Iterable[Any], real_bytes: int) -> None:
        self._baseline_objects = list(objects)
        self._real_baseline = real_bytes

    @contextlib.contextmanager
    def creating(self, kind: str) -> Iterator[None]:
        self._creating.append(kind)
        try:
            yield
        finally:
            self._creating.pop()

    # -- MemorySession -----------------------------------------------------------------------
    def start(self) -> int:
        for obj in self._baseline_objects:
            for t, kind in obj:
                self.watch(t, kind)
        self._baseline_objects = []
        self._cur += self._real_baseline
        if self._alloc is not None and self._real_baseline:
            self._alloc.allocated += self._real_baseline
        self._wpeak = self._peak = self._cur
        self._mode = _CountMode(self)
        self._mode.__enter__()  # type: ignore[no-untyped-call]
        return self._cur

    def reserved_peak(self) -> int | None:
        return None if self._alloc is None else self._alloc.peak_reserved

    def reserved(self) -> int | None:
        return None if self._alloc is None else self._alloc.reserved

    def capacity(self) -> int | None:
        return self._capacity

    def stop(self) -> None:
        mode, self._mode = self._mode, None
        if mode is not None:
            mode.__exit__(None, None, None)  # type: ignore[no-untyped-call]
        self._refs = {}

    # -- placeholders ----------------------------------------------------------------------------
    def placeholder(self, t: torch.Tensor) -> Any:
        where = _user_line(direct=True)
        if where is not None:
            self.placeholders[where] = self.placeholders.get(where, 0) + 1
        if t.dtype == torch.bool:
            # isfinite(x).all() -> True, isnan(x).any() -> False: the loop goes on
            return _storage_key(t) not in self._flags
        flagged = _storage_key(t) in self._flags  # a count of inf/NaN (GradScaler's found_inf): none
        if t.dtype.is_floating_point or t.dtype.is_complex:
            return 0.0 if flagged else 1.0  # 1: a loss that stops no loop, a step count that divides
        return 0 if flagged else 1


def _tensors(args: Any) -> Iterator[torch.Tensor]:
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, torch.Tensor):
                    yield b


class _CountMode(TorchDispatchMode):
    """Sits above FakeTensorMode: counts new storages, rewrites stand-in devices, gives placeholders."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # no per-op dynamo shim (as in backends.cpu_exact); a dry run is never compiled

    def __init__(self, session: FakeSession) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.s = session

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        s = self.s
        kwargs = kwargs or {}
        if func in _RANDOM_INPLACE:
            return args[0]
        if func is _aten._local_scalar_dense.default:
            return s.placeholder(args[0])
        made_on: str | None = s._creating[-1] if s._creating else None
        if s.standin:
            dev = kwargs.get("device")
            if dev is not None and torch.device(dev).type == s.kind:
                made_on = s.kind
                kwargs = {**kwargs, "device": torch.device("cpu")}
            for t in _tensors(args):
                if t.device.type in s.refused:  # a fake CUDA tensor in a kernel aborts a CPU build
                    kind = t.device.type.upper()
                    raise DryRunError(f"a {kind} tensor reached {func} on a machine without {kind}", _user_line())
        name = func.__name__.split(".")[0]
        if name in _RESTORAGE_OPS and args and isinstance(args[0], torch.Tensor):
            return self._restorage(func, name, args, kwargs, made_on)
        try:
            out = func(*args, **kwargs)
        except s._errors as e:
            what = f"{func} needs the values of its input ({type(e).__name__})"
            if "DynamicOutputShape" in type(e).__name__:
                what = f"{func} has an output shape that depends on the data"
            raise DryRunError(what, _user_line()) from None
        if name == "mkldnn_rnn_layer" and isinstance(out, tuple) and len(out) == 4 and out[3].numel() == 0:
            out = (*out[:3], _rnn_workspace(func, args, kwargs))
        if name.startswith("_scaled_dot_product"):
            s.attention.add(name)
        outs = [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)] \
            if isinstance(out, (list, tuple)) else []
        if not outs and name != "_amp_foreach_non_finite_check_and_unscale_":
            return out
        try:
            aliases = any(r.alias_info is not None for r in func._schema.returns)
        except AttributeError:
            aliases = False
        if "lift_fresh" in name:
            aliases = False
        inputs = list(_tensors(args))
        flagged = name in _FLAG_OPS or bool(s._flags and any(_storage_key(t) in s._flags for t in inputs))
        if made_on is None:
            made_on = _HOST
            for t in inputs:
                d = s.device_of(t)
                if d != _HOST:
                    made_on = d
                    break
        if name == "_amp_foreach_non_finite_check_and_unscale_" and len(args) > 1:
            outs.append(args[1])  # found_inf, written in place
            flagged = True
        for o in outs:
            if not aliases:
                s.watch(o, made_on)
                if o.layout is not torch.strided and o.layout in _SPARSE:
                    s.sparse_bound(o, inputs, name, made_on)
            if flagged:
                k = _storage_key(o)
                if k is not None:
                    s._flags.add(k)
        return out


    def _restorage(self, func: Any, name: str, args: Any, kwargs: Any, made_on: str | None) -> Any:
        """resize_, resize_as_ and set_ put memory under an existing tensor: count it. A storage made
        outside the dispatcher (``torch.UntypedStorage(n)``) is real: the plan sets a fake one of its size."""
        s = self.s
        t = args[0]
        if name == "set_" and len(args) > 1 and isinstance(args[1], (torch.UntypedStorage, torch.TypedStorage)):
            st = args[1] if isinstance(args[1], torch.UntypedStorage) else args[1].untyped()
            if st.device.type != "meta" and st.device.type == t.device.type:  # else: the real run's error
                holder = torch.empty(int(st.nbytes()), dtype=torch.uint8)  # fake: the mode below answers
                args = (t, holder.untyped_storage(), *args[2:])
        kind = made_on or s.device_of(t)
        out = func(*args, **kwargs)
        s.restorage(t, kind)
        return out


_RESTORAGE_OPS = ("resize_", "resize_as_", "set_")
_SPARSE = (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)


_FAKE_WORDS = ("tensor subclass", "faketensor", "fake tensor", "data pointer", "cannot access storage",
               "meta tensor", "device type meta")


def _fake_related(e: BaseException) -> bool:
    """Errors that come from running on fake tensors (numpy conversion, a C extension reading data)."""
    text = f"{type(e).__name__} {e}".lower()
    return any(w in text for w in _FAKE_WORDS)


def _line_in(tb: TracebackType | None) -> str | None:
    """The innermost line of the user's code in a traceback, as _user_line says it."""
    import traceback

    for fr in reversed(traceback.extract_tb(tb)):
        name = fr.filename.replace("\\", "/")
        if "/torch/" in name or "/gpumagic/" in name or "/IPython/" in name:
            continue
        where = f"{fr.name}()" if fr.name != "<module>" else "the cell"
        return f"line {fr.lineno} in {where}" + (f": {fr.line.strip()}" if fr.line else "")
    return None


_WORKSPACE: dict[tuple[Any, ...], int] = {}


def _rnn_workspace(func: Any, args: Any, kwargs: Any) -> torch.Tensor:
    """oneDNN's LSTM/GRU workspace, which the fake kernel leaves empty: its size comes from the real
    kernel run once on zeros of the same shapes (cached per shape), then a fake tensor of that size."""

    def shape(a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            return (tuple(a.shape), a.dtype)
        return tuple(shape(b) for b in a) if isinstance(a, (list, tuple)) else a

    key = tuple(shape(a) for a in args)
    n = _WORKSPACE.get(key)
    if n is None:
        with _disable_current_modes(), torch._C.DisableTorchFunction():
            real = [torch.zeros(a.shape, dtype=a.dtype) if isinstance(a, torch.Tensor) else
                    [torch.zeros(b.shape, dtype=b.dtype) for b in a] if isinstance(a, (list, tuple)) and a
                    and isinstance(a[0], torch.Tensor) else a for a in args]
            ws = func(*real, **kwargs)[3]
            n = int(ws.untyped_storage().nbytes()) if isinstance(ws, torch.Tensor) else 0
        _WORKSPACE[key] = n
    return torch.empty(n, dtype=torch.uint8)


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return int(t.untyped_storage()._cdata)
    except (RuntimeError, NotImplementedError):
        return None


# ---------------------------------------------------------------------------------------------
# the cell sees the planned device


class _StandInMode(TorchFunctionMode):
    """Python-level calls that would need the planned device: moves to it become copies on the stand-in."""

    def __init__(self, session: FakeSession) -> None:
        super().__init__()
        self.s = session

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        s = self.s
        if func is torch.Tensor.cuda:
            return self._move(args[0], s.kind, None, kwargs.get("non_blocking", False))
        if func is torch.Tensor.cpu:
            return self._move(args[0], "cpu", None, False)
        if func is torch.Tensor.to:
            rest = {k: v for k, v in kwargs.items() if k != "copy"}
            device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args[1:], **rest)
            if device is not None:
                return self._move(args[0], device.type, dtype, non_blocking, copy=bool(kwargs.get("copy")),
                                  memory_format=memory_format)
        if func in (torch.Tensor.pin_memory, torch.Tensor.record_stream):
            return args[0] if func is torch.Tensor.pin_memory else None
        if func is torch.nn.functional.scaled_dot_product_attention and args:
            s.attention.add(f"{attention_kernel(s.gpu, args[0].dtype)} ({args[0].dtype})")
        dev = kwargs.get("device")
        if dev is not None and not isinstance(dev, int) and torch.device(dev).type == s.kind:
            kwargs = {**kwargs, "device": "cpu"}
            with s.creating(s.kind):
                return func(*args, **kwargs)
        return func(*args, **kwargs)

    def _move(self, t: torch.Tensor, kind: str, dtype: Any, non_blocking: bool, *, copy: bool = False,
              memory_format: Any = None) -> torch.Tensor:
        s = self.s
        target = s.kind if kind in s.target.moves_from else kind
        if s.device_of(t) == target and not copy:
            return t if dtype is None or t.dtype == dtype else t.to(dtype=dtype)
        extra: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
        if memory_format is not None:
            extra["memory_format"] = memory_format
        with s.creating(target):
            return t.to("cpu", copy=True, non_blocking=non_blocking, **extra)


# ---------------------------------------------------------------------------------------------
# fake copies of the namespace


def _stateful(v: Any) -> bool:
    kinds: tuple[type, ...] = (torch.Tensor, torch.nn.Module, torch.optim.Optimizer,
                               torch.optim.lr_scheduler.LRScheduler)
    scaler = getattr(getattr(torch, "amp", None), "GradScaler", None)
    if scaler is not None:
        kinds = (*kinds, scaler)
    return isinstance(v, kinds)


def _needs_copy(v: Any, depth: int = 0) -> bool:
    from torch.utils.data import DataLoader

    if _stateful(v):
        return True
    if isinstance(v, (type, DataLoader, *PLAIN)) or (callable(v) and not hasattr(v, "__dict__")):
        return False
    if depth >= 2:
        return False
    if isinstance(v, (list, tuple)):
        return any(_needs_copy(x, depth + 1) for x in v[:1000])
    if isinstance(v, dict):
        return any(_needs_copy(x, depth + 1) for x in list(v.values())[:1000])
    if type(v).__module__ in ("builtins", "types") or isinstance(v, type(sys)):
        return False
    d = getattr(v, "__dict__", None)
    return isinstance(d, dict) and any(_stateful(x) for x in list(d.values())[:1000])




def _rewrap_scheduler_steps(objects: Iterable[Any]) -> None:
    """An LR scheduler wraps its optimizer's ``step`` in the optimizer's instance dict, which a deep
    copy drops (``Optimizer.__getstate__``): wrap the copies again, or the scheduler warns that
    ``optimizer.step()`` was overridden."""
    for sched in objects:
        if not isinstance(sched, torch.optim.lr_scheduler.LRScheduler):
            continue
        c = sched.optimizer
        if getattr(c.step, "_wrapped_by_lr_sched", False):
            continue
        func = type(c).step
        ref = weakref.ref(c)

        def wrapper(*a: Any, _f: Any = func, _r: Any = ref, **k: Any) -> Any:
            opt = _r()
            opt._opt_called = True
            return _f(opt, *a, **k)

        wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        c.step = wrapper  # type: ignore[method-assign]


def _walk(obj: Any, seen: set[int], out: list[Any], depth: int = 0) -> None:
    """Objects reachable from ``obj`` that hold tensors (for the baseline and the scheduler fix)."""
    if id(obj) in seen or depth > 3:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.optim.lr_scheduler.LRScheduler):
        out.append(obj)
        _walk(obj.optimizer, seen, out, depth + 1)
        return
    if isinstance(obj, (torch.Tensor, torch.nn.Module, torch.optim.Optimizer)):
        out.append(obj)
        if isinstance(obj, torch.optim.Optimizer):
            for st in obj.state.values():
                _walk(st, seen, out, depth + 1)
        return
    if isinstance(obj, (list, tuple)):
        for v in obj[:1000]:
            _walk(v, seen, out, depth + 1)
    elif isinstance(obj, dict):
        for v in list(obj.values())[:1000]:
            _walk(v, seen, out, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, type(sys))):
        for v in list(vars(obj).values())[:1000]:
            _walk(v, seen, out, depth + 1)


def _tensors_of(objs: Iterable[Any]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for o in objs:
        if isinstance(o, torch.Tensor):
            out.append(o)
            # only leaves have .grad (reading a non-leaf's warns: no warning of ours reaches the user)
            if o.is_leaf and o.grad is not None:
                out.append(o.grad)
        elif isinstance(o, torch.nn.Module):
            for p in o.parameters():
                out.append(p)
                if p.grad is not None:
                    out.append(p.grad)
            out.extend(o.buffers())
        elif isinstance(o, torch.optim.Optimizer):
            for st in o.state.values():
                out.extend(v for v in st.values() if isinstance(v, torch.Tensor))
    return out


# ---------------------------------------------------------------------------------------------
# the tracker


class DryTracker(Tracker):
    """A :class:`~gpumagic.tracking.Tracker` whose block runs on fake tensors. Use :func:`gpumagic.track`.

    ``namespace``: the mapping the code reads its objects from (fake-copied for the block and
    restored after); ``device``: the planned device kind; ``gpu``: a catalog GPU (its capacity and
    compute capability); ``budget``: a capacity instead of a GPU.
    """

    _measures_time_and_host = False  # fake tensors: no loop's data wait or host memory to report

    def __init__(
        self,
        namespace: MutableMapping[str, Any] | None,
        *,
        device: str | None = None,
        gpu: str | GPU | None = None,
        budget: str | int | None = None,
        steps: int | None = 3,
        exclude_storages: Iterable[int] = (),
        on_step: Any = None,
        objects: Iterable[Any] = (),
    ) -> None:
        from gpumagic.devices import resolve_budget

        bud = resolve_budget(budget)
        kind, g, capacity = plan_target(device, gpu, bud)
        index = int(str(device).split(":")[1]) if device is not None and ":" in str(device) else 0
        super().__init__("cpu", None, stop_after_steps=steps, stop_after_backwards=None if steps is None else
                         steps * BACKWARDS_PER_STEP_CAP, exclude_storages=exclude_storages, on_step=on_step)
        backend = backends.get(kind)
        self.target = _target_of(kind)
        self.device = torch.device(kind, index) if backend is not None and backend.indexed else torch.device(kind)
        self.budget = bud
        self.gpu = g
        self.kind = kind
        self.capacity = capacity
        self.standin = self.target.stands_in()
        self.namespace = namespace
        self._swap = list(objects)
        """Models, optimizers, schedulers and scalers reached by the code without the namespace (a closure):
        their tensors are swapped for fake copies in place for the block, and swapped back after."""
        self._dry_undo: list[Callable[[], None]] = []
        self._fake_session: FakeSession | None = None
        self._writes: Any = None
        """The plan's :class:`~gpumagic._nowrite.WriteGuard`: the files it did not write."""

    # -- hooks into Tracker ---------------------------------------------------------------------
    def _open_session(self) -> Any:
        assert self._fake_session is not None
        return self._fake_session

    def _root_value(self, tensors: Any) -> Any:
        from gpumagic.tracking import _Root

        return _Root(None, None, self._last_batch)

    def _nbytes(self, t: Any, seen: set[int]) -> int:
        assert self._fake_session is not None
        return self._fake_session.tensor_bytes(t, seen)

    # -- enter / exit ----------------------------------------------------------------------------
    def __enter__(self) -> DryTracker:
        try:
            self._dry_enter()
            super().__enter__()
        except BaseException:
            self._dry_exit()
            raise
        return self

    def __exit__(  # type: ignore[override]
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> bool:
        try:
            super().__exit__(et, ev, tb)
        finally:
            self._dry_exit()
        if isinstance(ev, StopTrial):
            return True  # the planned steps are done: the block ends quietly
        if isinstance(ev, AssertionError) and "shape_env" in str(ev):  # fake tensors without symbolic sizes
            raise DryRunError("this code needs symbolic shapes (a jagged nested tensor?), which a dry run does "
                              "not plan", _line_in(tb)) from ev
        if isinstance(ev, Exception) and not isinstance(ev, DryRunError) and _fake_related(ev):
            first = str(ev).strip().splitlines()[0] if str(ev).strip() else ""
            raise DryRunError(f"{type(ev).__name__}: {first}", _line_in(tb)) from ev
        return False

    def _teardown(self) -> None:
        # also reached without __exit__ (%unload_ext tears active trackers down): undo the fake world too
        try:
            super()._teardown()
        finally:
            self._dry_exit()

    def _dry_enter(self) -> None:
        from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensorMode

        undo = self._dry_undo
        rng = (torch.get_rng_state(), random.getstate())

        def restore_rng() -> None:
            torch.set_rng_state(rng[0])
            random.setstate(rng[1])

        undo.append(restore_rng)
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        session = FakeSession(self.kind, self.device.index or 0, self.capacity, self.budget, self.gpu,
                              self.standin, fake_mode)
        self._fake_session = session
        ns = self.namespace
        copies: dict[str, Any] = {}
        originals: dict[str, Any] = {}
        if ns is not None:
            originals = dict(ns)
            # everything the plan may change in place (a list the cell appends to, an array, an
            # object's attributes) is put back from this; tensors the block sees are fake copies
            from gpumagic.state import Snapshot

            before = Snapshot.take(namespace=ns, log=False)
            names = [k for k, v in originals.items() if not k.startswith("_") and k not in ("In", "Out")
                     and _needs_copy(v)]
            if names:
                memo: dict[int, Any] = {}
                failed: str | None = None
                try:
                    # torch's copier warns about what it reads (a non-leaf tensor's .grad): its noise,
                    # not the user's, and never an error under the user's warning filters
                    with ignored_warnings(), FakeCopyMode(fake_mode):
                        values = copy.deepcopy([originals[k] for k in names], memo)
                        _carry_dropped([originals[k] for k in names], memo)
                except Exception as e:
                    failed = f"could not make fake copies of {', '.join(names)} ({type(e).__name__}: {e})"
                    e.__traceback__ = None  # its frames hold the originals
                if failed is not None:
                    raise DryRunError(failed, None)
                copies = dict(zip(names, values, strict=True))
                _carry_hooks([originals[k] for k in names], memo)

            def restore_ns() -> None:
                # names the block created hold fake tensors; `with track(...) as t` binds t, which stays
                mine = {n: v for n, v in ns.items() if v is self}
                problems = before.restore()
                ns.update(mine)
                if problems and self._report is not None:  # what could not be put back is named
                    new = tuple(p for p in problems if p not in self._report.notes)
                    self._report = dataclasses.replace(self._report, notes=(*self._report.notes, *new))

            undo.append(restore_ns)
            ns.update(copies)
        swapped_real: set[int] = set()
        if self._swap:
            for t in _tensors_of(self._swap):
                with contextlib.suppress(RuntimeError, NotImplementedError):
                    swapped_real.add(t.untyped_storage().data_ptr())
            _swap_in_place(self._swap, fake_mode, undo)
        held: list[Any] = []
        seen: set[int] = set()
        for v in [*copies.values(), *self._swap]:
            _walk(v, seen, held)
        _rewrap_scheduler_steps(held)
        baseline = [(t, t.device.type) for t in _tensors_of(held)]
        real = 0
        if self.target.host:
            from gpumagic.backends.cpu_exact import live_storages

            copied_real: set[int] = set()
            for v in originals.values():
                if _needs_copy(v):
                    objs: list[Any] = []
                    _walk(v, set(), objs)
                    for t in _tensors_of(objs):
                        with contextlib.suppress(RuntimeError, NotImplementedError):
                            copied_real.add(t.untyped_storage().data_ptr())
            excluded = copied_real | swapped_real | set(self._exclude)
            real = sum(int(st.nbytes()) for k, st in live_storages("cpu", excluded).items())
        session.set_baseline([baseline], real)
        del held, baseline, copies

        self._patch_world(session, fake_mode)

    def _patch_world(self, session: FakeSession, fake_mode: Any) -> None:
        import torch.optim.optimizer as optmod
        import torch.utils.data.dataloader as dlmod

        undo = self._dry_undo

        def setattr_undo(owner: Any, name: str, value: Any) -> None:
            had = name in vars(owner) if isinstance(owner, type) else hasattr(owner, name)
            old = vars(owner)[name] if isinstance(owner, type) and had else getattr(owner, name, None)
            setattr(owner, name, value)
            undo.append(lambda: setattr(owner, name, old) if had else delattr(owner, name))

        original_next = dlmod._BaseDataLoaderIter.__next__

        def __next__(it: Any) -> Any:
            # drawn for real (indices, sampler RNG and collate need values), then made fake
            with _disable_current_modes(), torch._C.DisableTorchFunction():
                batch = original_next(it)
            return _fake_batch(batch, session, fake_mode)

        setattr_undo(dlmod._BaseDataLoaderIter, "__next__", __next__)
        original_get_iterator = dlmod.DataLoader._get_iterator

        def _get_iterator(loader: Any) -> Any:
            # worker processes fork here: they must start outside the fake world, or their collate
            # runs on fake tensors (and fails: "Attempted to set the storage ... on device meta")
            with _disable_current_modes(), torch._C.DisableTorchFunction():
                return original_get_iterator(loader)

        setattr_undo(dlmod.DataLoader, "_get_iterator", _get_iterator)

        from torch._subclasses.fake_tensor import FakeTensor

        def __format__(t: Any, spec: str) -> str:
            # a real 0-dim tensor formats its value (f"{loss:.3f}"): a fake one reads a placeholder
            if t.dim() == 0 and not t.is_meta:
                return format(t.detach().item(), spec)
            if spec:  # the real run's error, word for word: the user's, not the plan's
                raise TypeError("unsupported format string passed to Tensor.__format__")
            return object.__format__(t, spec)

        setattr_undo(FakeTensor, "__format__", __format__)
        from gpumagic._nowrite import WriteGuard

        self._writes = WriteGuard()
        self._writes.__enter__()
        undo.append(lambda: self._writes.__exit__(None, None, None))

        if self.standin:
            for owner, name, value in self.target.standin_patches(session, self.gpu):
                setattr_undo(owner, name, value)
        if self.target.foreach_optimizers:
            original_default = optmod._default_to_fused_or_foreach

            def default(params: Any, differentiable: bool, use_fused: bool = False) -> tuple[bool, bool]:
                if differentiable:
                    return original_default(params, differentiable, use_fused)
                return (use_fused, not use_fused)  # the device's default: foreach, or fused when asked

            setattr_undo(optmod, "_default_to_fused_or_foreach", default)
            for mod in list(sys.modules.values()):  # optimizers import the helper by name
                if getattr(mod, "__name__", "").startswith("torch.optim.") and \
                        getattr(mod, "_default_to_fused_or_foreach", None) is original_default:
                    setattr_undo(mod, "_default_to_fused_or_foreach", default)

        original_swap = torch.utils.swap_tensors

        def swap_tensors(t1: Any, t2: Any) -> None:
            # Module.to()/.cuda() swaps fake parameters, and swap_tensors refuses tensors that the fake
            # mode's memo holds weakly (pytorch#184976): drop them from the memo first
            memo = fake_mode.fake_tensor_converter.tensor_memo
            for k, v in list(memo.items()):
                if v is t1 or v is t2:
                    del memo[k]
            original_swap(t1, t2)  # type: ignore[no-untyped-call]

        setattr_undo(torch.utils, "swap_tensors", swap_tensors)
        setattr_undo(torch.Tensor, "__deepcopy__", _fake_aware_deepcopy(torch.Tensor.__deepcopy__, fake_mode))
        # torch logs a kernel that fails on fake tensors (E... fake_tensor.py) before raising: the plan
        # turns the error into a DryRunError or the user's own exception, so nothing goes to stderr
        import logging

        fake_log = logging.getLogger("torch._subclasses.fake_tensor")
        was_disabled = fake_log.disabled
        fake_log.disabled = True
        undo.append(lambda: setattr(fake_log, "disabled", was_disabled))
        fake_mode.__enter__()  # type: ignore[no-untyped-call]
        undo.append(lambda: fake_mode.__exit__(None, None, None))
        if self.standin:
            fmode = _StandInMode(session)
            fmode.__enter__()  # type: ignore[no-untyped-call]
            undo.append(lambda: fmode.__exit__(None, None, None))  # type: ignore[no-untyped-call]

    def _dry_exit(self) -> None:
        self.namespace = None  # the report stays; the namespace is the caller's
        errors: list[BaseException] = []
        if not self._dry_undo:
            return  # already undone (__exit__ and _teardown both come here): no second collection
        while self._dry_undo:
            try:
                self._dry_undo.pop()()
            except BaseException as e:
                errors.append(e)
        # the fake copies live in reference cycles: collect them now, or a later scan of live
        # objects (find_batch's optimizer discovery) would find fake optimizers and models; plans
        # made in a row (one_collection) leave it to the end of the row
        if not _DEFERRED[0]:
            gc.collect()
        if errors:
            raise errors[0]

    # -- report --------------------------------------------------------------------------------
    def _finish(self, error: BaseException | None) -> None:
        super()._finish(error)
        s = self._fake_session
        assert s is not None
        rep = self._report
        assert rep is not None
        notes = [f"a plan, not a measurement: the code ran on fake tensors (shapes only, no data) for {self._target()}"]
        cap = self.capacity
        if cap is not None:
            fits = "fits" if rep.peak_bytes <= cap else "does NOT fit"
            notes.append(f"planned peak {format_bytes(rep.peak_bytes)} {fits} in {format_bytes(cap)}")
        if s.placeholders:
            lines = list(s.placeholders)[:_MAX_NOTED_LINES]
            more = len(s.placeholders) - len(lines)
            notes.append("values read from fake tensors got placeholders (1.0 or 1; 0 for inf/NaN counts; "
                         "True/False keeping the loop going): " + "; ".join(lines)
                         + (f"; and {more} more" if more > 0 else ""))
        kernels = sorted(a for a in s.attention if "(" in a)
        if self.target.fused_attention and kernels:
            notes.append("attention assumed to run PyTorch's fused " + ", ".join(kernels) + " kernel on "
                         + (self.gpu.name if self.gpu else "the GPU")
                         + ": output and log-sum-exp are saved, no L×L matrix")
        notes.extend(self.target.notes)
        if s.sparse_bounded:
            notes.append("sparse results whose non-zeros depend on the data (" + ", ".join(sorted(s.sparse_bounded))
                         + ") are planned with every position non-zero: an upper bound")
        note = skipped_writes_note(self._writes.skipped if self._writes is not None else [])
        if note is not None:
            notes.append(note)
        rep = dataclasses.replace(rep, dry_run=True, notes=tuple(notes) + rep.notes)
        if self.gpu is not None:
            rep = dataclasses.replace(rep, device=f"{rep.device} ({self.gpu.name})")
        self._report = rep

    def _target(self) -> str:
        if self.gpu is not None:
            return f"{self.gpu.name} ({self.kind})"
        return self.kind


def _fake_aware_deepcopy(original: Callable[..., Any], fake_mode: Any) -> Callable[..., Any]:
    """``Tensor.__deepcopy__`` that, while ``fake_mode`` is on, copies a fake tensor as a fake clone
    and a real one as a fake copy.

    torch's own copies the storage and sets it on the new tensor; under a fake mode that ``set_``
    fails half-way ("Attempted to set the storage of a tensor on device meta to a storage on
    different device cpu") and leaves the process's heap corrupt: it dies at exit with a
    segmentation fault. Code does copy tensors inside the cell: torchmetrics' ``add_state``,
    which Lightning's ``self.log`` runs, deep-copies its defaults.
    """
    from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensor
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    def deepcopy(self: torch.Tensor, memo: dict[int, Any]) -> Any:
        if not self.is_leaf or fake_mode not in _get_current_dispatch_mode_stack():
            return original(self, memo)  # a non-leaf raises torch's own error
        if not isinstance(self, FakeTensor):
            with FakeCopyMode(fake_mode):  # answers this very call with a fake copy
                return original(self, memo)
        if id(self) in memo:
            return memo[id(self)]
        with torch.no_grad():
            new = self.clone()
        if self.requires_grad:
            new.requires_grad_(True)
        memo[id(self)] = new
        if self.grad is not None:
            new.grad = copy.deepcopy(self.grad, memo)
        # not the __dict__: a fake tensor's holds its fake mode and, for a constant, the real tensor
        return new

    return deepcopy


def _swap_in_place(objects: Iterable[Any], fake_mode: Any, undo: list[Callable[[], None]]) -> None:
    """Give models and optimizers fake copies of their tensors (tied ones stay tied), and save what a
    scheduler or scaler may change; ``undo`` gets the steps that put every original back."""
    from torch._subclasses.fake_tensor import FakeCopyMode

    memo: dict[int, Any] = {}

    def fake(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        with FakeCopyMode(fake_mode):
            return copy.deepcopy(t, memo)

    objects = list(objects)
    modules = [o for o in objects if isinstance(o, torch.nn.Module)]
    for m in {id(x): x for top in modules for x in top.modules()}.values():
        for table in (m._parameters, m._buffers):
            saved = dict(table)
            for k, v in saved.items():
                if v is not None:
                    table[k] = fake(v)
            undo.append(functools.partial(table.update, saved))
    for o in objects:
        if isinstance(o, torch.optim.Optimizer):
            groups = [dict(g) for g in o.param_groups]
            state = o.state
            for g in o.param_groups:
                old_params = g["params"]
                g["params"] = [fake(p) for p in old_params]
                for name, v in list(vars(o).items()):  # LBFGS keeps its group's list as _params
                    if v is old_params:
                        setattr(o, name, g["params"])
                        undo.append(functools.partial(setattr, o, name, v))
            new_state: Any = collections.defaultdict(dict)
            for p, st in state.items():
                new_state[fake(p)] = {k: fake(v) for k, v in st.items()}
            o.state = new_state

            def put_back(o: Any = o, groups: list[dict[str, Any]] = groups, state: Any = state) -> None:
                for g, saved in zip(o.param_groups, groups, strict=True):
                    g.clear()
                    g.update(saved)
                o.state = state

            undo.append(put_back)
        elif not isinstance(o, torch.nn.Module) and hasattr(o, "__dict__"):
            saved_dict = {k: (copy.copy(v) if isinstance(v, (list, dict)) else v) for k, v in o.__dict__.items()}

            def put_dict_back(o: Any = o, saved: dict[str, Any] = saved_dict) -> None:
                o.__dict__.clear()
                o.__dict__.update(saved)

            undo.append(put_dict_back)
    _carry_hooks(objects, memo)


_TENSOR_HOOKS = ("_backward_hooks", "_post_accumulate_grad_hooks")


def _carry_hooks(originals: Iterable[Any], memo: dict[int, Any]) -> None:
    """Give the fake copies (``memo``: id of an original -> its copy) the hooks of their originals.

    A copy drops them: a fake copy of a tensor has none, and ``Optimizer.__getstate__`` keeps only
    defaults, state and groups. The user's hooks must run in a plan as in a real run (a hook that
    raises there must fail the plan too). Module hooks live in the module's dict and are copied.
    """
    found: list[Any] = []
    seen: set[int] = set()
    for o in originals:
        _walk(o, seen, found)
    for o in [*found, *_tensors_of(found)]:
        c = memo.get(id(o))
        if c is None or c is o:
            continue
        if isinstance(o, torch.Tensor):
            for name in _TENSOR_HOOKS:
                hooks = getattr(o, name, None)
                if hooks and getattr(c, name, None) is None:
                    setattr(c, name, collections.OrderedDict(hooks))
        elif isinstance(o, torch.optim.Optimizer):
            for name, hooks in vars(o).items():
                if name.startswith("_optimizer_") and name.endswith("_hooks") and hooks:
                    setattr(c, name, collections.OrderedDict(hooks))


def _carry_dropped(originals: Iterable[Any], memo: dict[int, Any]) -> None:
    """Copy onto each optimizer's fake copy what ``Optimizer.__getstate__`` left out of it: attributes
    an optimizer set in its own ``__init__`` (LBFGS's ``_params``, its group's parameter list), deep
    copied with ``memo`` so they name the copied parameters. Functions are left out (an LR scheduler's
    ``step`` wrapper names the original; :func:`_rewrap_scheduler_steps` wraps the copy)."""
    found: list[Any] = []
    seen: set[int] = set()
    for o in originals:
        _walk(o, seen, found)
    for o in found:
        c = memo.get(id(o))
        if not isinstance(o, torch.optim.Optimizer) or c is None or c is o:
            continue
        mine = vars(c)
        for name, v in list(vars(o).items()):
            if name not in mine and not callable(v):
                mine[name] = copy.deepcopy(v, memo)


def skipped_writes_note(skipped: list[str]) -> str | None:
    """"not written: ckpt.pt (torch.save)": what a plan did not write (a plan never writes)."""
    if not skipped:
        return None
    shown = skipped[:_MAX_NOTED_LINES]
    more = len(skipped) - len(shown)
    return "not written: " + "; ".join(shown) + (f"; and {more} more" if more > 0 else "") + \
        " (a plan never writes or removes files)"


def _fake_batch(batch: Any, session: FakeSession, fake_mode: Any) -> Any:
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils._pytree import tree_map

    def conv(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        f = x if isinstance(x, FakeTensor) else fake_mode.from_tensor(x, static_shapes=True)
        session.watch(f, _HOST)
        return f

    return tree_map(conv, batch)


def run_planned(fn: Callable[[], Any]) -> Any:
    """Run ``fn``; a StopTrial (the planned steps are done) ends it quietly, like a trial."""
    try:
        return fn()
    except StopTrial:
        return None

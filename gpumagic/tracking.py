"""The step recorder: memory, loss and time per training step, from an unmodified loop.

What counts as a step and what its loss is, by two rules that do not depend on the loop's shape:

* **a step is one update of the model**: an ``optimizer.step()`` of any torch optimizer (a
  global step hook) ends a step; optimizers that step one after another with no ``backward()``
  between them (an encoder's and a decoder's after one backward) are one step, not one each.
  When no optimizer steps at all (manual updates), each backward is a step;
* **a step's loss is the loss whose gradient the step applied**: the sum of the values
  ``backward()`` was called on since the previous step (``torch.autograd.backward`` is wrapped;
  ``Tensor.backward`` calls it), each undone from ``GradScaler.scale``. Two loss terms each
  backward'ed give their sum; ``(loss / k).backward()`` k times gives the mean micro-batch loss;
  a last window of fewer than k such calls gives their sum too, and the step is marked
  ``partial_window`` rather than rescaled. When ``backward()`` runs inside
  ``optimizer.step(closure)`` (LBFGS calls it many times) the step's loss is the first value
  backward saw inside the step, which is what ``step`` returns;
* ``GradScaler.step`` that skips the optimizer (inf/NaN gradients) still ends the step.

Every hook and patch is removed in ``finally``, also on errors and KeyboardInterrupt. Loss values
stay on the device and are converted in chunks, so recording adds no host-device sync per step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import torch

from gpumagic import dataloading
from gpumagic._hostmem import HostPeak, process_memory
from gpumagic._quiet import ignored_warnings
from gpumagic._safe import describe
from gpumagic._tensors import is_fake
from gpumagic.backends import Backend, MemorySession
from gpumagic.devices import DeviceLike, resolve, resolve_budget, storage_bytes
from gpumagic.report import MemoryBreakdown, MemoryReport, StepRecord

__all__ = ["StopTrial", "Tracker", "active_tracker"]

MAX_RECORDS = 100_000
BACKWARDS_PER_STEP_CAP = 16
"""Backward calls per optimizer step (gradient accumulation) after which a trial of ``steps``
steps is cut anyway: ``stop_after_backwards=steps * BACKWARDS_PER_STEP_CAP``."""
_LOSS_CHUNK = 256
_ACTIVE: list[Tracker] = []
_COMPILE_HOOK_WARNING = r"Using `torch\.compile\(module\)` when there are global hooks"
GUESSED_NOTE = ("batch size read from the inputs' leading dimension (no DataLoader): the size of dimension 0 "
                "that the inputs of each step's first module call share")


def active_tracker() -> Tracker | None:
    return _ACTIVE[-1] if _ACTIVE else None


class StopTrial(BaseException):
    """Raised from inside the loop to end a search trial after its steps.

    A ``BaseException`` so that a user's ``except Exception`` does not swallow it.
    """


@dataclass
class _Root:
    """One backward call: the value it was called on (a float on cpu, else a detached tensor)."""

    value: Any
    divisor: float | None
    batch: int | None
    draw: int = 0
    """Which DataLoader batch was the last drawn: two backward calls on one batch (a GAN's
    discriminator on real and fake samples) count its samples once."""
    guess: int | None = None
    """The leading dimension of the inputs of the step's first module call (no DataLoader)."""


@dataclass
class _Rec:
    index: int
    terms: list[tuple[Any, float]] | None  # loss = sum(w * value); values may be device tensors
    peak: int
    seconds: float
    batch: int | None
    count: int = 1
    inputs: int | None = None
    guessed: bool = False
    partial: bool = False
    data: float | None = None
    host: int | None = None

    @property
    def loss(self) -> float | None:
        if self.terms is None or any(isinstance(v, torch.Tensor) for v, _ in self.terms):
            return None
        return float(sum(w * v for v, w in self.terms))


def _divisor(root: torch.Tensor) -> float | None:
    """k when ``root`` was computed as ``x / k`` or ``x * (1/k)`` with a scalar k, else None."""
    fn = root.grad_fn
    if fn is None:
        return None
    name = type(fn).__name__
    if not (name.startswith("DivBackward") or name.startswith("MulBackward")):
        return None
    other = getattr(fn, "_saved_other", None)
    if isinstance(other, torch.Tensor):
        if other.numel() != 1 or not other.is_cpu:
            return None  # reading it would sync the device
        # A wrapped-number tensor cannot be read through a dispatch mode: step outside it.
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            k = float(other.detach())
    elif isinstance(other, (int, float)):
        k = float(other)
    else:
        return None
    if name.startswith("MulBackward"):
        k = 1.0 / k if k else 0.0
    return k if k and math.isfinite(k) else None


def _batch_tensors(batch: Any, limit: int, depth: int = 0) -> Iterator[torch.Tensor]:
    """The tensors of a batch, nested in tuples, lists and dicts down to ``limit`` levels."""
    if isinstance(batch, torch.Tensor):
        yield batch
        return
    if depth > limit:
        return
    values: Iterable[Any] = batch.values() if isinstance(batch, dict) else \
        batch if isinstance(batch, (list, tuple)) else ()
    for v in values:
        yield from _batch_tensors(v, limit, depth + 1)


def input_elements(batch: Any) -> int | None:
    """Elements in the tensors of a batch (nested in tuples, lists and dicts); None without any."""
    sizes = [int(t.numel()) for t in _batch_tensors(batch, 4)]
    return sum(sizes) if sizes else None


def _wrap_next_index(original: Callable[..., Any]) -> Callable[..., Any]:
    """Remember how many samples the next batch is made of (in-process loading only: with
    workers, indices are drawn ahead of the batches)."""

    def _next_index(it: Any) -> Any:
        index = original(it)
        if not it._num_workers and it._auto_collation:
            with contextlib.suppress(TypeError):
                it._gpumagic_indices = len(index)
        return index

    return _next_index


def _first_tensor(batch: Any) -> torch.Tensor | None:
    return next(_batch_tensors(batch, 3), None)


def leading_dimension(args: Any) -> int | None:
    """The size of dimension 0 that every tensor argument with a dimension shares (nested in
    tuples, lists and dicts two levels down); None without one, or when they disagree.

    >>> leading_dimension((torch.zeros(300, 64), torch.zeros(300)))
    300
    """
    dims = {t.size(0) for t in _batch_tensors(args, 2) if t.dim() >= 1}  # size(0): a nested tensor has no shape
    if len(dims) != 1:
        return None
    d = dims.pop()
    return d if isinstance(d, int) and d > 0 else None  # a symbolic size (tracing) is no number


class _Records:
    """Step records, bounded: past ``limit`` records, neighbours merge pairwise (stride doubles).

    A merged record keeps the max peak (spikes stay visible), the summed time and batch, and the
    mean loss. Loss tensors on a device are copied to the host in chunks, one copy per chunk.
    """

    def __init__(self, limit: int) -> None:
        self.limit = max(2, limit)
        self.items: list[_Rec] = []
        self.stride = 1
        self.total = 0
        self._tensors = 0
        self._first_unconverted = 0

    def add(self, rec: _Rec) -> None:
        self.total += 1
        if rec.terms:
            self._tensors += sum(isinstance(v, torch.Tensor) for v, _ in rec.terms)
        last = self.items[-1] if self.items else None
        if self.stride > 1 and last is not None and last.count < self.stride:
            self._merge(last, rec)
            self._first_unconverted = min(self._first_unconverted, len(self.items) - 1)
        else:
            self.items.append(rec)
        if self._tensors >= _LOSS_CHUNK:
            self._convert()
        if len(self.items) >= self.limit:
            self._halve()

    @staticmethod
    def _merge(a: _Rec, b: _Rec) -> None:
        n = a.count + b.count
        if a.terms is not None and b.terms is not None:
            a.terms = [(v, w * a.count / n) for v, w in a.terms] + [(v, w * b.count / n) for v, w in b.terms]
        elif b.terms is not None:
            a.terms = b.terms
        a.peak = max(a.peak, b.peak)
        a.seconds += b.seconds
        a.batch = None if a.batch is None or b.batch is None else a.batch + b.batch
        a.inputs = b.inputs if a.inputs is None else a.inputs if b.inputs is None else max(a.inputs, b.inputs)
        a.guessed = a.guessed or b.guessed
        a.partial = a.partial or b.partial
        a.data = None if a.data is None or b.data is None else a.data + b.data
        a.host = b.host if a.host is None else a.host if b.host is None else max(a.host, b.host)
        a.count = n

    def _convert(self) -> None:
        """Replace loss tensors by floats: one device-to-host copy for all of them."""
        todo = self.items[self._first_unconverted :]
        self._first_unconverted = len(self.items)
        tensors = [v for r in todo for v, _ in r.terms or () if isinstance(v, torch.Tensor)]
        self._tensors = 0
        if not tensors:
            return
        host = torch.stack([t.detach().float().reshape(()) for t in tensors]).tolist()
        it = iter(host)
        for r in todo:
            if r.terms is not None:
                r.terms = [(next(it) if isinstance(v, torch.Tensor) else v, w) for v, w in r.terms]

    def _halve(self) -> None:
        self._convert()
        merged: list[_Rec] = []
        for i in range(0, len(self.items), 2):
            a = self.items[i]
            if i + 1 < len(self.items):
                self._merge(a, self.items[i + 1])
            merged.append(a)
        self.items = merged
        self._first_unconverted = len(merged)
        self.stride *= 2

    def records(self) -> list[_Rec]:
        self._convert()
        return self.items


class Tracker:
    """Records memory, loss and time per step while active. Use :func:`track`.

    ``report`` is available after the block ends, also when it ended with an exception.
    ``session``: measure through this :class:`~gpumagic.backends.MemorySession` instead of one
    the device's backend opens (tests pass a scripted one); ``backend``: the backend that
    parsed ``device`` (when two backends share a torch device type).
    """

    _learn_inputs = True
    _measures_time_and_host = True
    """Whether the block's time and host memory are the loop's own (a dry run's are not: fake tensors)."""
    _host: HostPeak | None
    """The host peak reader while the block runs."""
    _host_baseline: int | None
    """Read the batch size of loops without a DataLoader from their inputs (``_inputs_pre``)."""

    def __init__(
        self,
        device: DeviceLike = None,
        budget: str | int | None = None,
        *,
        hints: Iterable[Any] = (),
        max_records: int = MAX_RECORDS,
        stop_after_steps: int | None = None,
        stop_after_backwards: int | None = None,
        stop_after_forwards: int | None = None,
        exclude_storages: Iterable[int] = (),
        on_step: Callable[[StepRecord], None] | None = None,
        session: MemorySession | None = None,
        backend: Backend | None = None,
        gather_ranks: bool = True,
    ) -> None:
        if backend is not None and isinstance(device, torch.device):
            self.backend, self.device = backend, device
        else:
            self.backend, self.device = resolve(device, hints)
        self.budget = resolve_budget(budget)
        if max_records < 2:
            raise ValueError(f"max_records must be >= 2, got {max_records}")
        for name, value in (("stop_after_steps", stop_after_steps), ("stop_after_backwards", stop_after_backwards),
                            ("stop_after_forwards", stop_after_forwards)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self._max_records = max_records
        self._stop_steps = stop_after_steps
        self._stop_backwards = stop_after_backwards
        self._stop_forwards = stop_after_forwards
        """Evaluation trials: each forward of the outermost module with parameters is a step."""
        self._exclude = tuple(exclude_storages)
        self._on_step = on_step
        self._gather = gather_ranks
        self.on_batch: Callable[[Any, int | None], None] | None = None
        """Called with (DataLoader iterator, batch size) for every batch drawn while tracking."""
        self._report: MemoryReport | None = None
        self._given_session = session
        self._session: MemorySession | None = None
        self._cleanup: list[Callable[[], None]] = []
        self._reset_state()

    # -- public --------------------------------------------------------------------------
    @property
    def report(self) -> MemoryReport:
        if self._report is None:
            raise RuntimeError("the report is ready when the tracked block has ended")
        return self._report

    @property
    def finished_report(self) -> MemoryReport | None:
        """The report once the block has ended (also by an exception), else None."""
        return self._report

    @property
    def last_batch_size(self) -> int | None:
        """The size of the last batch drawn from a DataLoader while tracking (None if none)."""
        return self._last_batch

    @property
    def last_input_batch(self) -> int | None:
        """The batch size read from the inputs of the last step's first module call (their
        shared leading dimension): a guess for loops without a DataLoader; None if none."""
        return self._input_batch

    @property
    def optimizer_steps(self) -> int:
        """Steps (updates of the model) seen so far in the block: optimizers stepping one after
        another with no backward between them count once."""
        return self._opt_steps

    @property
    def optimizer_names(self) -> tuple[str, ...]:
        """Class names of the optimizers that stepped in the block (``("AdamW",)``), sorted."""
        return tuple(sorted({type(o).__name__ for o in list(self._optimizers)}))

    @property
    def backward_calls(self) -> int:
        """backward() calls seen so far in the block."""
        return self._backwards

    def close(self) -> None:
        """Remove every hook and stop measuring now (``%unload_ext`` mid-block): a report made
        when the block ends says it is incomplete."""
        self._note_incomplete("gpumagic was unloaded while the block ran: measuring stopped then, "
                              "what ran after is not in the report")
        self._teardown()

    def __enter__(self) -> Tracker:
        if _ACTIVE:
            raise RuntimeError(
                f"gpumagic is already tracking {_ACTIVE[-1].device} in this block: nested %%gpumem / "
                "gpumagic.track() is not supported; remove the inner one"
            )
        self._reset_state()
        session = self._given_session
        if session is None:
            session = self._open_session()
        self._session = session
        self._records = _Records(self._max_records)
        _ACTIVE.append(self)
        try:
            self._install()
            self._t0 = time.perf_counter()
            self._baseline = self._session.start()
            if self._measures_time_and_host:  # a plan reads no host memory (and opens no file for it)
                host = HostPeak()
                self._host = host
                self._host_baseline = host.start()
            # the baseline scan is the tracker's time, not the first step's
            self._t_last_step = self._t_last_backward = time.perf_counter()
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]:
        try:
            try:
                self._finish(ev)
            except Exception as e:  # never replace the user's exception, nor fail their cell
                self._fault("making the report", e)
                self._report = self._fallback_report(ev)
        finally:
            try:
                self._teardown()
            except Exception as e:
                self._fault("removing the hooks", e)
                if self._report is not None:
                    self._report = dataclasses.replace(self._report, incomplete=self._incomplete)
        if self._gather and self._report is not None:
            # after teardown: the gather's own traffic is not the block's memory
            from gpumagic._ranks import gather_ranks

            ended = ev if ev is not None and not isinstance(ev, StopTrial) else None
            self._report = gather_ranks(self._report, ended_by=ended)
        return False

    # -- setup / teardown ------------------------------------------------------------------
    def _reset_state(self) -> None:
        self._opt_steps = 0
        """Updates of the model: optimizer steps, those with no backward between them counted once."""
        self._group: set[int] = set()
        """The optimizers (ids) that stepped since the last backward: one update together."""
        self._group_size = 1
        """How many optimizers made the last complete update (a trial stops after all of them)."""
        self._full_windows: set[int] = set()
        """Accumulation windows k seen whole ((loss / k).backward() k times before a step)."""
        self._backwards = 0
        self._depth = 0
        self._pending: list[_Root] = []
        self._in_step: list[_Root] = []
        self._acc_peak = 0
        self._last_batch: int | None = None
        self._draws = 0
        self._scaler_step_depth = 0
        self._scaler_stepped = False
        self._optimizers: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._best_peak = -1
        self._breakdown: MemoryBreakdown | None = None
        self._baseline = 0
        self._notes: list[str] = []
        self._inputs_since_step: int | None = None
        self._inputs_since_backward: int | None = None
        self._fwd_depth = 0
        self._fwd_lead: int | None = None
        self._forwards = 0
        self._input_batch: int | None = None
        self._step_input_batch: int | None = None
        self._input_seen = False
        self._inputs_hook: Any = None
        self._incomplete: str | None = None
        self._data_s = 0.0
        """Time in DataLoader ``__next__``/``iter()`` since the last step ended."""
        self._drew = False
        self._t_first_call: float | None = None
        """When the step's first module call began (the end of its data wait without a DataLoader)."""
        self._host = None
        self._host_baseline = None
        self._host_max: int | None = None
        self._loader_stats: weakref.WeakKeyDictionary[Any, dataloading.LoaderStats] = weakref.WeakKeyDictionary()
        self._iter_stats: weakref.WeakKeyDictionary[Any, dataloading.LoaderStats] = weakref.WeakKeyDictionary()
        self._all_loaders: list[dataloading.LoaderStats] = []

    def _open_session(self) -> MemorySession:
        """The measuring session; a dry run (:mod:`gpumagic.dryrun`) gives one over fake tensors."""
        return self.backend.open_session(self.device, self.budget, self._exclude)

    def _nbytes(self, t: Any, seen: set[int]) -> int:
        """Bytes of ``t``'s storage on the measured device, once per storage (``seen``)."""
        return storage_bytes(t, self.device, seen)

    def _install(self) -> None:
        import torch.optim.optimizer as optmod
        import torch.utils.data.dataloader as dlmod

        h1 = optmod.register_optimizer_step_pre_hook(self._step_pre)
        self._cleanup.append(h1.remove)
        h2 = optmod.register_optimizer_step_post_hook(self._step_post)
        self._cleanup.append(h2.remove)

        if self._stop_forwards is not None:
            import torch.nn.modules.module as modmod

            h3 = modmod.register_module_forward_pre_hook(self._forward_pre)
            self._cleanup.append(h3.remove)
            h4 = modmod.register_module_forward_hook(self._forward_post, always_call=True)
            self._cleanup.append(h4.remove)
        if self._learn_inputs:
            # torch.compile's module warns when any global module hook exists: ours reads the first
            # call of a step (the compiled wrapper's, with the same inputs) and is gone before the
            # inner module's call, so the extra call it warns about never reaches it
            quiet = contextlib.ExitStack()
            quiet.enter_context(ignored_warnings(_COMPILE_HOOK_WARNING, UserWarning))
            self._cleanup.append(quiet.close)
            self._cleanup.append(self._unhook_inputs)
            self._hook_inputs()
        self._patch(torch.autograd, "backward", self._wrap_backward)
        self._patch(dlmod._BaseDataLoaderIter, "__next__", self._wrap_next)
        self._patch(dlmod._BaseDataLoaderIter, "_next_index", _wrap_next_index)
        self._patch(dlmod.DataLoader, "__iter__", self._wrap_iter)
        self._patch(dlmod._MultiProcessingDataLoaderIter, "_shutdown_workers", self._wrap_shutdown)
        scaler_cls = getattr(getattr(torch, "amp", None), "GradScaler", None)
        if scaler_cls is not None:
            self._patch(scaler_cls, "scale", self._wrap_scale)
            self._patch(scaler_cls, "step", self._wrap_scaler_step)

    def _patch(self, owner: Any, name: str, wrap: Callable[[Any], Any]) -> None:
        """Install ``wrap(original)`` as ``owner.name`` until teardown, which removes only what it
        installed: when the cell replaced the attribute itself (``torch.autograd.backward = mine``,
        perhaps calling ours), the cell's stays, and ours calls straight through from then on."""
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        wrapper = wrap(original)
        live = [True]

        def installed(*args: Any, **kwargs: Any) -> Any:
            return (wrapper if live[0] else original)(*args, **kwargs)

        functools.update_wrapper(installed, original)
        setattr(owner, name, installed)

        def undo() -> None:
            live[0] = False
            current = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
            if current is installed:
                setattr(owner, name, original)

        self._cleanup.append(undo)

    def _teardown(self) -> None:
        errors: list[BaseException] = []
        while self._cleanup:
            undo = self._cleanup.pop()
            try:
                undo()
            except BaseException as e:  # keep undoing the rest; report the first failure
                errors.append(e)
        try:
            if self._host is not None:
                self._host.close()
            if self._session is not None:
                self._session.stop()
        finally:
            if self in _ACTIVE:
                _ACTIVE.remove(self)
        if errors:
            raise errors[0]

    # -- wrappers ----------------------------------------------------------------------------
    def _wrap_backward(self, original: Callable[..., Any]) -> Callable[..., Any]:
        tracker = self

        def backward(tensors: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                tracker._backward_begin(tensors)
            except Exception as e:
                tracker._fault("the backward hook", e)
            result = original(tensors, *args, **kwargs)
            try:
                tracker._backward_end()
            except Exception as e:  # StopTrial is a BaseException: it passes
                tracker._fault("the backward hook", e)
            return result

        backward.__wrapped__ = original  # type: ignore[attr-defined]
        backward.__doc__ = original.__doc__
        return backward

    def _wrap_next(self, original: Callable[..., Any]) -> Callable[..., Any]:
        tracker = self

        def __next__(it: Any) -> Any:
            t0, c0 = time.perf_counter(), time.thread_time()
            batch = original(it)
            seconds, cpu = time.perf_counter() - t0, time.thread_time() - c0
            try:
                # the indices the batch was made from; else the first tensor's length (a collate_fn
                # may put tokens first, as text loaders with offsets do: the indices decide then)
                size = it.__dict__.pop("_gpumagic_indices", None)
                if size is None:
                    t = _first_tensor(batch)
                    size = int(t.shape[0]) if t is not None and t.dim() > 0 else None
                tracker._drawn(it, seconds, cpu, size)
                tracker._last_batch = size
                tracker._draws += 1
                n = input_elements(batch)
                if n is not None:
                    tracker._inputs_since_step = n + (tracker._inputs_since_step or 0)
                    tracker._inputs_since_backward = n + (tracker._inputs_since_backward or 0)
                if tracker.on_batch is not None:
                    tracker.on_batch(it, size)
            except Exception as e:
                tracker._fault("the DataLoader hook", e)
            return batch

        return __next__

    def _wrap_iter(self, original: Callable[..., Any]) -> Callable[..., Any]:
        tracker = self

        def __iter__(loader: Any) -> Any:
            t0 = time.perf_counter()
            it = original(loader)
            try:
                tracker._iterated(loader, it, time.perf_counter() - t0)
            except Exception as e:
                tracker._fault("the DataLoader hook", e)
            return it

        return __iter__

    def _wrap_shutdown(self, original: Callable[..., Any]) -> Callable[..., Any]:
        tracker = self

        def _shutdown_workers(it: Any) -> Any:
            try:
                tracker._read_workers(it)  # their peaks, while they live
            except Exception as e:
                tracker._fault("the DataLoader worker reader", e)
            return original(it)

        return _shutdown_workers

    def _iterated(self, loader: Any, it: Any, seconds: float) -> None:
        """A pass over ``loader`` began: its start-up (forking workers) is data wait."""
        self._data_s += seconds
        self._drew = True
        st = self._loader_stats.get(loader)
        if st is None:
            st = dataloading.LoaderStats(
                num_workers=int(getattr(loader, "num_workers", 0) or 0),
                pin_memory=bool(getattr(loader, "pin_memory", False)),
                persistent_workers=bool(getattr(loader, "persistent_workers", False)),
                dataset_id=id(getattr(loader, "dataset", None)),
                batch_size=getattr(loader, "batch_size", None),
            )
            self._loader_stats[loader] = st
            self._all_loaders.append(st)
        st.iters += 1
        st.wall_seconds += seconds
        with contextlib.suppress(TypeError):
            self._iter_stats[it] = st

    def _drawn(self, it: Any, seconds: float, cpu: float, size: int | None) -> None:
        self._data_s += seconds
        self._drew = True
        st = self._iter_stats.get(it)
        if st is None:
            return
        st.draws += 1
        st.samples += size or 0
        st.wall_seconds += seconds
        st.cpu_seconds += cpu
        workers = getattr(it, "_workers", None)
        if workers and not st.worker_pids:
            st.worker_pids.update(p.pid for p in workers if getattr(p, "pid", None))

    def _read_workers(self, it: Any) -> None:
        st = self._iter_stats.get(it)
        workers = getattr(it, "_workers", None) or ()
        if st is None or not getattr(it, "_workers_status", None):
            return
        for p in workers:
            pid = getattr(p, "pid", None)
            if pid is None or not p.is_alive():
                continue
            st.worker_pids.add(pid)
            peak, private = process_memory(pid)
            if peak is not None:
                st.worker_peak_bytes = max(peak, st.worker_peak_bytes or 0)
            if private is not None:
                st.worker_private_bytes = max(private, st.worker_private_bytes or 0)

    def _wrap_scale(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def scale(scaler: Any, outputs: Any) -> Any:
            scaled = original(scaler, outputs)
            if isinstance(scaled, torch.Tensor) and isinstance(outputs, torch.Tensor):
                with contextlib.suppress(AttributeError, RuntimeError):
                    scaled._gpumagic_unscaled = outputs  # type: ignore[attr-defined]
            return scaled

        return scale

    def _wrap_scaler_step(self, original: Callable[..., Any]) -> Callable[..., Any]:
        tracker = self

        def step(scaler: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            tracker._scaler_step_depth += 1
            tracker._scaler_stepped = False
            try:
                result = original(scaler, optimizer, *args, **kwargs)
            finally:
                tracker._scaler_step_depth -= 1
            if not tracker._scaler_stepped and tracker._scaler_step_depth == 0:
                # inf/NaN gradients: the scaler skipped optimizer.step(), but the user's step happened
                try:
                    tracker._end_step(optimizer)
                except Exception as e:
                    tracker._fault("the GradScaler hook", e)
            return result

        return step

    # -- events ------------------------------------------------------------------------------
    def _root_value(self, tensors: Any) -> _Root:
        t = tensors if isinstance(tensors, torch.Tensor) else None
        if t is None and isinstance(tensors, (list, tuple)) and len(tensors) == 1:
            t = tensors[0] if isinstance(tensors[0], torch.Tensor) else None
        if t is None or t.numel() != 1:
            return _Root(None, None, self._last_batch, self._draws)
        unscaled = getattr(t, "_gpumagic_unscaled", None)
        if isinstance(unscaled, torch.Tensor) and unscaled.numel() == 1:
            t = unscaled
        if t.is_meta or is_fake(t):
            return _Root(None, None, self._last_batch, self._draws)  # a traced step: there is no value to read
        divisor = _divisor(t)
        value: Any = t.detach().item() if t.is_cpu else t.detach()
        return _Root(value, divisor, self._last_batch, self._draws)

    def _backward_begin(self, tensors: Any) -> None:
        root = self._root_value(tensors)
        root.guess = self._step_input_batch
        if self._depth:
            self._in_step.append(root)
        else:
            if self._group:  # a backward ends the update the optimizers since the last one made together
                self._group_size = len(self._group)
                self._group = set()
            self._pending.append(root)
            if len(self._pending) > 4096:  # a loop without optimizer: keep the list bounded
                del self._pending[:-1024]

    def _backward_end(self) -> None:
        self._backwards += 1
        assert self._session is not None
        w = self._session.take_window_peak()
        if self._acc_peak < w:
            self._acc_peak = w
        if self._opt_steps == 0 and not self._depth:
            # No optimizer has stepped (yet): each backward is a step, recorded provisionally and
            # replaced by optimizer steps as soon as one happens.
            now = time.perf_counter()
            roots = self._pending[-1:]
            inputs, self._inputs_since_backward = self._inputs_since_backward, None
            self._record(roots, w, now - self._t_last_backward, inputs)
            self._t_last_backward = time.perf_counter()  # the recording itself is no step's time
            if self._stop_backwards is not None and self._backwards >= self._stop_backwards:
                raise StopTrial(f"{self._backwards} backward calls")

    def _step_pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._depth += 1

    def _step_post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._depth = max(0, self._depth - 1)
        if self._scaler_step_depth:
            self._scaler_stepped = True
        if self._depth == 0:
            try:
                self._end_step(optimizer)
            except Exception as e:  # StopTrial is a BaseException: it passes
                self._fault("the optimizer step hook", e)

    def _fault(self, where: str, e: Exception) -> None:
        """An error of ours: the report says it is incomplete, the user's code goes on."""
        if self._incomplete is None:
            self._incomplete = f"{where} failed: {describe(e)}"

    def _note_incomplete(self, why: str) -> None:
        if self._incomplete is None:
            self._incomplete = why

    def _end_step(self, optimizer: Any) -> None:
        assert self._session is not None
        carry: tuple[float | None, int | None] | None = None
        if self._opt_steps == 0 and self._records.total:
            # provisional backward-only records: this step spans them, their data waits and host peaks
            early = self._records.records()
            data = None if any(r.data is None for r in early) else sum(r.data or 0.0 for r in early)
            carry = data, max((r.host for r in early if r.host is not None), default=None)
            self._records = _Records(self._max_records)
        in_step, self._in_step = self._in_step, []
        pending, self._pending = self._pending, []
        now = time.perf_counter()
        peak = max(self._acc_peak, self._session.take_window_peak())
        self._acc_peak = 0
        inputs, self._inputs_since_step = self._inputs_since_step, None
        self._inputs_since_backward = None
        key = id(optimizer)
        if not in_step and not pending and self._group and key not in self._group and self._records.items:
            # no backward since another optimizer stepped: both apply the same gradients, one update
            rec = self._records.items[-1]
            rec.peak = max(rec.peak, peak)
            data = self._step_data(now - self._t_last_step)
            if rec.data is not None and data is not None:
                rec.data += data
            host = self._take_host()
            if host is not None:
                rec.host = max(host, rec.host or 0)
            rec.seconds += now - self._t_last_step
            if inputs is not None:
                rec.inputs = inputs + (rec.inputs or 0)
        else:
            self._opt_steps += 1
            self._group = set()
            # a closure's first backward is what step returns (LBFGS re-evaluates it many times);
            # backward calls before the step (Lightning's accumulation) add their gradients to it
            roots = pending + in_step[:1]
            drawn_since = self._data_s if self._drew else 0.0
            rec = self._record(roots, peak, now - self._t_last_step, inputs)
            if carry is not None:
                rec.data = None if carry[0] is None else min(carry[0] + drawn_since, rec.seconds)
                if carry[1] is not None:
                    rec.host = max(carry[1], rec.host or 0)
        self._group.add(key)
        self._optimizers.add(optimizer)
        if peak > self._best_peak:
            self._best_peak = peak
            self._breakdown = self._breakdown_at(peak, rec.index)
        self._t_last_step = time.perf_counter()  # recording, merging and the breakdown are no step's time
        if (self._stop_steps is not None and self._opt_steps >= self._stop_steps
                and len(self._group) >= self._group_size):
            raise StopTrial(f"{self._opt_steps} optimizer steps")

    def _forward_pre(self, module: torch.nn.Module, args: Any) -> None:
        """Evaluation steps: a forward of the outermost module with parameters (not a loss
        module, not a submodule of one running) ends the previous step when it starts again."""
        depth = self._fwd_depth
        self._fwd_depth += 1
        if depth or self._backwards or self._opt_steps:
            return
        if self._fwd_lead is None:
            if next(module.parameters(), None) is None:
                return
            self._fwd_lead = id(module)
        if id(module) != self._fwd_lead:
            return
        if self._forwards and self._forwards >= (self._stop_forwards or 0):
            self._fwd_depth -= 1  # this forward does not run
            raise StopTrial(f"{self._forwards} forward calls")

    def _hook_inputs(self) -> None:
        """Watch for the next module call (the first of a step). A global module hook sends every
        module call through torch's slower path with hooks, so it is there only until that call."""
        import torch.nn.modules.module as modmod

        if self._learn_inputs and self._inputs_hook is None and self._session is not None:
            self._inputs_hook = modmod.register_module_forward_pre_hook(self._inputs_pre)

    def _unhook_inputs(self) -> None:
        hook, self._inputs_hook = self._inputs_hook, None
        if hook is not None:
            hook.remove()

    def _inputs_pre(self, module: torch.nn.Module, args: Any) -> None:
        """The batch size of a loop without DataLoader: the leading dimension of the inputs of the
        step's first module call (the outermost one); the hook then leaves until the next step."""
        if self._input_seen:
            return
        self._input_seen = True
        self._t_first_call = time.perf_counter()
        try:
            self._unhook_inputs()
            size = leading_dimension(args)
        except Exception as e:
            self._fault("the module input hook", e)
            return
        self._step_input_batch = size
        if size is not None:
            self._input_batch = size

    def _forward_post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self._fwd_depth = max(0, self._fwd_depth - 1)
        if self._fwd_depth or id(module) != self._fwd_lead or self._backwards or self._opt_steps:
            return
        if output is None:  # always_call: the forward raised, no step completed
            return
        assert self._session is not None
        self._forwards += 1
        now = time.perf_counter()
        inputs, self._inputs_since_step = self._inputs_since_step, None
        self._record([], self._session.take_window_peak(), now - self._t_last_step, inputs)
        self._t_last_step = time.perf_counter()  # the recording itself is no step's time

    def _partial_window(self, roots: list[_Root]) -> bool:
        """Whether ``roots`` are a window of ``(loss / k).backward()`` calls shorter than k, after a
        full window of k was seen in the block (a single ``sum / batch_size`` is no window)."""
        ks = {r.divisor for r in roots}
        if len(ks) != 1:
            return False
        k = ks.pop()
        if k is None or k < 2 or not float(k).is_integer():
            return False
        n = len(roots)
        if n == k:
            self._full_windows.add(int(k))
            return False
        return n < k and int(k) in self._full_windows

    def _record(self, roots: list[_Root], peak: int, seconds: float, inputs: int | None = None) -> _Rec:
        terms: list[tuple[Any, float]] | None = None
        batch: int | None = None
        if roots and all(r.value is not None for r in roots):
            # the loss whose gradient the step applied: the sum of what backward was called on
            terms = [(r.value, 1.0) for r in roots]
        partial = self._partial_window(roots)
        if roots and all(r.batch is not None for r in roots):
            batch = sum({r.draw: r.batch or 0 for r in roots}.values())
        if not roots:
            batch = self._last_batch
        guessed = False
        if batch is None:  # no DataLoader batch (a DataLoader's size always wins): the inputs' guess
            guess = next((r.guess for r in roots if r.guess is not None), self._step_input_batch)
            batch, guessed = guess, guess is not None
        self._step_input_batch, self._input_seen = None, False  # the next module call starts a step
        try:
            self._hook_inputs()
        except Exception as e:
            self._fault("the module input hook", e)
        data = self._step_data(seconds)
        host = self._take_host()
        rec = _Rec(self._records.total, terms, peak, seconds, batch, 1, inputs, guessed, partial, data, host)
        self._records.add(rec)
        if self._on_step is not None:
            self._on_step(StepRecord(rec.index, rec.loss, peak, seconds, batch, 1, inputs, guessed,
                                     partial_window=partial, data_seconds=data,
                                     compute_seconds=None if data is None else seconds - data, host_peak_bytes=host))
        return rec

    def _step_data(self, seconds: float) -> float | None:
        """The step's data wait (see ``StepRecord.data_seconds``); starts the next step's count."""
        if self._drew:
            data: float | None = self._data_s
        elif self._t_first_call is not None:
            data = self._t_first_call - (time.perf_counter() - seconds)
        else:
            data = None
        self._data_s, self._drew, self._t_first_call = 0.0, False, None
        return None if data is None else min(max(data, 0.0), seconds)

    def _take_host(self) -> int | None:
        """The host peak since the last step, starting the next interval."""
        if self._host is None:
            return None
        peak = self._host.take()
        if peak is not None and (self._host_max is None or peak > self._host_max):
            self._host_max = peak
        return peak

    def _breakdown_at(self, peak: int, index: int) -> MemoryBreakdown | None:
        """Parameters, gradients and optimizer state of the optimizers seen; the rest is other."""
        seen: set[int] = set()

        def nbytes(t: Any) -> int:
            return self._nbytes(t, seen)

        params = grads = state = 0
        for opt in list(self._optimizers):
            for group in opt.param_groups:
                for p in group["params"]:
                    params += nbytes(p)
                    grads += nbytes(p.grad)
            for st in opt.state.values():
                for v in st.values():
                    state += nbytes(v)
        if params == 0:
            return None
        return MemoryBreakdown(params, grads, state, max(0, peak - params - grads - state), index)

    # -- report ------------------------------------------------------------------------------
    def _finish(self, error: BaseException | None) -> None:
        session = self._session
        assert session is not None
        end = session.current()
        session.take_window_peak()
        recs = self._records.records()
        peak = max(session.peak(), self._baseline)
        notes = list(session.notes) + self._notes
        if self._records.stride > 1:
            notes.append(f"{self._records.total} steps downsampled to {len(recs)} records of {self._records.stride}")
        if any(r.guessed for r in recs):
            notes.append(GUESSED_NOTE)
        if self._pending and self._opt_steps:
            notes.append(f"{len(self._pending)} backward call(s) after the last optimizer step are not in any step")
        err = None
        if error is not None and not isinstance(error, StopTrial):
            err = describe(error)
        steps = tuple(StepRecord(r.index, r.loss, r.peak, r.seconds, r.batch, r.count, r.inputs, r.guessed,
                                 partial_window=r.partial, data_seconds=r.data,
                                 compute_seconds=None if r.data is None else r.seconds - r.data, host_peak_bytes=r.host)
                      for r in recs)
        host_fields = self._host_fields(steps)
        incomplete = self._incomplete or getattr(session, "incomplete", None)
        self._report = MemoryReport(
            backend=session.backend,
            device=session.device,
            baseline_bytes=self._baseline,
            peak_bytes=peak,
            peak_delta_bytes=peak - self._baseline,
            end_bytes=end,
            reserved_peak_bytes=session.reserved_peak(),
            capacity_bytes=session.capacity(),
            wall_seconds=time.perf_counter() - self._t0,
            steps=steps,
            budget_bytes=self.budget,
            breakdown=self._breakdown,
            total_steps=self._records.total,
            error=err,
            notes=tuple(notes),
            incomplete=incomplete,
            **host_fields,
        )

    def _host_fields(self, steps: tuple[StepRecord, ...]) -> dict[str, Any]:
        """The report's step anatomy and host memory: data wait, loader advice, host and worker peaks."""
        from gpumagic.backends.cpu import host_memory

        if not self._measures_time_and_host:
            return {}

        self._take_host()
        for it in list(self._iter_stats.keys()):  # persistent workers still alive
            self._read_workers(it)
        total, available = host_memory()
        loaders = self._all_loaders
        workers = [ld for ld in loaders if ld.worker_pids]
        peaks = [ld.worker_peak_bytes for ld in workers if ld.worker_peak_bytes is not None]
        privates = [ld.worker_private_bytes for ld in workers if ld.worker_private_bytes is not None]
        advice = dataloading.loader_advice(steps, loaders, cores=dataloading.available_cores(),
                                           pin_helps=self.backend.loader_pin_memory)
        return {
            "data_wait_fraction": dataloading.data_wait_fraction(steps),
            "loader_advice": advice,
            "host_baseline_bytes": self._host_baseline,
            "host_peak_bytes": self._host_max,
            "host_peak_sampled": self._host is not None and self._host.sampled,
            "host_total_bytes": total,
            "host_available_bytes": available,
            "worker_count": max((ld.num_workers for ld in workers), default=0),
            "worker_peak_bytes": max(peaks) if peaks else None,
            "worker_private_bytes": max(privates) if privates else None,
            "host_advice": dataloading.host_advice(loaders, self._host_max, total),
        }

    def _fallback_report(self, error: BaseException | None) -> MemoryReport:
        """What is known when the full report could not be made: the cell's figures, no steps."""
        session = self._session
        peak = end = self._baseline
        with contextlib.suppress(Exception):
            assert session is not None
            peak, end = max(session.peak(), self._baseline), session.current()
        return MemoryReport(
            backend=getattr(session, "backend", "unknown"),
            device=str(self.device),
            baseline_bytes=self._baseline,
            peak_bytes=peak,
            peak_delta_bytes=peak - self._baseline,
            end_bytes=end,
            reserved_peak_bytes=None,
            capacity_bytes=None,
            wall_seconds=time.perf_counter() - self._t0,
            budget_bytes=self.budget,
            error=None if error is None or isinstance(error, StopTrial) else describe(error),
            incomplete=self._incomplete,
        )


def __getattr__(name: str) -> Any:
    # gpumagic.tracking.track was a second, narrower track(); the one entry point is gpumagic.track
    if name == "track":
        import importlib
        import warnings

        warnings.warn("gpumagic.tracking.track is deprecated: use gpumagic.track (gpumagic.measure.track)",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module("gpumagic.measure").track
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

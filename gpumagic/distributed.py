"""Data parallelism: per-rank reports gathered, batch-size trials agreed across ranks.

Under ``torch.distributed`` every rank runs gpumagic on its own device. Two things then need
the other ranks:

* :func:`gather_ranks` turns one rank's :class:`~gpumagic.report.MemoryReport` into one that
  holds every rank's summary (one collective on the default group, after the measured block);
* :class:`TrialAgreement` makes a batch-size search take the same path on every rank. A trial's
  outcome is agreed on a separate gloo group (host memory only, so a rank whose device is full
  can still vote), with a timeout, at the end of every backward and at the end of the trial: an
  out-of-memory error on any rank is one for all. Trial steps run under DDP's ``no_sync`` (no
  collective inside the user's forward/backward) and gradients are averaged by gpumagic only
  after the vote said every rank got there, so a rank that failed in its forward is never
  awaited inside a gradient all-reduce; DDP's reducer is never left mid-iteration.

Tracking also reaches child processes started from a tracked cell (``notebook_launcher``,
``torch.multiprocessing.start_processes``): :func:`propagate_to_children` names a directory in
the environment variable ``GPUMAGIC_CHILD_REPORTS``; a child forked by ``start_processes``
(or a spawned one that imports gpumagic) measures itself and writes its summary there when it
ends, and the parent reads them back with :func:`collect_children`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import torch

from gpumagic._ranks import gather_ranks, initialized, rank, rank_record, world_size
from gpumagic.report import BatchSearchResult, MemoryReport, RankRecord, Trial
from gpumagic.tracking import StopTrial, Tracker, active_tracker

__all__ = [
    "ENV_CHILD_REPORTS",
    "PeerOutOfMemoryError",
    "PeerStopped",
    "TrialAgreement",
    "collect_children",
    "gather_ranks",
    "initialized",
    "propagate_to_children",
    "rank",
    "world_size",
]

ENV_CHILD_REPORTS = "GPUMAGIC_CHILD_REPORTS"
DEFAULT_TIMEOUT_S = 600.0

_GO, _DONE, _OOM, _ERROR = 0, 1, 2, 3  # votes: the largest wins


# ---------------------------------------------------------------------------------------------
# agreed trials


class PeerOutOfMemoryError(torch.OutOfMemoryError):
    """Another rank ran out of memory in this trial: the trial is out of memory on every rank."""


class PeerStopped(RuntimeError):
    """Another rank stopped the search with an error (or Ctrl-C): this rank stops too."""


def _ddp_modules(objects: list[Any]) -> list[Any]:
    from torch.nn.parallel import DistributedDataParallel

    found: dict[int, Any] = {}
    for o in objects:
        if isinstance(o, torch.nn.Module):
            for m in o.modules():
                if isinstance(m, DistributedDataParallel):
                    found[id(m)] = m
    return list(found.values())


class TrialAgreement:
    """Makes every rank's trials end the same way; see the module docstring.

    Every rank must create one at the same point (it creates a process group) and call
    :meth:`close` at the end. ``timeout_s`` bounds every vote: a rank stuck in a collective of
    the user's code makes the others fail with a clear error instead of waiting for ever.
    """

    def __init__(
        self, objects: list[Any], is_oom: Callable[[BaseException], bool], *, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        import torch.distributed as dist

        self._is_oom = is_oom
        self.rank = int(dist.get_rank())
        self.world_size = int(dist.get_world_size())
        self.timeout_s = timeout_s
        # a host-memory group of its own: a rank whose device is full can still vote, and a vote
        # is never paired with a collective of the user's code on the default group
        backend = "gloo" if dist.is_gloo_available() else None
        self._group = dist.new_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        self._ddp = _ddp_modules(objects)
        self._params = [[p for p in m.module.parameters() if p.requires_grad] for m in self._ddp]
        self._concluded: int | None = None

    def close(self) -> None:
        import torch.distributed as dist

        with contextlib.suppress(Exception):
            dist.destroy_process_group(self._group)

    # -- voting --------------------------------------------------------------------------------
    def _vote(self, vote: int) -> tuple[int, int | None]:
        """(largest vote, lowest rank that cast it); one all-reduce on the gloo group."""
        import torch.distributed as dist
        from torch.utils._python_dispatch import _disable_current_modes

        try:
            # outside the tracker's accounting: a rank at its (simulated) budget must still vote
            with _disable_current_modes():
                t = torch.zeros(self.world_size, dtype=torch.int64)
                t[self.rank] = vote
                dist.all_reduce(t, group=self._group)
        except Exception as e:
            self._concluded = _ERROR  # no second vote: it would wait out the timeout again
            first = str(e).splitlines()[0] if str(e) else ""
            raise PeerStopped(
                f"rank {self.rank}: the vote with the other ranks failed (a rank is gone, or stuck for more than "
                f"timeout_s={self.timeout_s:g} s): {type(e).__name__}: {first}"
            ) from None
        votes = t.tolist()
        top = max(votes)
        return top, (votes.index(top) if top != _GO else None)

    def _conclude(self, vote: int) -> None:
        """Cast ``vote``; when any rank ended the trial, raise what this rank must do."""
        if self._concluded is not None:
            return
        top, who = self._vote(vote)
        if top == _GO:
            return
        self._concluded = top
        if vote == top:
            return  # this rank's own ending is the verdict: let it propagate
        if top == _OOM:
            raise PeerOutOfMemoryError(f"rank {who} ran out of memory in this trial")
        if top == _ERROR:
            raise PeerStopped(f"rank {who} stopped the batch-size search with an error")
        raise StopTrial(f"rank {who} ended the trial")

    # -- one trial -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def trial(self) -> Iterator[None]:
        """Around the user's code for one trial (inside the tracker)."""
        self._concluded = None
        flags = [(m, m.require_backward_grad_sync, m.require_forward_param_sync) for m in self._ddp]
        original = torch.autograd.backward
        agreement = self

        def backward(tensors: Any, *args: Any, **kwargs: Any) -> Any:
            result = original(tensors, *args, **kwargs)
            agreement._conclude(_GO)
            agreement._average_gradients()
            return result

        backward.__wrapped__ = original  # type: ignore[attr-defined]
        backward.__doc__ = original.__doc__
        try:
            for m, _, _ in flags:
                # no collective inside the user's code: buffers are not broadcast in forward, and
                # the reducer does nothing in backward (and so is never left mid-iteration)
                m.require_backward_grad_sync = False
                m.require_forward_param_sync = False
            torch.autograd.backward = backward
            yield
        except StopTrial:
            self._conclude(_DONE)
            raise
        except PeerOutOfMemoryError:
            raise
        except BaseException as e:
            self._conclude(_OOM if self._is_oom(e) else _ERROR)
            raise
        else:
            self._conclude(_DONE)
        finally:
            torch.autograd.backward = original
            for m, back, fwd in flags:
                m.require_backward_grad_sync = back
                m.require_forward_param_sync = fwd

    def _average_gradients(self) -> None:
        """What DDP's reducer would have done: every gradient averaged over the ranks, in place."""
        import torch.distributed as dist

        for m, params in zip(self._ddp, self._params, strict=True):
            grads = [p.grad for p in params if p.grad is not None]
            if len(grads) != len(params):
                continue  # unused parameters: ranks may differ in which grads exist; skip
            works = [dist.all_reduce(g, group=m.process_group, async_op=True) for g in grads]
            for w in works:
                if w is not None:
                    w.wait()
            for g in grads:
                g.div_(self.world_size)

    def agree_trial(self, trial: Trial) -> Trial:
        """The trial as every rank will record it: OOM if any rank was, the largest peak, the
        slowest throughput and time, the fewest steps, the largest share of time waiting for data
        (every field a rank measured is agreed: the ranks' results must be equal). One all-reduce."""
        import torch.distributed as dist

        t = torch.zeros(self.world_size, 6, dtype=torch.float64)
        t[self.rank] = torch.tensor([
            float(trial.oom),
            -1.0 if trial.peak_bytes is None else float(trial.peak_bytes),
            -1.0 if trial.samples_per_second is None else trial.samples_per_second,
            trial.seconds,
            float(trial.steps),
            -1.0 if trial.data_wait_fraction is None else trial.data_wait_fraction,
        ], dtype=torch.float64)
        dist.all_reduce(t, group=self._group)
        rows = t.tolist()
        oom = any(r[0] > 0 for r in rows)
        peaks = tuple(None if oom or r[1] < 0 else int(r[1]) for r in rows)
        sps = [r[2] for r in rows]
        return dataclasses.replace(
            trial,
            oom=oom,
            peak_bytes=None if oom or any(p is None for p in peaks) else max(p for p in peaks if p is not None),
            samples_per_second=None if oom or min(sps) < 0 else min(sps),
            seconds=max(r[3] for r in rows),
            steps=int(min(r[4] for r in rows)),
            rank_peak_bytes=peaks,
            data_wait_fraction=None if any(r[5] < 0 for r in rows) else max(r[5] for r in rows),
        )

    def result(self, result: BatchSearchResult, objects: list[Any]) -> BatchSearchResult:
        """The search's result stated per rank and for the global batch (× world size)."""
        from gpumagic.batchmath import lr_note

        optimizer = next((o for o in objects if isinstance(o, torch.optim.Optimizer)), None)
        notes = [f"searched together on {self.world_size} ranks: every trial's outcome agreed, out of memory on "
                 "any rank counting for all; batch sizes are per rank"]
        if not self._ddp:
            notes.append("no DistributedDataParallel model was found (FSDP or another wrapper): its collectives ran "
                         "inside the trial steps; had one rank run out of memory where the others did not, "
                         "only the timeout (timeout_s) would have stopped them")
        lr = result.lr_note
        rec = result.recommended_batch_size
        if rec is not None:
            lr = lr_note(None, rec * result.accumulation_steps * self.world_size, optimizer)
        return dataclasses.replace(result, world_size=self.world_size, lr_note=lr,
                                   notes=(*result.notes, *notes))

    def agree_min(self, value: int) -> int:
        """The smallest ``value`` over the ranks (the device every rank can afford)."""
        import torch.distributed as dist

        t = torch.full((1,), value, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self._group)
        return int(t.item())


# ---------------------------------------------------------------------------------------------
# child processes started from a tracked cell

_CHILD: dict[str, Any] = {}


_LAUNCHERS = ("notebook_launcher(", "start_processes(", "spawn(", "elastic_launch(")


def launches_processes(code: str) -> bool:
    """Whether ``code`` calls a launcher whose children run the training (a launcher cell)."""
    return any(name in code for name in _LAUNCHERS)


@contextlib.contextmanager
def propagate_to_children(device: str | None, budget: int | None) -> Iterator[str]:
    """While active, child processes forked from this one measure themselves (see module doc).

    ``device``: what the children measure (``None``: each child's default, a local rank's own
    GPU where there is one).

    Yields the directory their summaries are written to; it is removed afterwards.
    """
    path = tempfile.mkdtemp(prefix="gpumagic-ranks-")
    spec = json.dumps({"dir": path, "device": device, "budget": budget, "parent": os.getpid()})
    old = os.environ.get(ENV_CHILD_REPORTS)
    os.environ[ENV_CHILD_REPORTS] = spec
    _register_fork_hook()
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop(ENV_CHILD_REPORTS, None)
        else:
            os.environ[ENV_CHILD_REPORTS] = old
        shutil.rmtree(path, ignore_errors=True)


def collect_children(path: str) -> tuple[RankRecord, ...]:
    """The summaries the children wrote to ``path``, by rank."""
    out: list[RankRecord] = []
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(path)):
            if name.endswith(".json"):
                with contextlib.suppress(OSError, ValueError, TypeError), open(os.path.join(path, name)) as f:
                    out.append(RankRecord(**json.load(f)))
    return tuple(sorted(out, key=lambda r: r.rank))


_HOOKED: list[bool] = []


def _register_fork_hook() -> None:
    if not _HOOKED and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _HOOKED.append(True)


def _after_fork_in_child() -> None:
    """In a child just forked while a cell propagates tracking: if ``torch.multiprocessing``'s
    ``start_processes`` forked it (not, say, a DataLoader worker), measure what it runs."""
    spec = os.environ.get(ENV_CHILD_REPORTS)
    if not spec or _CHILD:
        return
    with contextlib.suppress(Exception):
        process: Any = None
        frame: FrameType | None = sys._getframe(1)
        launched = False
        while frame is not None:
            if frame.f_code.co_name == "_launch" and process is None:
                process = frame.f_locals.get("process_obj")
            if frame.f_code.co_name == "start_processes" and frame.f_globals.get("__name__") == (
                "torch.multiprocessing.spawn"
            ):
                launched = True
            frame = frame.f_back
        target = getattr(process, "_target", None)
        if launched and process is not None and callable(target):
            # the inherited copy of the cell's tracker would record into the parent's state
            inherited = active_tracker()
            if inherited is not None:
                inherited._teardown()
            parsed = json.loads(spec)
            _CHILD["spec"] = parsed

            # start_processes runs _wrap(fn, index, args, error_file): index is the local rank
            index = process._args[1] if len(process._args) > 1 and isinstance(process._args[1], int) else None

            def run_measured(*args: Any, **kwargs: Any) -> Any:
                _start_child(parsed, index)
                try:
                    result = target(*args, **kwargs)
                except BaseException as e:
                    _write_child_report(e)
                    raise
                _write_child_report()
                return result

            process._target = run_measured


def start_from_environment() -> None:
    """Called when gpumagic is imported: a process started (not forked) from a tracked cell,
    e.g. a ``spawn`` child that imports gpumagic, measures itself until it exits."""
    spec = os.environ.get(ENV_CHILD_REPORTS)
    if not spec or _CHILD:
        return
    with contextlib.suppress(Exception):
        parsed = json.loads(spec)
        if parsed.get("parent") == os.getpid():
            return
        import atexit

        _start_child(parsed)
        atexit.register(_write_child_report)  # spawn children end with sys.exit: atexit runs


def _start_child(spec: dict[str, Any], index: int | None = None) -> None:
    """A tracker for this child that does not count as "active": the child's own code may still
    use ``gpumagic.track()`` (the two nest). Local rank ``index`` measures its own GPU."""
    from gpumagic.devices import resolve
    from gpumagic.tracking import _ACTIVE

    named = spec.get("device")
    backend, device = resolve(named)
    if index is not None and (named is None or named == backend.name):  # no index given: one per rank
        own = backend.rank_device(index)
        device = own if own is not None else device
    _keep_process_groups()
    tracker = Tracker(device, spec.get("budget"), gather_ranks=False)
    tracker.__enter__()
    if tracker in _ACTIVE:
        _ACTIVE.remove(tracker)
    _CHILD["tracker"] = tracker
    _CHILD["dir"] = spec["dir"]


def _keep_process_groups() -> None:
    """Keep the child's default process group alive until the process ends.

    Under the tracker's dispatch mode, every gloo collective captures the Python mode stack in its
    thread-local state; the gloo worker thread that destroys a finished collective must take the
    GIL to let go of it. When the user's code drops the last reference to its group (DDP's
    reducer, after ``destroy_process_group()``), the main thread destroys the group and joins that
    worker while holding the GIL: a deadlock, seen as a hung ``notebook_launcher`` cell about one
    run in five on a loaded machine. Holding a reference here means the group is never destroyed
    in the middle of the user's code; a forked rank leaves with ``os._exit``, which runs no
    destructors.
    """
    import torch.distributed as dist

    c10d: Any = getattr(dist, "distributed_c10d", None)
    original = getattr(c10d, "init_process_group", None)
    if original is None or getattr(original, "_gpumagic_keeps", False):
        return
    kept: list[Any] = _CHILD.setdefault("groups", [])

    @functools.wraps(original)
    def init_process_group(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        with contextlib.suppress(Exception):
            kept.append(c10d._get_default_group())
        return out

    init_process_group._gpumagic_keeps = True  # type: ignore[attr-defined]
    c10d.init_process_group = init_process_group
    dist.init_process_group = init_process_group


def _child_rank() -> int:
    r = rank()
    if r is not None:
        return r
    for var in ("RANK", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    import multiprocessing

    args: tuple[Any, ...] = tuple(getattr(multiprocessing.current_process(), "_args", ()))
    # torch.multiprocessing.start_processes passes (fn, index, args, error_file)
    if len(args) >= 2 and isinstance(args[1], int):
        return int(args[1])
    return os.getpid()


def _write_child_report(error: BaseException | None = None) -> None:
    tracker = _CHILD.pop("tracker", None)
    path = _CHILD.pop("dir", None)
    if tracker is None or path is None:
        return
    with contextlib.suppress(Exception):
        tracker.__exit__(None if error is None else type(error), error, None)
    worker = sys.modules.get("torch.utils.data")
    if worker is not None and worker.get_worker_info() is not None:
        return  # a DataLoader worker (spawned) is not a rank
    with contextlib.suppress(Exception):
        rec = rank_record(tracker.report, _child_rank())
        tmp = os.path.join(path, f".{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(dataclasses.asdict(rec), f)
        os.replace(tmp, os.path.join(path, f"rank{rec.rank:05d}-{os.getpid()}.json"))


def with_children(report: MemoryReport, records: tuple[RankRecord, ...]) -> MemoryReport:
    """The cell's report with the children's per-rank table."""
    if not records:
        return report
    return dataclasses.replace(report, ranks=records, world_size=len(records))


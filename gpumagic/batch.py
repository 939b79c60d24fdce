"""Running batch-size trials on the user's own code, and leaving everything as it was.

The search itself is pure (:mod:`gpumagic.search`); this module gives it a ``run_trial(b)`` that
runs the user's loop at batch size ``b`` under the tracker, stops it after ``steps`` optimizer
steps (a :class:`~gpumagic.tracking.StopTrial` raised from the step hook), turns an OOM into a
trial result and frees what the failed trial held. Every trial runs under the undo log of
:mod:`gpumagic.state`, and everything it changed is put back after it (tensor values by the log;
containers, attributes, gradients, RNGs, settings and the namespace's bindings from the snapshot),
also on Ctrl-C and on errors in user code. The copies are gpumagic's own host memory: they are
never counted against the (simulated) device.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from gpumagic import heaviest, views
from gpumagic._gcscan import instances_of
from gpumagic.backends import Backend
from gpumagic.batchmath import DEFAULT_MARGIN, Pick
from gpumagic.dataloading import data_wait_fraction
from gpumagic.devices import DeviceLike, device_label, release_memory, resolve
from gpumagic.options import BadOptions, SearchOptions, parse_budget
from gpumagic.report import BatchSearchResult, Trial
from gpumagic.state import Snapshot
from gpumagic.tracking import BACKWARDS_PER_STEP_CAP, StopTrial, Tracker
from gpumagic.units import format_bytes, format_percent

if TYPE_CHECKING:
    from gpumagic.distributed import TrialAgreement
    from gpumagic.gpus import GPU

__all__ = [
    "BadOptions", "DryRunSettings", "Observed", "Progress", "SearchOptions", "SearchTarget", "StateSnapshot",
    "TrialRunner", "check_var_is_read", "discover_stateful", "find_batch", "find_batch_in_namespace", "is_oom",
    "open_progress", "rebuild_loader", "search_target", "stateful_objects",
]


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error: torch's, ``MemoryError``, or a ``RuntimeError``
    whose message :func:`gpumagic.oom.parse` reads as one."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(exc, RuntimeError):
        from gpumagic import oom

        try:
            return oom.parse(exc) is not None
        except Exception:  # an exception that cannot be read (its __str__ raises) is the user's
            return False
    return False


# ---------------------------------------------------------------------------------------------
# snapshots


def _stateful_types() -> tuple[type, ...]:
    types: list[type] = [torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]
    scaler = getattr(getattr(torch, "amp", None), "GradScaler", None)
    if scaler is not None:
        types.append(scaler)
    return tuple(types)


def stateful_objects(roots: Iterable[Any]) -> list[Any]:
    """Models, optimizers, schedulers and scalers among ``roots`` and what they reference."""
    kinds = _stateful_types()
    found: dict[int, Any] = {}

    def add(o: Any) -> None:
        if isinstance(o, kinds) and id(o) not in found:
            found[id(o)] = o
            if isinstance(o, torch.optim.lr_scheduler.LRScheduler):
                add(o.optimizer)

    for r in roots:
        add(r)
        if isinstance(r, (list, tuple)):
            for v in r[:1000]:
                add(v)
        elif isinstance(r, dict):
            for v in list(r.values())[:1000]:
                add(v)
    # keep top-level modules only: a submodule is restored with its parent
    modules = [o for o in found.values() if isinstance(o, torch.nn.Module)]
    children = {id(c) for m in modules for c in m.modules() if c is not m}
    return [o for o in found.values() if id(o) not in children]


def discover_stateful() -> list[Any]:
    """For the Python API: optimizers, schedulers and scalers alive in the process, and the
    top-level models that own the optimizers' parameters."""
    kinds = _stateful_types()
    opt_like = instances_of(kinds[1:])
    params = {id(p) for o in opt_like if isinstance(o, torch.optim.Optimizer)
              for g in o.param_groups for p in g["params"]}
    models: list[Any] = []
    if params:
        modules = instances_of((torch.nn.Module,))
        owners = {id(m) for m in modules if any(id(p) in params for p in m.parameters(recurse=False))}
        models = [m for m in modules if any(id(c) in owners for c in m.modules())]
    return stateful_objects([*opt_like, *models])


StateSnapshot = Snapshot
"""The snapshot the trials restore (:class:`gpumagic.state.Snapshot`; the name other code imports)."""


# ---------------------------------------------------------------------------------------------
# trials


@dataclass(frozen=True)
class DryRunSettings:
    """Where planned trials run: on fake tensors for ``device`` (a device kind, or "cuda:N"), with
    ``capacity`` (a ``budget``, or the usable memory of ``gpu``, a catalog GPU).

    ``namespace``: the mapping the code reads its objects from (fake copies are bound there for a
    trial); ``objects``: models, optimizers, ... the code reaches otherwise (a closure), whose
    tensors are swapped for fake ones in place for a trial.
    """

    namespace: MutableMapping[str, Any] | None
    device: str
    gpu: GPU | None
    budget: int | None
    capacity: int | None
    objects: tuple[Any, ...] = ()

    @property
    def label(self) -> str:
        """'T4 (cuda)': the device the trials are planned for."""
        return f"{self.gpu.name} ({self.device})" if self.gpu is not None else str(self.device)


@dataclass
class Observed:
    """What the trials taught about the loop."""

    dataset_size: int | None = None
    drop_last: bool = False
    loader_batches: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dataset: Any = None
    collate: Any = None
    step_inputs: list[heaviest.StepInput] = field(default_factory=list)


class TrialRunner:
    """Runs ``body(b)`` as one trial: tracked, cut after ``steps`` steps, OOM caught and freed."""

    def __init__(
        self,
        body: Callable[[int], Any],
        *,
        device: torch.device,
        backend: Backend | None = None,
        budget: int | None,
        steps: int,
        snapshot: StateSnapshot,
        has_optimizer: bool,
        observed: Observed,
        evaluation: bool = False,
        dry_run: DryRunSettings | None = None,
        agreement: TrialAgreement | None = None,
    ) -> None:
        self.dry_run = dry_run
        """Where the trials are planned on fake tensors, when they are (a dry run, a plan first)."""
        self.agreement = agreement
        """Under torch.distributed: makes every rank's trial end the same way."""
        self.body = body
        self.backend = backend
        self.evaluation = evaluation
        self.device = device
        self.budget = budget
        self.steps = steps
        self.snapshot = snapshot
        self.has_optimizer = has_optimizer
        self.observed = observed

    def __call__(self, b: int) -> Trial:
        step_secs: list[float] = []
        records: list[Any] = []

        def on_step(r: Any) -> None:
            step_secs.append(r.seconds)
            records.append(r)

        tracker: Tracker
        if self.dry_run is not None:
            from gpumagic.dryrun import DryTracker

            dry = self.dry_run
            tracker = DryTracker(dry.namespace, device=dry.device, gpu=dry.gpu, budget=dry.budget, steps=self.steps,
                                 exclude_storages=self.snapshot.storage_keys, objects=dry.objects)
        else:
            tracker = Tracker(
                self.device,
                self.budget,
                backend=self.backend,
                stop_after_steps=self.steps if self.has_optimizer else None,
                stop_after_backwards=self.steps * BACKWARDS_PER_STEP_CAP if self.has_optimizer else self.steps,
                stop_after_forwards=self.steps if self.evaluation else None,
                exclude_storages=self.snapshot.storage_keys,
                on_step=on_step,
                gather_ranks=False,
            )
        self._watch_loader(tracker)
        # the batches this trial draws, and only those: a planned trial before it (the plan phase
        # shares this runner's observations) must not make its loader look like it ignores the size
        self.observed.loader_batches = []
        oom = False
        t0 = time.perf_counter()
        try:
            # the undo log below the tracker: it sees every write first, and its copies are never counted
            with self.snapshot.recording(), tracker:
                if self.agreement is None:
                    self.body(b)
                else:
                    with self.agreement.trial():
                        self.body(b)
        except StopTrial:
            pass
        except Exception as e:
            if not is_oom(e):
                raise
            oom = True
            release_memory(e)  # the trial's frames hold its tensors
            e.__traceback__ = None
            del e
        finally:
            seconds = time.perf_counter() - t0
            for problem in self.snapshot.restore():
                if problem not in self.observed.notes:
                    self.observed.notes.append(problem)
        rep = tracker.report
        if not oom:
            self.observed.step_inputs.extend(heaviest.step_inputs(records, b))
        n = rep.total_steps
        note = "no optimizer.step() ran in the trials: each backward() counted as a step"
        manual = (self.has_optimizer and not self.evaluation and tracker.optimizer_steps == 0
                  and tracker.backward_calls)
        if manual and note not in self.observed.notes:
            self.observed.notes.append(note)
        timed = step_secs[1:] if len(step_secs) > 1 else step_secs
        sps = b * len(timed) / sum(timed) if timed and sum(timed) > 0 and not oom else None
        if self.dry_run is not None:  # planned: over the capacity is this trial's out-of-memory
            for skipped in (n for n in rep.notes if n.startswith("not written: ")):  # a plan never writes
                if skipped not in self.observed.notes:
                    self.observed.notes.append(skipped)
            cap = self.dry_run.capacity
            oom = cap is not None and rep.peak_bytes > cap
            return Trial(b, None if oom else rep.peak_bytes, oom, None, seconds, n, planned=True)
        trial = Trial(b, None if oom else rep.peak_bytes, oom, sps, seconds, n,
                      data_wait_fraction=None if oom else data_wait_fraction(records))
        if self.agreement is not None:
            trial = self.agreement.agree_trial(trial)
        return trial

    def _watch_loader(self, tracker: Tracker) -> None:
        obs = self.observed
        tracker.on_batch = lambda it, size: _note_loader(obs, it, size)


def _note_loader(obs: Observed, it: Any, size: int | None) -> None:
    ds = getattr(it, "_dataset", None)
    try:
        n = len(ds) if ds is not None else None
    except TypeError:
        n = None
    if n is not None:
        obs.dataset_size = n
        obs.drop_last = bool(getattr(it, "_drop_last", False))
    if ds is not None:
        obs.dataset = ds
        obs.collate = getattr(it, "_collate_fn", None)
    if size is not None and len(obs.loader_batches) < 10_000:
        obs.loader_batches.append(size)


# ---------------------------------------------------------------------------------------------
# the search: one pipeline, two adapters (the Python API and the magics' namespace form)


def _capacity(backend: Backend, device: torch.device, budget: int | None) -> tuple[int, int | None, str | None]:
    """(capacity used by the search, budget for the tracker, note)."""
    if budget is not None:
        return budget, budget, None
    cap = backend.capacity(device)
    if cap is None:
        raise BadOptions(f"on {backend.name}, give a `budget` (the simulated device capacity), e.g. 4GiB")
    if not backend.session_enforces_capacity:
        return cap, None, None
    return cap, cap, f"no budget was given on {backend.name}: the capacity is the memory free now ({cap} bytes)"


def _dry_run_settings(opts: SearchOptions, namespace: MutableMapping[str, Any] | None,
                      objects: Iterable[Any]) -> DryRunSettings:
    """Where a dry run plans, and its capacity; BadOptions when no capacity is known."""
    from gpumagic.dryrun import plan_target

    kind, g, capacity = plan_target(opts.device, opts.gpu, opts.budget)
    if capacity is None:
        raise BadOptions("a planned search needs a capacity: a `gpu` (e.g. T4) or a `budget` (e.g. 16GiB)")
    return DryRunSettings(namespace, opts.device if opts.device is not None else kind, g, opts.budget, capacity,
                          tuple(objects))


def _run_search(
    runner: TrialRunner,
    *,
    opts: SearchOptions,
    capacity: int,
    dataset_size: int | None,
    drop_last: bool,
    objects: list[Any],
    current: int | None,
    progress: Progress,
    notes: list[str],
) -> BatchSearchResult:
    """Run the search over ``runner``; the result carries ``notes`` and what the trials noticed."""
    from gpumagic import search as search_mod

    # a flag, not the exception: a kept exception's frames would hold this closure, a cycle that
    # keeps the user's tensors alive until the next garbage collection
    user_error: list[bool] = []

    def run_trial(b: int) -> Trial:
        try:
            trial = runner(b)
        except BaseException as e:  # the user's code failed: not an options problem
            if not isinstance(e, BadOptions):
                user_error.append(True)
            raise
        _check_loader_follows(runner.observed, b)
        return trial

    with open_progress(progress) as on_trial:
        try:
            result: BatchSearchResult = search_mod.search(
                run_trial,
                capacity_bytes=capacity,
                start=opts.start,
                min_size=opts.min_size,
                max_size=opts.max_size,
                dataset_size=dataset_size,
                drop_last=drop_last,
                margin=opts.margin,
                pick=opts.pick,
                effective=opts.effective,
                optimizer=next((type(o).__name__ for o in objects if isinstance(o, torch.optim.Optimizer)), None),
                current_batch_size=current,
                progress=on_trial,
                device=runner.dry_run.label if runner.dry_run is not None else device_label(runner.backend,
                                                                                           runner.device),
                learn_dataset_size=lambda: runner.observed.dataset_size,
            )
        except ValueError as e:
            if user_error or isinstance(e, BadOptions):
                raise
            raise BadOptions(str(e)) from None
    notes = notes + runner.observed.notes
    if runner.evaluation:
        import dataclasses

        result = dataclasses.replace(result, evaluation=True)
    return _with_notes(result, notes) if notes else result


Progress = bool | str | Callable[[Trial, int], None] | None
"""What a search reports its trials to: ``True`` or ``"text"`` (a bar on a terminal's stderr, a
line per trial in a log), ``"widget"`` (a bar in the running notebook cell), a callable
``progress(trial, index)`` (its owner closes it), or nothing (``False``, ``None``)."""


@contextlib.contextmanager
def open_progress(progress: Progress) -> Iterator[Callable[[Trial, int], None] | None]:
    """The per-trial callback, chosen here for every caller: the caller's own callable, or a
    reporter of the kind named (``True`` is "text"), opened through :func:`gpumagic.views.progress`
    and closed before the result is shown."""
    kind = _progress_kind(progress)
    if kind is None:
        yield progress if callable(progress) else None
        return
    bar = views.progress(kind, sys.stderr)
    try:
        yield bar
    finally:
        bar.close()


def _progress_kind(progress: Progress) -> str | None:
    """The registered kind ``progress`` names (None for a callable or no progress); BadOptions otherwise."""
    if callable(progress) or progress is None or progress is False:
        return None
    kind = "text" if progress is True else progress
    if not isinstance(kind, str):
        raise BadOptions(f"`progress` must be True, False, a kind such as 'text', or a callable, got {progress!r}")
    views.progress_factory(kind)  # BadOptions naming the kinds there are, for one that is not
    return kind


def _compiled(objects: Iterable[Any]) -> bool:
    """A torch.compile'd module among the objects: not planned on fake tensors (running fake
    tensors through it recompiles it, and dynamo's weakref callbacks fail when they are collected)."""
    return any(type(o).__name__ == "OptimizedModule" for o in objects)


def _report_trial(progress: Progress, trial: Trial, index: int) -> None:
    """Progress for a real trial run outside the search (the plan's verification)."""
    with open_progress(progress) as on_trial:
        if on_trial is not None:
            on_trial(trial, index)


_PLAN_AGREES = 0.03
"""A real trial within this share of the plan verifies it; further off, real trials decide."""


def _search_planned_first(runner: TrialRunner, fake_runner: TrialRunner | None, **kw: Any) -> BatchSearchResult:
    """Plan the memory curve on fake tensors, then spend real trials only to verify it.

    The plan is a whole search on fake tensors (seconds, no device memory). Its recommendation is
    run for real; when the measured peak is within 3% of the plan, one more real trial at the
    largest size the plan (corrected by that ratio) puts under the capacity settles the maximum:
    two real trials, and an out-of-memory error only if the plan is off by more than the margin.
    Otherwise the ordinary search runs on real trials and the result says why.
    """
    from gpumagic.report import Fit

    opts: SearchOptions = kw["opts"]
    if fake_runner is None or opts.pick != "max" or opts.effective is not None:
        return _run_search(runner, **kw)
    from gpumagic.dryrun import one_collection

    failed: str | None = None
    try:
        with one_collection():  # the planned trials: one full garbage collection, at the end
            plan = _run_search(fake_runner, **{**kw, "progress": False})
    except (KeyboardInterrupt, BadOptions):
        raise
    except Exception as e:  # the code cannot run on fake tensors: search as before
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        failed = f"no plan on fake tensors ({type(e).__name__}: {first[:200]}): every trial ran for real"
        e.__traceback__ = None  # its frames hold the fake copies of the user's objects
    if failed is not None:  # searched after the except block, so the exception is gone by then
        return _with_notes(_run_search(runner, **kw), [failed])
    b1, fit = plan.recommended_batch_size, plan.fit
    planned = {t.batch_size: t.peak_bytes for t in plan.trials if not t.oom and t.peak_bytes}
    if b1 is None or fit is None:
        return _with_notes(_run_search(runner, **kw), ["the plan on fake tensors found no size to verify"])
    expected = planned.get(b1) or fit.predict(b1)
    first_trial = runner(b1)
    real = [first_trial]
    if first_trial.oom or not first_trial.peak_bytes or abs(first_trial.peak_bytes / expected - 1) > _PLAN_AGREES:
        got = "ran out of memory" if first_trial.oom else f"measured {format_bytes(first_trial.peak_bytes)}"
        note = (f"the plan on fake tensors was off at batch {b1} (planned {format_bytes(expected)}, {got}): "
                "the search trusted real trials")
        return _with_notes(_run_search(runner, **kw), [note])
    # reported once it verifies the plan: otherwise the search below numbers its own trials from 1
    _report_trial(kw["progress"], first_trial, 0)
    ratio = first_trial.peak_bytes / expected
    capacity = kw["capacity"]
    corrected = Fit(fit.intercept_bytes * ratio, fit.bytes_per_sample * ratio, fit.r2, fit.points)
    # as far under the capacity as the plan was off at b1: an exact plan goes to the planned maximum
    top = corrected.largest_under(capacity * (1 - abs(ratio - 1))) or b1
    for bound in (plan.max_batch_size, opts.max_size, kw["dataset_size"]):
        if bound is not None:
            top = min(top, bound)
    largest = b1
    how = (f"batch {b1} measured {format_bytes(first_trial.peak_bytes)} against {format_bytes(expected)} "
           f"planned ({ratio - 1:+.1%})")
    if top > b1:
        second = runner(top)
        _report_trial(kw["progress"], second, 1)
        real.append(second)
        if second.oom or not second.peak_bytes:
            how += f"; batch {top} ran out of memory"
        else:
            largest = top
            how += (f"; batch {top} measured {format_bytes(second.peak_bytes)} against "
                    f"{format_bytes(corrected.predict(top))}")
    import dataclasses

    verified = [dataclasses.replace(t, planned=False) for t in real]
    reason = (f"planned on fake tensors ({len(plan.trials)} planned trials), verified by {len(real)} real "
              f"trial{'s' if len(real) > 1 else ''}: {how}; {b1} keeps the {format_percent(opts.margin)} margin")
    return dataclasses.replace(
        plan, trials=(*plan.trials, *verified), max_batch_size=largest, recommended_batch_size=b1, fit=corrected,
        predicted_peak_bytes=first_trial.peak_bytes, reason=reason,
    )


def _with_notes(result: BatchSearchResult, notes: Iterable[str]) -> BatchSearchResult:
    import dataclasses

    return dataclasses.replace(result, notes=tuple(result.notes) + tuple(notes))


class LoaderMismatch(BadOptions):
    """The loop's DataLoader did not follow the trial's batch size."""


def _check_loader_follows(obs: Observed, b: int) -> None:
    """The batches the loop drew must have the trial's size; else the variable is not used."""
    sizes = obs.loader_batches
    if not sizes:
        return
    full = sizes[:-1] or sizes  # the last batch of an epoch may be short
    obs.loader_batches = []
    if all(s != b for s in full) and (obs.dataset_size is None or b < obs.dataset_size):
        raise LoaderMismatch(
            f"the loop's DataLoader gave batches of {full[0]} samples when the batch size was {b}: the "
            "batch size does not reach the loader (it was probably built in an earlier cell). "
            "Give that DataLoader as `loader` to let gpumagic rebuild it per trial."
        )


@dataclass
class SearchTarget:
    """How the trials reach the user's code: all that the two forms of the search differ in.

    ``run(b, loader_for)`` runs one trial at batch size ``b``; ``loader_for(b)`` is the copy of
    ``loader`` the trial draws from (None without a loader). ``objects``: the models, optimizers,
    schedulers and scalers restored after the search (with what ``roots`` and ``namespace``
    reach). ``fake_namespace``/``fake_objects``: where a plan on fake tensors finds the objects.
    """

    run: Callable[[int, Callable[[int], Any] | None], Any]
    objects: list[Any]
    has_optimizer: bool
    roots: list[Any] = field(default_factory=list)
    namespace: MutableMapping[str, Any] | None = None
    fake_namespace: MutableMapping[str, Any] | None = None
    fake_objects: tuple[Any, ...] = ()
    loader: Any = None
    loader_name: str = "train_loader"
    size_fn: Any = None
    size_fn_source: str | None = None
    """How the user wrote ``size_fn`` (the magics' expression), for messages."""
    current: int | None = None
    hints: Iterable[Any] = ()
    notes: list[str] = field(default_factory=list)
    agree_across_ranks: bool = False


def search_target(opts: SearchOptions, target: SearchTarget, progress: Progress = True) -> BatchSearchResult:
    """The one search pipeline: capacity, snapshot, trials (planned first where it can), the sample
    sizes' advice, and everything put back. Both :func:`find_batch` and
    :func:`find_batch_in_namespace` are adapters that build ``target``."""
    _progress_kind(progress)  # a wrong kind is refused before anything runs
    loader = target.loader
    if opts.dry_run:
        dry = _dry_run_settings(opts, target.fake_namespace, target.fake_objects)
        backend, dev = resolve("cpu")
        assert dry.capacity is not None
        capacity, tracker_budget, note = dry.capacity, None, None
    else:
        dry = None
        try:
            backend, dev = resolve(opts.device, target.hints if opts.device is None else ())
        except ValueError as e:
            raise BadOptions(str(e)) from None
        budget = opts.budget
        if opts.gpu is not None:
            from gpumagic.gpus import lookup

            budget = lookup(opts.gpu).capacity_bytes
        capacity, tracker_budget, note = _capacity(backend, dev, budget)
    notes = [*target.notes, *([note] if note else [])]
    dataset_size, drop_last = opts.dataset_size, False
    if loader is not None:
        n, drop_last = _loader_facts(loader)
        dataset_size = dataset_size if dataset_size is not None else n
        if n is not None and opts.min_size > n:
            raise BadOptions(f"`min_size` ({opts.min_size}) is larger than the data set of `loader` ({n} samples)")
    objects = target.objects
    has_opt = not opts.evaluation and target.has_optimizer
    agreement = None
    if target.agree_across_ranks and dry is None:
        from gpumagic import _ranks

        if _ranks.initialized():
            from gpumagic.distributed import TrialAgreement

            agreement = TrialAgreement(objects, is_oom, timeout_s=opts.timeout_s)
            capacity = agreement.agree_min(capacity)
            if agreement.rank != 0:
                progress = False  # one progress bar for the job
    snapshot = StateSnapshot.take(objects, target.namespace, roots=target.roots)
    try:
        heavy: _Heaviest | None = None
        if loader is not None:
            try:
                heavy = _Heaviest(loader, target.size_fn, opts.steps, target.loader_name)
            except Exception as e:  # a size_fn of the wrong length or kind, a sample that fails to load
                if target.size_fn is None:
                    what = f"measuring the samples of `loader` {target.loader_name!r}"
                elif target.size_fn_source:
                    what = f"`size_fn` {target.size_fn_source!r}"
                else:
                    what = "`size_fn`"
                raise BadOptions(f"{what}: {type(e).__name__}: {e}") from None
        loader_for = heavy.loader_for if heavy is not None else None

        def body(b: int) -> Any:
            return target.run(b, loader_for)

        runner = TrialRunner(
            body, backend=backend, device=dev, budget=tracker_budget, steps=opts.steps, snapshot=snapshot,
            has_optimizer=has_opt, observed=Observed(), evaluation=opts.evaluation, dry_run=dry,
            agreement=agreement,
        )
        fake_runner = None
        # ranks would plan apart; heaviest batches and forward-only trials are not planned
        if (opts.plan_first and dry is None and agreement is None and heavy is None and not opts.evaluation
                and backend.plans_on_fake_tensors and not _compiled(objects)):
            fake_runner = TrialRunner(
                body, device=dev, budget=None, steps=opts.steps, snapshot=snapshot, has_optimizer=has_opt,
                observed=Observed(), dry_run=DryRunSettings(target.fake_namespace, dev.type, None, capacity,
                                                             capacity, target.fake_objects),
            )
        from gpumagic.dryrun import one_collection

        # a dry run's trials are all plans: one full garbage collection, at the end
        with one_collection() if dry is not None else contextlib.nullcontext():
            result = _search_planned_first(
                runner, fake_runner, opts=opts, capacity=capacity, dataset_size=dataset_size, drop_last=drop_last,
                objects=objects, current=target.current, progress=progress, notes=notes,
            )
        result = _after_search(result, runner, capacity=capacity, margin=opts.margin, heavy=heavy)
        if dry is not None:
            result = _as_dry_run(result, dry)
        if agreement is not None:
            result = agreement.result(result, objects)
    finally:
        try:
            problems = snapshot.restore()
        finally:
            snapshot.close()  # an error's traceback holds this frame: it must not hold the copies too
            if agreement is not None:
                agreement.close()
    return _with_notes(result, [p for p in problems if p not in result.notes])


def find_batch(
    trial_fn: Callable[[int], Any],
    *,
    device: DeviceLike = None,
    budget: str | int | None = None,
    start: int | None = None,
    max_size: int | None = None,
    steps: int = 3,
    margin: float = DEFAULT_MARGIN,
    pick: Pick = "max",
    effective: int | None = None,
    min_size: int = 1,
    dataset_size: int | None = None,
    restore: Iterable[Any] | None = None,
    progress: Progress = True,
    loader: Any = None,
    size_fn: Any = None,
    eval: bool = False,
    dry_run: bool = False,
    gpu: str | None = None,
    namespace: MutableMapping[str, Any] | None = None,
    plan_first: bool = False,
    timeout_s: float = 600.0,
) -> BatchSearchResult:
    """Find the largest (or fastest) batch size that fits, in few trials.

    ``trial_fn(batch_size)`` runs training steps at that batch size; each call is one trial
    (no hidden warm-up runs) and is stopped after ``steps`` optimizer steps. Afterwards everything
    is as before: every tensor the trials wrote in place (through the undo log, whatever holds it),
    and what ``trial_fn``'s closure, ``loader`` and ``restore`` (default: the optimizers alive in the
    process and their models) reach — containers, attributes, gradients, generators — plus the RNG
    states and process-wide settings (see :mod:`gpumagic.state`).

    With ``loader`` (a DataLoader), ``trial_fn`` receives a copy of it at the trial's batch size
    instead of the size, whose every batch holds the heaviest samples of the data set (sizes by
    ``size_fn``: a sequence per index or a function of the index; default: tensor elements).
    With ``eval=True`` a trial is ``steps`` forward calls of the outermost model (no backward).

    Under ``torch.distributed`` call it on every rank with the same arguments: the ranks try the
    same sizes, agree on every trial (out of memory on one rank is out of memory for all) and
    return the same result, whose batch sizes are per rank (``global_batch_size`` is the total).
    ``timeout_s`` bounds how long a rank waits for the others' verdict on a trial.

    >>> res = find_batch(lambda b: train(model, make_loader(b)), budget="8GiB")   # doctest: +SKIP
    >>> res = find_batch(lambda dl: train(model, dl), loader=train_loader)        # doctest: +SKIP
    >>> res.recommended_batch_size                                                # doctest: +SKIP

    ``dry_run=True`` plans every trial on fake tensors (see :func:`gpumagic.track`); objects made
    before are read from ``namespace`` (default: the caller's module globals). ``gpu``: a catalog
    GPU whose usable memory is the capacity (with or without a dry run). ``plan_first=True``: a
    real search first plans on fake tensors and spends real trials only to verify the plan (two
    when it agrees within 3%; otherwise real trials decide, and the result says so). The magic
    ``%find_batch`` plans first by default; here it is opt-in, since ``trial_fn`` is called for
    the planned trials too (it must not count or log its calls as real work). ``progress``: see
    :data:`Progress`. Wrong options raise :class:`BadOptions` (a ``ValueError``) naming the parameter.
    """
    opts = SearchOptions(
        device=device, budget=parse_budget(budget), gpu=gpu, start=start, min_size=min_size, max_size=max_size,
        steps=steps, margin=margin, pick=pick, effective=effective, dataset_size=dataset_size, evaluation=eval,
        dry_run=dry_run, plan_first=plan_first, timeout_s=timeout_s,
    )
    if loader is not None:
        from torch.utils.data import DataLoader

        if not isinstance(loader, DataLoader):
            raise BadOptions(f"`loader` must be a torch DataLoader, got {type(loader).__name__}")
    elif size_fn is not None:
        raise BadOptions("`size_fn` needs a `loader`: it measures the samples of the loader's data set")
    objects = stateful_objects(restore) if restore is not None else discover_stateful()
    if dry_run:  # a dry run reads what the code uses from a namespace; a plan first swaps the objects in place
        ns = namespace if namespace is not None else sys._getframe(1).f_globals
        fake: tuple[MutableMapping[str, Any] | None, tuple[Any, ...]] = (ns, ())
    else:
        fake = (None, tuple(objects))

    def run(b: int, loader_for: Callable[[int], Any] | None) -> Any:
        return trial_fn(b if loader_for is None else loader_for(b))

    target = SearchTarget(
        run, objects, has_optimizer=restore is None or any(isinstance(o, torch.optim.Optimizer) for o in objects),
        roots=[trial_fn, loader], fake_namespace=fake[0], fake_objects=fake[1], loader=loader, size_fn=size_fn,
        agree_across_ranks=True,
    )
    return search_target(opts, target, progress)


def _as_dry_run(result: BatchSearchResult, dry: DryRunSettings) -> BatchSearchResult:
    """A search whose every trial was planned, worded as such."""
    import dataclasses

    note = (f"planned on fake tensors for {dry.label}: no trial ran on a device; each trial's peak is a prediction "
            "and 'OOM' means the plan exceeds the capacity")
    reason = result.reason.replace(" ran out of memory", " would not fit").replace(" ran (", " planned (")
    return dataclasses.replace(result, dry_run=True, device=dry.label, reason=reason, notes=(note, *result.notes))


def rebuild_loader(loader: Any, b: int, sampler: Any = None) -> Any:
    """A copy of ``loader`` with batch size ``b``: same dataset, sampler (or ``sampler``), collate_fn
    and workers."""
    from torch.utils.data import BatchSampler, DataLoader, IterableDataset

    bs = loader.batch_sampler
    if bs is not None and type(bs) is not BatchSampler:
        raise BadOptions(
            f"the loader uses a custom batch_sampler ({type(bs).__name__}); gpumagic cannot change its batch size"
        )
    if loader.batch_size is None:
        raise BadOptions("the loader has batch_size=None (no automatic batching); there is no batch size to change")
    kwargs: dict[str, Any] = dict(
        batch_size=b,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        generator=loader.generator,
        persistent_workers=False,
    )
    if loader.num_workers > 0:
        kwargs["multiprocessing_context"] = loader.multiprocessing_context
        kwargs["prefetch_factor"] = loader.prefetch_factor
    if not isinstance(loader.dataset, IterableDataset):
        kwargs["sampler"] = loader.sampler if sampler is None else sampler
    return DataLoader(loader.dataset, **kwargs)


class _Heaviest:
    """The trials' view of the data set: the heaviest samples (or, for one trial, those no larger
    than a size), drawn by a copy of the user's loader."""

    def __init__(self, loader: Any, size_fn: Any, repeats: int, name: str = "train_loader") -> None:
        self.loader = loader
        self.name = name
        self.repeats = repeats
        self.at_most: float | None = None
        got = heaviest.measure(loader, size_fn)
        self.table = got if isinstance(got, heaviest.SizeTable) else None
        self.why_not = got if isinstance(got, str) else None

    def loader_for(self, b: int) -> Any:
        if self.table is None:
            return rebuild_loader(self.loader, b)
        idx = self.table.sampler(b, 1, self.at_most)
        if 0 < len(idx) < b:  # fewer samples than the batch (a restricted sampler): repeat them
            idx = (idx * (b // len(idx) + 1))[:b]
        return rebuild_loader(self.loader, b, sampler=idx * (self.repeats + 1))

    def run_below(self, runner: TrialRunner) -> Callable[[int, float], Trial]:
        def run(b: int, at_most: float) -> Trial:
            self.at_most = at_most
            try:
                return runner(b)
            finally:
                self.at_most = None

        return run


def _after_search(
    result: BatchSearchResult, runner: TrialRunner, *, capacity: int, margin: float, heavy: _Heaviest | None,
) -> BatchSearchResult:
    """Add what the sizes of the samples mean: the tail advice after heaviest trials, or the fit
    against the per-step input size when the trials could not choose their samples."""
    import dataclasses

    notes: list[str] = []
    changes: dict[str, Any] = {}
    rec = result.recommended_batch_size
    fit = result.fit
    if heavy is not None and heavy.table is not None:
        table = heavy.table
        notes.append(f"every trial step drew the heaviest samples of the data set (sizes: {table.measure}; "
                     f"{table.measured:,} samples measured in {table.seconds:.2f} s)")
        try:
            changes["sample_sizes"] = heaviest.tail_advice(
                table, heaviest_batch=rec or 0, intercept=fit.intercept_bytes if fit else 0.0,
                per_sample=fit.bytes_per_sample if fit and rec else 0.0, capacity=capacity, margin=margin,
                run_below=heavy.run_below(runner), loader_name=heavy.name,
            )
        except Exception as e:  # the search's answer stands; only the tail figures are missing
            notes.append(f"the trial on the lightest 99% failed ({type(e).__name__}: {e}); tail advice omitted")
            changes["sample_sizes"] = heaviest.tail_advice(
                table, heaviest_batch=rec or 0, intercept=0.0, per_sample=0.0, capacity=capacity, margin=margin,
                run_below=heavy.run_below(runner))
    else:
        obs = runner.observed
        if heavy is not None and heavy.why_not:
            notes.append(f"no heaviest-batch search: {heavy.why_not}; the trials drew batches as an epoch would, "
                         "and the answer allows for inputs 25% larger than the largest seen")
        try:
            vi = heaviest.variable_inputs(
                obs.step_inputs, capacity=capacity, margin=margin,
                dataset=None if heavy is not None else obs.dataset, collate=obs.collate, recommended=rec)
        except Exception as e:
            vi = None
            notes.append(f"could not relate peak memory to input size ({type(e).__name__}: {e})")
        if vi is not None:
            changes["variable_inputs"] = vi
            msg = (f"input sizes varied by more than {heaviest.VARIES:.0%} between trial steps "
                   f"({vi.smallest_elements:,} to {vi.largest_elements:,} elements): memory follows the largest input")
            if vi.predicted_peak_bytes is not None and vi.worst_elements is not None:
                msg += (f"; {vi.worst_source} ({vi.worst_elements:,} elements) would need about "
                        f"{format_bytes(vi.predicted_peak_bytes)}")
            if (vi.surviving_batch_size is not None and rec is not None and vi.surviving_batch_size < rec
                    and result.accumulation_steps == 1 and result.effective_batch_size is None):
                changes["recommended_batch_size"] = vi.surviving_batch_size
                changes["predicted_peak_bytes"] = vi.surviving_peak_bytes
                # the why states the number the headline shows: the one computed here, not the search's
                changes["reason"] = (
                    f"{vi.surviving_batch_size} is the largest whose largest input ({vi.worst_source}) is "
                    f"predicted to fit {format_percent(1 - margin)} of {format_bytes(capacity)}; the trials' own "
                    f"batches alone gave {rec}")
                notes.append(f"before allowing for the largest input: {result.reason}")
                msg += (f"; recommended {vi.surviving_batch_size} instead of {rec}, the largest that survives it"
                        + ("" if heavy is not None else "; the DataLoader, built in an earlier cell and given to the "
                           "search (%find_batch --loader NAME, find_batch(loader=...)), lets the trials draw the "
                           "heaviest batches"))
            elif vi.surviving_batch_size is not None:
                msg += f"; {vi.surviving_batch_size} survives it"
            notes.append(msg)
    if not notes and not changes:
        return result
    changes["notes"] = tuple(result.notes) + tuple(notes)
    return dataclasses.replace(result, **changes)


def _globals_read(fn: Any, ns: Any) -> set[str]:
    """Global names read by a function defined in ``ns`` (the notebook), nested functions included."""
    code = getattr(fn, "__code__", None)
    if code is None or getattr(fn, "__globals__", None) is not ns:
        return set()
    out: set[str] = set()
    todo = [code]
    while todo:
        c = todo.pop()
        out.update(c.co_names)
        todo.extend(k for k in c.co_consts if hasattr(k, "co_names"))
    return out


def check_var_is_read(code: str, var: str, ns: Any) -> None:
    """Refuse a ``var`` that neither the code nor any function of the notebook reads: a trial would
    change nothing (a typo, or the loader was built in an earlier cell). ``code`` is Python (the
    IPython layer passes the cell after its transformations)."""
    import ast
    import inspect

    try:
        tree = ast.parse(code)
    except SyntaxError:
        return  # the trial will show the user's syntax error
    in_code = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    if var in in_code or {"globals", "eval", "exec", "get_ipython"} & in_code:
        return
    for value in list(ns.values()):
        try:
            fns = list(vars(value).values()) if inspect.isclass(value) else [value]
            if any(var in _globals_read(inspect.unwrap(f) if callable(f) else f, ns) for f in fns):
                return
        except Exception:  # an object that cannot be inspected says nothing
            continue
    missing = "" if var in ns else ", and no variable of that name exists"
    ints = sorted(n for n in in_code if isinstance(ns.get(n), int) and not isinstance(ns.get(n), bool))
    hint = f" (integers it reads: {', '.join(ints)})" if ints else ""
    raise BadOptions(
        f"`var` {var!r}: the code never reads a variable of that name{missing}; give the name of the "
        f"batch-size variable the code uses{hint}, or `loader` NAME for a DataLoader built earlier"
    )


def find_batch_in_namespace(
    ns: MutableMapping[str, Any],
    run: Callable[[], Any],
    code: str,
    *,
    opts: SearchOptions,
    var: str | None,
    loader: str | None = None,
    size_fn: str | None = None,
    hints: Iterable[Any] = (),
    progress: Progress = True,
) -> BatchSearchResult:
    """The magics' form: ``run()`` runs ``code`` (its text) in namespace ``ns`` per trial, with
    ``var``/``loader`` (names in ``ns``) rebound to the trial's batch size. ``hints``: models and
    tensors for the default device. ``size_fn``: an expression (in ``ns``) for the sizes of the
    loader's samples. The options' errors name fields (``BadOptions``); the magics spell them as flags."""
    _check_namespace_options(ns, var, loader)
    if var is not None:
        check_var_is_read(code, var, ns)
    sizes_given: Any = None
    if size_fn is not None:
        if loader is None:
            raise BadOptions("`size_fn` measures the samples of the data set of `loader`: give `loader` NAME too")
        try:
            sizes_given = eval(size_fn, ns if isinstance(ns, dict) else dict(ns))
        except Exception as e:
            raise BadOptions(f"`size_fn` {size_fn!r} could not be evaluated: {type(e).__name__}: {e}") from None
    notes = []
    if any(w in code for w in ("torch.save(", ".to_csv(", "open(", ".write(", "savefig(")):
        notes.append("the code writes files: files written by the trials are not rolled back")
    objects = stateful_objects([v for k, v in list(ns.items()) if not k.startswith("_")])
    # an optimizer in the namespace, or one made by the code itself
    has_opt = any(isinstance(o, torch.optim.Optimizer) for o in objects) or "optim" in code or ".step(" in code
    original_loader = ns.get(loader) if loader is not None else None
    current = ns.get(var) if var is not None else getattr(original_loader, "batch_size", None)

    def run_trial(b: int, loader_for: Callable[[int], Any] | None) -> Any:
        if var is not None:
            ns[var] = b
        if loader is not None:
            ns[loader] = loader_for(b) if loader_for is not None else rebuild_loader(original_loader, b)
        return run()

    target = SearchTarget(
        run_trial, objects, has_optimizer=has_opt, namespace=ns, fake_namespace=ns, loader=original_loader,
        loader_name=loader or "train_loader", size_fn=sizes_given, size_fn_source=size_fn,
        current=current if isinstance(current, int) and not isinstance(current, bool) else None,
        hints=hints, notes=notes,
    )
    return search_target(opts, target, progress)


def _check_namespace_options(ns: Mapping[str, Any], var: str | None, loader: str | None) -> None:
    """How the batch size reaches the code, checked against the namespace: BadOptions names the fault."""
    if var is None and loader is None:
        raise BadOptions("say how the batch size reaches the code: `var` NAME (a variable it reads) or `loader` NAME")
    if var is not None and not var.isidentifier():
        raise BadOptions(f"`var` must be a Python name, got {var!r}")
    if loader is not None:
        if loader not in ns:
            raise BadOptions(f"`loader` {loader!r} is not defined in the namespace")
        from torch.utils.data import DataLoader

        if not isinstance(ns[loader], DataLoader):
            raise BadOptions(f"`loader` {loader!r} must name a torch DataLoader, got {type(ns[loader]).__name__}")


def _loader_facts(loader: Any) -> tuple[int | None, bool]:
    """(data-set size, drop_last) of a DataLoader the trials rebuild; (None, False) without one."""
    if loader is None:
        return None, False
    try:
        dataset_size: int | None = len(loader.dataset)
    except TypeError:
        dataset_size = None
    return dataset_size, bool(loader.drop_last)

"""Frozen result objects: what a tracked cell and a batch-size search produce.

Memory is always ``int`` bytes and time ``float`` seconds; ``None`` means "not known", never 0.
Results are plain data and import no renderer: ``repr`` is a one-line summary, and every other
view comes from the renderer registry (:mod:`gpumagic.views`): ``_repr_pretty_`` (IPython's
plain-text display, a terminal) a headline and a short table fitting the terminal,
``_repr_html_`` a compact table, ``to_text`` every row for logs (all three read one row model,
:mod:`gpumagic.render.rows`), and ``_repr_mimebundle_`` adds what renderers registered for the type
make (a widget and a PNG, from :mod:`gpumagic.render.widgets`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gpumagic import views
from gpumagic.batchmath import DEFAULT_MARGIN
from gpumagic.units import format_bytes, format_count, format_seconds

if TYPE_CHECKING:
    import pandas

    from gpumagic.batchmath import LRRule, Pick

__all__ = [
    "BatchSearchResult",
    "DeviceSample",
    "DeviceStatus",
    "Fit",
    "LoaderAdvice",
    "MemoryBreakdown",
    "MemoryReport",
    "ProcessMemory",
    "RankRecord",
    "Remedy",
    "SampleSizes",
    "StepRecord",
    "Trial",
    "VariableInputs",
]


def _plain(obj: Any) -> Any:
    """dataclasses.asdict that also turns tuples into lists, for JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    return obj



@dataclass(frozen=True)
class StepRecord:
    """One training step: one update of the model (an optimizer step, or several optimizers'
    steps with no backward between them), or one backward when no optimizer steps.

    ``peak_bytes`` is the peak allocated on the device during the step (absolute, like
    ``torch.cuda.max_memory_allocated``). ``input_elements`` is the number of elements in the
    tensors the step drew from DataLoaders (``None`` when it drew none): with variable-length
    data, the step whose input was largest is the one that sets the peak. After downsampling
    (very long loops) a record stands for ``count`` consecutive steps: peak and input are their
    max, seconds their sum, loss their mean. ``batch_size_guessed``: no DataLoader batch was
    drawn, and ``batch_size`` is the leading dimension that the inputs of the step's first module
    call share (a guess: a sequence-first input gives its length).

    ``loss`` is the loss whose gradient the step applied: the sum of the values ``backward()``
    was called on since the previous step (GradScaler's scale undone), or for
    ``optimizer.step(closure)`` the value ``step`` returned. ``partial_window``: the step's
    backward calls divided their loss by k (gradient accumulation) but there were fewer than k of
    them, after full windows of k earlier in the block (a last, shorter window): ``loss`` is then
    their sum as applied, not rescaled to a full window.
    """

    index: int
    loss: float | None
    peak_bytes: int | None
    seconds: float
    batch_size: int | None
    count: int = 1
    input_elements: int | None = None
    batch_size_guessed: bool = False
    partial_window: bool = False
    data_seconds: float | None = None
    """Time the step waited for its data: the DataLoader's ``__next__`` (and ``iter()``) during
    the step, or, without a DataLoader, from the end of the previous step to the step's first
    module call. Host time: on CUDA the device may still be busy with queued work meanwhile."""
    compute_seconds: float | None = None
    """The rest of the step: ``seconds - data_seconds``."""
    host_peak_bytes: int | None = None
    """The process's peak resident host memory during the step (absolute, like ``peak_bytes``)."""


@dataclass(frozen=True)
class LoaderAdvice:
    """What to change in the DataLoader when the loop waits for its data (``MemoryReport.loader_advice``).

    Made only when the data wait is at least ``DATA_WAIT_THRESHOLD`` of the steps after the first
    and at least ``MIN_DATA_SECONDS`` a step (below that, handing batches over from workers costs
    more than it saves). Followed literally it rebuilds the loader with :meth:`loader_kwargs`:

    >>> DataLoader(dataset, batch_size=32, **report.loader_advice.loader_kwargs())   # doctest: +SKIP
    """

    data_wait_fraction: float
    data_seconds: float
    """Mean data wait per step (steps after the first)."""
    compute_seconds: float
    """Mean compute per step (steps after the first)."""
    current_num_workers: int
    num_workers: int
    """The ``num_workers`` to use: enough workers to load a batch while a step computes, at most
    the cores this process may run on (``os.sched_getaffinity``)."""
    cores: int
    seconds_per_sample: float | None = None
    """Loading time per sample in the main process (``num_workers=0``): ``__getitem__`` and its
    share of the collate function."""
    cpu_bound: bool | None = None
    """Whether in-process loading kept the CPU busy (else it waited: files, network, sleep)."""
    pin_memory: bool = False
    """Set ``pin_memory=True`` (the device copies from pinned memory faster and asynchronously)."""
    persistent_workers: bool = False
    """Set ``persistent_workers=True``: the loop iterates the loader more than once."""
    build_once: bool = False
    """The loop built a new loader over the same data set for each pass: build it once, outside."""
    getitem_bottleneck: bool = False
    """Even with ``num_workers`` workers, loading stays slower than compute: ``__getitem__`` is the cost."""
    lines: tuple[str, ...] = ()
    """The advice in words, the most useful first."""

    def loader_kwargs(self) -> dict[str, Any]:
        """The DataLoader arguments to change, as keyword arguments."""
        kw: dict[str, Any] = {}
        if self.num_workers != self.current_num_workers:
            kw["num_workers"] = self.num_workers
        if self.pin_memory:
            kw["pin_memory"] = True
        if self.persistent_workers and max(self.num_workers, self.current_num_workers) > 0:
            kw["persistent_workers"] = True
        return kw


@dataclass(frozen=True)
class MemoryBreakdown:
    """Where the memory went at the peak step: parameters, gradients, optimizer state, rest."""

    parameters_bytes: int
    gradients_bytes: int
    optimizer_state_bytes: int
    other_bytes: int
    """Activations, temporaries and anything else alive at the peak (peak minus the three above)."""
    step_index: int | None = None


@dataclass(frozen=True)
class RankRecord:
    """One rank's summary in a data-parallel job (``MemoryReport.ranks``)."""

    rank: int
    device: str
    peak_bytes: int
    peak_delta_bytes: int
    reserved_peak_bytes: int | None
    steps: int
    wall_seconds: float
    budget_bytes: int | None = None
    capacity_bytes: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class Remedy:
    """One memory remedy planned on the cell (``%%gpumem --what-if``): what it would change.

    ``peak_bytes`` is the planned peak with the remedy (absolute, like ``MemoryReport.peak_bytes``);
    ``saved_bytes`` the plan as written minus it, at the cell's own batch size (negative: it costs
    memory). ``batch_size_that_fits``: with the remedy, the largest batch planned to fit under the
    capacity with %find_batch's margin (``None``: no capacity or no batch knob known). ``code``:
    the change to make. ``cost``: the compute it costs where the plan knows it, else ``None``.
    ``trade_off``: it changes the training itself (another optimizer), shown for its numbers only.
    """

    name: str
    peak_bytes: int
    saved_bytes: int
    batch_size_that_fits: int | None
    code: str
    notes: tuple[str, ...] = ()
    cost: str | None = None
    trade_off: bool = False
    micro_batch_size: int | None = None
    """Gradient accumulation: the micro-batch planned (``accumulation_steps`` of them per step)."""
    accumulation_steps: int | None = None


@dataclass(frozen=True)
class MemoryReport:
    """What ``%%gpumem`` / :func:`gpumagic.track` measured for one cell or block.

    >>> with gpumagic.track(device="cpu") as t:   # doctest: +SKIP
    ...     train()
    >>> t.report.peak_delta_bytes                   # doctest: +SKIP
    """

    backend: str
    device: str
    baseline_bytes: int
    peak_bytes: int
    peak_delta_bytes: int
    end_bytes: int
    reserved_peak_bytes: int | None
    capacity_bytes: int | None
    wall_seconds: float
    steps: tuple[StepRecord, ...] = ()
    budget_bytes: int | None = None
    breakdown: MemoryBreakdown | None = None
    total_steps: int = 0
    """Steps seen, before any downsampling of ``steps``."""
    error: str | None = None
    """``"OutOfMemoryError: ..."`` when the block raised; the report is then partial."""
    notes: tuple[str, ...] = field(default=())
    dry_run: bool = False
    """A plan made on fake tensors (``--dry-run``), not a measurement: no losses, figures predicted."""
    incomplete: str | None = None
    """Why the figures may miss something: an internal failure of the measurement (a hook, the
    tracker), which gpumagic kept out of the user's code. ``None`` when the measurement is whole."""
    ranks: tuple[RankRecord, ...] = ()
    """Under torch.distributed (or for the child processes a tracked cell started): every rank's
    summary, in rank order. Empty for a single process."""
    world_size: int | None = None
    data_wait_fraction: float | None = None
    """Share of the steps' time spent waiting for data, over the steps after the first (the first
    includes starting the DataLoader's workers); None with fewer than two timed steps."""
    loader_advice: LoaderAdvice | None = None
    host_baseline_bytes: int | None = None
    """The process's resident host memory when the block started."""
    host_peak_bytes: int | None = None
    """The process's peak resident host memory during the block (DataLoader workers not included)."""
    host_peak_sampled: bool = False
    """True where the kernel's exact peak is unavailable and host peaks are sampled at step ends."""
    host_total_bytes: int | None = None
    host_available_bytes: int | None = None
    """The machine's RAM, and what was available when the block ended."""
    worker_count: int = 0
    """The most DataLoader worker processes one loader ran at once during the block."""
    worker_peak_bytes: int | None = None
    """The largest peak resident memory of one worker (shared pages of the parent included)."""
    worker_private_bytes: int | None = None
    """The largest private resident memory of one worker (its own copies), read while it lived."""
    host_advice: tuple[str, ...] = ()
    """What to do about the host memory (workers copying a data set held in RAM, ...)."""

    @property
    def host_delta_bytes(self) -> int | None:
        """The block's host peak over its host baseline (None when either is unknown)."""
        if self.host_peak_bytes is None or self.host_baseline_bytes is None:
            return None
        return self.host_peak_bytes - self.host_baseline_bytes

    @property
    def host_matters(self) -> bool:
        """Whether to show host memory beside the device's: the block's host peak grew by more than
        a tenth of the machine's RAM, or workers were involved in host advice."""
        delta, total = self.host_delta_bytes, self.host_total_bytes
        grew = delta is not None and total is not None and delta > total / 10
        return grew or bool(self.host_advice)

    def host_text(self) -> str | None:
        """"host peak 1.20 GiB (+600.00 MiB), 4 workers up to 900.00 MiB; machine 15.6 GiB, 9.1 GiB available"."""
        if self.host_peak_bytes is None:
            return None
        text = f"peak {format_bytes(self.host_peak_bytes)}"
        if self.host_delta_bytes is not None:
            text += (f" ({format_bytes(self.host_delta_bytes, signed=True)} over "
                     f"{format_bytes(self.host_baseline_bytes)})")
        if self.host_peak_sampled:
            text += " (sampled at step ends: a lower bound)"
        if self.worker_count:
            text += (f"; {self.worker_count} DataLoader worker{'s' if self.worker_count != 1 else ''}, "
                     f"the largest peaking at {format_bytes(self.worker_peak_bytes)}")
            if self.worker_private_bytes is not None:
                text += f" ({format_bytes(self.worker_private_bytes)} of it its own)"
        if self.host_total_bytes is not None:
            text += f"; machine {format_bytes(self.host_total_bytes)}"
            if self.host_available_bytes is not None:
                text += f", {format_bytes(self.host_available_bytes)} available"
        return text

    def anatomy_text(self) -> str | None:
        """"data wait 83% of the step time (64.1 ms data, 13.0 ms compute per step, after the first)"."""
        f = self.data_wait_fraction
        timed = [s for s in self.steps[1:] if s.data_seconds is not None and s.compute_seconds is not None]
        if f is None or not timed:
            return None
        n = sum(s.count for s in timed)
        data = sum(s.data_seconds or 0.0 for s in timed) / n
        compute = sum(s.compute_seconds or 0.0 for s in timed) / n
        return (f"data wait {f:.0%} of the step time ({format_seconds(data)} data, "
                f"{format_seconds(compute)} compute per step, after the first)")

    what_if: tuple[Remedy, ...] = ()
    """With ``--what-if``: each remedy that applies to the cell, planned (see :mod:`gpumagic.remedies`)."""
    batch_size_that_fits: int | None = None
    """With ``--what-if`` and a capacity: the largest batch planned to fit as written (margin kept)."""

    def what_if_rows(self) -> list[tuple[str, str, str, str, str]]:
        """The what-if table's rows (``WHAT_IF_HEADER``), the code as written first: every renderer reads these."""
        if not self.what_if:
            return []
        fits = "" if self.batch_size_that_fits is None else str(self.batch_size_that_fits)
        rows = [("as written", format_bytes(self.peak_bytes), "", fits, "")]
        for r in self.what_if:
            name = r.name + (" (trade-off)" if r.trade_off else "")
            b = r.batch_size_that_fits
            rows.append((name, format_bytes(r.peak_bytes), format_bytes(r.saved_bytes, signed=True),
                         "" if b is None else str(b), r.cost or "not measured"))
        return rows

    @property
    def peak_rank(self) -> RankRecord | None:
        """The rank with the highest peak (``None`` without ranks)."""
        return max(self.ranks, key=lambda r: r.peak_bytes) if self.ranks else None

    @property
    def peak_spread_bytes(self) -> int | None:
        """Highest minus lowest peak over the ranks (``None`` with fewer than two)."""
        if len(self.ranks) < 2:
            return None
        peaks = [r.peak_bytes for r in self.ranks]
        return max(peaks) - min(peaks)

    @property
    def losses(self) -> tuple[float, ...]:
        """The per-step training losses, in order (steps whose loss is unknown are left out)."""
        return tuple(s.loss for s in self.steps if s.loss is not None)

    @property
    def step_peaks(self) -> tuple[int, ...]:
        return tuple(s.peak_bytes for s in self.steps if s.peak_bytes is not None)

    @property
    def headroom_bytes(self) -> int | None:
        """Capacity (or budget) minus the peak; ``None`` when the capacity is unknown."""
        cap = self.budget_bytes or self.capacity_bytes
        return None if cap is None else cap - self.peak_bytes

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serialisable): ints, floats, strings, lists, dicts and None."""
        d: dict[str, Any] = _plain(self)
        d["losses"] = list(self.losses)
        return d

    def to_dataframe(self) -> pandas.DataFrame:
        """The steps as a pandas DataFrame (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("MemoryReport.to_dataframe() needs pandas: pip install pandas") from e
        cols = ["index", "loss", "peak_bytes", "seconds", "batch_size", "count", "input_elements",
                "data_seconds", "compute_seconds", "host_peak_bytes", "partial_window"]
        return pd.DataFrame([[getattr(s, c) for c in cols] for s in self.steps], columns=cols)

    def summary(self) -> str:
        cap = self.budget_bytes or self.capacity_bytes
        parts = [
            f"{'planned peak' if self.dry_run else 'peak'} {format_bytes(self.peak_bytes)}",
            f"(+{format_bytes(self.peak_delta_bytes)} over baseline {format_bytes(self.baseline_bytes)})",
        ]
        if cap:
            parts.append(f"of {format_bytes(cap)}{' budget' if self.budget_bytes else ''}")
        parts.append(f"{'for' if self.dry_run else 'on'} {self.device}")  # a plan ran on no device
        n = self.total_steps
        parts.append(f"· {n} step{'s' if n != 1 else ''}")
        if self.losses:
            parts.append(f"· loss {self.losses[0]:.4g} → {self.losses[-1]:.4g}")
        parts.append(f"· {format_seconds(self.wall_seconds)}")
        if self.error:
            parts.append(f"· stopped by {self.error.split(':')[0]}")
        if self.incomplete:
            parts.append("· incomplete")
        top = self.peak_rank
        if top is not None and len(self.ranks) > 1:
            parts.append(f"· {len(self.ranks)} ranks, rank {top.rank} highest at {format_bytes(top.peak_bytes)}"
                         f" (spread {format_bytes(self.peak_spread_bytes)})")
        return " ".join(parts)

    def __repr__(self) -> str:
        return f"<MemoryReport {'PLAN (dry run) ' if self.dry_run else ''}{self.summary()}>"

    to_text = views.to_text
    _repr_pretty_ = views.repr_pretty
    _repr_html_ = views.repr_html
    _repr_mimebundle_ = views.mimebundle


@dataclass(frozen=True)
class Trial:
    """One run of the user's code at one batch size during a search."""

    batch_size: int
    peak_bytes: int | None
    oom: bool
    samples_per_second: float | None
    seconds: float
    steps: int = 0
    """Optimizer steps (or backward calls without an optimizer) the trial completed."""
    planned: bool = False
    """A dry run on fake tensors: ``peak_bytes`` is predicted, and ``oom`` means it would not fit."""
    rank_peak_bytes: tuple[int | None, ...] = ()
    """Under torch.distributed: each rank's peak in this trial (``peak_bytes`` is their max)."""
    data_wait_fraction: float | None = None
    """Share of the trial's steps after the first spent waiting for data (see ``MemoryReport``)."""


@dataclass(frozen=True)
class Fit:
    """peak(b) ≈ intercept_bytes + bytes_per_sample · b, fitted on the trials that ran."""

    intercept_bytes: float
    bytes_per_sample: float
    r2: float
    points: int = 0

    def predict(self, batch_size: float) -> int:
        return round(self.intercept_bytes + self.bytes_per_sample * batch_size)

    def describe(self, *, r2: bool = True) -> str:
        """The line as people read it: ``"100.00 MiB + 1.00 MiB/sample, R² 0.9990"``."""
        text = f"{format_bytes(round(self.intercept_bytes))} + {format_bytes(round(self.bytes_per_sample))}/sample"
        return f"{text}, R² {self.r2:.4f}" if r2 else text

    def largest_under(self, limit_bytes: float) -> int | None:
        """The largest batch size whose predicted peak is <= limit_bytes (None if unbounded)."""
        if self.bytes_per_sample <= 0:
            return None
        return math.floor((limit_bytes - self.intercept_bytes) / self.bytes_per_sample)


@dataclass(frozen=True)
class SampleSizes:
    """How big the data set's samples are, and what that means for the batch (``--loader``).

    A sample's size is what ``measure`` says: by default the number of elements in its tensors
    (after the loader's ``collate_fn``). The search ran on batches of the heaviest samples, so
    ``heaviest_batch_size`` holds for every batch of an epoch; ``p99_batch_size`` is the size
    that a trial showed fits batches drawn from the lightest 99% (``None`` if not measured).
    ``advice`` lists what to do about a long tail, the most useful first.
    """

    measure: str
    measured: int
    """Samples measured (all of them up to 100,000; a random 10,000 beyond)."""
    total: int
    seconds: float
    largest: float
    median: float
    p99: float
    heaviest_batch_size: int | None
    p99_batch_size: int | None = None
    per_sample_bytes: float | None = None
    """Memory per sample at the heaviest batch (the fit's slope)."""
    advice: tuple[str, ...] = ()

    def summary(self) -> str:
        if self.heaviest_batch_size is None:
            return f"the largest sample ({format_count(self.largest)}): no batch of the heaviest samples fit"
        head = f"the largest sample ({format_count(self.largest)}) limits the batch to {self.heaviest_batch_size}"
        if self.p99 < self.largest and self.p99_batch_size is not None:
            head += f"; 99% of samples are <= {format_count(self.p99)}, where {self.p99_batch_size} would fit"
        elif self.p99 < self.largest:
            head += f"; 99% of samples are <= {format_count(self.p99)}"
        return head


@dataclass(frozen=True)
class VariableInputs:
    """Per-step input sizes that varied during the trials (``--var``, or an IterableDataset).

    The trials saw inputs from ``smallest_elements`` to ``largest_elements`` (elements of the
    tensors a step drew); peak ≈ ``intercept_bytes`` + ``bytes_per_element`` · elements, fitted
    on those steps, predicts ``predicted_peak_bytes`` for the largest input gpumagic could learn
    of (``worst_elements``, from ``worst_source``), and ``surviving_batch_size`` keeps that under
    the capacity with the margin.
    """

    smallest_elements: int
    largest_elements: int
    intercept_bytes: float
    bytes_per_element: float
    worst_elements: int | None
    worst_source: str
    predicted_peak_bytes: int | None
    surviving_batch_size: int | None
    surviving_peak_bytes: int | None = None
    """The fit's peak for the largest input at ``surviving_batch_size``."""
    drawn_batch_size: int | None = None
    """What the trials' own batches alone recommended (before allowing for the largest input)."""


def trial_counts(r: BatchSearchResult) -> str:
    """'2 trials, 0 OOM, after 9 planned (2 would not fit)': real trials and plans counted apart."""
    real = [t for t in r.trials if not t.planned]
    planned = [t for t in r.trials if t.planned]
    over = sum(t.oom for t in planned)
    plans = f"{len(planned)} planned trial{'s' if len(planned) != 1 else ''}, {over} would not fit"
    if not real:
        return plans
    text = f"{len(real)} trial{'s' if len(real) != 1 else ''}, {sum(t.oom for t in real)} OOM"
    return f"{text}, after {len(planned)} planned ({over} would not fit)" if planned else text


@dataclass(frozen=True)
class BatchSearchResult:
    """What :func:`gpumagic.find_batch` / ``%find_batch`` found."""

    trials: tuple[Trial, ...]
    max_batch_size: int | None
    """The largest batch size that ran without running out of memory (never an unrun size)."""
    recommended_batch_size: int | None
    """The pick (``pick`` rule, with the safety margin); with ``effective`` set, the micro-batch."""
    accumulation_steps: int
    reason: str
    fit: Fit | None
    capacity_bytes: int | None
    predicted_peak_bytes: int | None
    """The fit's prediction at the recommended batch size."""
    pick: Pick = "max"
    margin: float = DEFAULT_MARGIN
    effective_batch_size: int | None = None
    lr_note: str | None = None
    lr_rule: LRRule | None = None
    """"linear" (SGD-like) or "sqrt" (Adam-like): how the learning rate follows the effective batch."""
    dataset_size: int | None = None
    device: str = "cpu"
    notes: tuple[str, ...] = ()
    sample_sizes: SampleSizes | None = None
    """With ``--loader``: the data set's sample sizes and the advice they lead to."""
    variable_inputs: VariableInputs | None = None
    """When the trials' inputs varied in size: the fit against input size and the size that survives the largest."""
    evaluation: bool = False
    """The trials were forward passes (``--eval``): no gradients, saved activations or optimizer state."""
    dry_run: bool = False
    """Every trial was planned on fake tensors (``--dry-run``): sizes and peaks are predictions."""
    world_size: int | None = None
    """Under torch.distributed: the ranks that searched together. Batch sizes are per rank; the
    global batch is ``global_batch_size``."""

    @property
    def global_batch_size(self) -> int | None:
        """Samples per optimizer step over all ranks: per-rank batch × accumulation × world size."""
        if self.world_size is None or self.recommended_batch_size is None:
            return None
        return self.recommended_batch_size * self.accumulation_steps * self.world_size

    @property
    def oom_count(self) -> int:
        return sum(t.oom for t in self.trials)

    def predicted_peak(self, batch_size: int) -> int | None:
        return None if self.fit is None else self.fit.predict(batch_size)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = _plain(self)
        return d

    def __repr__(self) -> str:
        rec = self.recommended_batch_size
        acc = f" × {self.accumulation_steps} accumulation steps" if self.accumulation_steps > 1 else ""
        if self.dry_run:
            return (
                f"<BatchSearchResult PLANNED (dry run) recommended {rec}{acc} (largest planned to fit "
                f"{self.max_batch_size}); {len(self.trials)} planned trials, {self.oom_count} over capacity; "
                f"{self.reason}>"
            )
        return (
            f"<BatchSearchResult recommended {rec}{acc} (max that ran {self.max_batch_size}); "
            f"{trial_counts(self)}; {self.reason}>"
        )

    to_text = views.to_text
    _repr_pretty_ = views.repr_pretty
    _repr_html_ = views.repr_html
    _repr_mimebundle_ = views.mimebundle


@dataclass(frozen=True)
class ProcessMemory:
    """A process holding memory on a device (from NVML); ``used_bytes`` None when the driver hides it."""

    pid: int
    used_bytes: int | None
    name: str | None = None


@dataclass(frozen=True)
class DeviceStatus:
    """The device now (``%gpumem`` without a cell)."""

    backend: str
    device: str
    allocated_bytes: int
    reserved_bytes: int | None
    total_bytes: int | None
    free_bytes: int | None
    name: str | None = None
    processes: tuple[ProcessMemory, ...] = ()
    notes: tuple[str, ...] = ()

    def __repr__(self) -> str:
        # one line for logs, with what the notes say (the names still holding memory after --free)
        notes = "".join(f"; {n}" for n in self.notes)
        return (
            f"<DeviceStatus {self.device}: allocated {format_bytes(self.allocated_bytes)}, "
            f"reserved {format_bytes(self.reserved_bytes)}, total {format_bytes(self.total_bytes)}, "
            f"free {format_bytes(self.free_bytes)}{notes}>"
        )

    to_text = views.to_text
    _repr_pretty_ = views.repr_pretty
    _repr_html_ = views.repr_html


@dataclass(frozen=True)
class DeviceSample:
    """One device at one moment, as the live monitor samples it. ``None`` means "not known here"."""

    device: str
    """"cuda:0", "mps" or "cpu"."""
    name: str | None
    used_bytes: int | None
    """In use on the device by everyone (for the CPU: the machine's RAM in use)."""
    total_bytes: int | None
    utilization_percent: float | None
    """Busy time in the last sampling period (GPU: NVML's utilisation; CPU: this process's CPU time)."""
    process_bytes: int | None
    """Used by this process (NVML's count for our pid, else what torch's allocator holds; CPU: RSS)."""
    other_bytes: int | None
    """Everything else in use: other processes, the driver, and for NVML the CUDA context overhead."""
    tracked_bytes: int | None = None
    """Live tensor bytes counted by gpumagic's CPU tracker while a tracked cell runs."""
    utilization_label: str = "utilisation"
    """What the monitor calls ``utilization_percent`` ("CPU" where it is this process's CPU time)."""

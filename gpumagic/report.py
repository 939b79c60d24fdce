"""Frozen result objects: what a tracked cell and a batch-size search produce.

Memory is always ``int`` bytes and time ``float`` seconds; ``None`` means "not known", never 0.
Objects render themselves: ``repr`` is a one-line summary, ``_repr_pretty_`` (IPython's
plain-text display, a terminal) a headline and a short table fitting the terminal, ``_repr_html_`` a compact table, and
``_repr_mimebundle_`` adds what the renderers registered for the type make (a widget and a PNG,
from :mod:`gpumagic.render.widgets`), through the registry in :mod:`gpumagic.views`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gpumagic.render.html import html_grid, html_table
from gpumagic.render.text import WHAT_IF_HEADER, grid_text, memory_report_text, search_text, use_color
from gpumagic.units import format_bytes, format_seconds
from gpumagic.views import mimebundle

if TYPE_CHECKING:
    import pandas

    from gpumagic.batchmath import LRRule, Pick

__all__ = [
    "BatchSearchResult",
    "DeviceSample",
    "DeviceStatus",
    "Fit",
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


def _text_table(title: str, rows: list[tuple[str, str]]) -> str:
    width = max((len(k) for k, _ in rows), default=0)
    indent = "\n" + " " * (width + 4)  # multi-line values (code) stay in their column
    return "\n".join([title, *(f"  {k:<{width}}  {v.replace(chr(10), indent)}" for k, v in rows)])


@dataclass(frozen=True)
class StepRecord:
    """One training step: an optimizer step, or one backward when no optimizer steps.

    ``peak_bytes`` is the peak allocated on the device during the step (absolute, like
    ``torch.cuda.max_memory_allocated``). ``input_elements`` is the number of elements in the
    tensors the step drew from DataLoaders (``None`` when it drew none): with variable-length
    data, the step whose input was largest is the one that sets the peak. After downsampling
    (very long loops) a record stands for ``count`` consecutive steps: peak and input are their
    max, seconds their sum, loss their mean. ``batch_size_guessed``: no DataLoader batch was
    drawn, and ``batch_size`` is the leading dimension that the inputs of the step's first module
    call share (a guess: a sequence-first input gives its length).
    """

    index: int
    loss: float | None
    peak_bytes: int | None
    seconds: float
    batch_size: int | None
    count: int = 1
    input_elements: int | None = None
    batch_size_guessed: bool = False


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
        cols = ["index", "loss", "peak_bytes", "seconds", "batch_size", "count", "input_elements"]
        return pd.DataFrame([[getattr(s, c) for c in cols] for s in self.steps], columns=cols)

    def summary(self) -> str:
        cap = self.budget_bytes or self.capacity_bytes
        parts = [
            f"peak {format_bytes(self.peak_bytes)}",
            f"(+{format_bytes(self.peak_delta_bytes)} over baseline {format_bytes(self.baseline_bytes)})",
        ]
        if cap:
            parts.append(f"of {format_bytes(cap)}{' budget' if self.budget_bytes else ''}")
        parts.append(f"on {self.device}")
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

    def _rows(self) -> list[tuple[str, str]]:
        cap = self.budget_bytes or self.capacity_bytes
        rows = [("kind", "plan: a dry run on fake tensors, not a measurement")] if self.dry_run else []
        rows += [
            ("device", f"{self.device} ({self.backend})"),
            ("baseline", format_bytes(self.baseline_bytes)),
            ("peak", f"{format_bytes(self.peak_bytes)} ({format_bytes(self.peak_delta_bytes, signed=True)})"),
            ("end", f"{format_bytes(self.end_bytes)} "
                    f"({format_bytes(self.end_bytes - self.baseline_bytes, signed=True)})"),
        ]
        if self.reserved_peak_bytes is not None:
            rows.append(("peak reserved" + (" (predicted)" if self.dry_run else ""),
                         format_bytes(self.reserved_peak_bytes)))
        if cap is not None:
            label = "budget (simulated capacity)" if self.budget_bytes else "capacity"
            rows.append((label, f"{format_bytes(cap)} ({100 * self.peak_bytes / cap:.1f}% used at peak)"))
        if self.breakdown is not None:
            b = self.breakdown
            rows.append((
                "at the peak",
                f"parameters {format_bytes(b.parameters_bytes)}, gradients {format_bytes(b.gradients_bytes)}, "
                f"optimizer state {format_bytes(b.optimizer_state_bytes)}, "
                f"activations and other {format_bytes(b.other_bytes)}",
            ))
        if self.steps:
            secs = sorted(s.seconds / s.count for s in self.steps)
            rows.append(("steps", f"{self.total_steps}, median {format_seconds(secs[len(secs) // 2])} per step"))
            peaks = self.step_peaks
            if peaks:
                rows.append(("step peak", f"{format_bytes(min(peaks))} … {format_bytes(max(peaks))}"))
            losses = self.losses
            if losses:
                rows.append(("loss", f"first {losses[0]:.4g}, last {losses[-1]:.4g}, min {min(losses):.4g}"))
            sizes = {s.batch_size for s in self.steps if s.batch_size is not None}
            if sizes:
                guessed = " (read from the inputs' leading dimension)" if any(
                    s.batch_size_guessed for s in self.steps) else ""
                rows.append(("batch size", ", ".join(str(v) for v in sorted(sizes)[:6]) + guessed))
            drawn = [s for s in self.steps if s.input_elements is not None]
            if drawn:
                big = max(drawn, key=lambda s: s.input_elements or 0)
                rows.append(("step input", f"{min(s.input_elements or 0 for s in drawn):,} … "
                                           f"{big.input_elements:,} elements (largest at step {big.index:,}, "
                                           f"peak {format_bytes(big.peak_bytes)})"))
        else:
            rows.append(("steps", "none seen (no backward() in the block)"))
        rows.append(("wall time", format_seconds(self.wall_seconds)))
        if self.error:
            rows.append(("stopped by", self.error))
        if self.incomplete:
            rows.append(("incomplete", self.incomplete))
        rows.extend(self._rank_rows())
        rows.extend(("note", n) for n in self.notes)
        return rows

    def _rank_rows(self) -> list[tuple[str, str]]:
        top = self.peak_rank
        if top is None:
            return []
        n = self.world_size or len(self.ranks)
        rows = [("ranks", f"{len(self.ranks)} of {n}; rank {top.rank} peaks highest"
                          + (f", spread {format_bytes(self.peak_spread_bytes)}" if len(self.ranks) > 1 else ""))]
        for r in self.ranks:
            cap = r.budget_bytes or r.capacity_bytes
            used = f" ({100 * r.peak_bytes / cap:.1f}% of {format_bytes(cap)})" if cap else ""
            rows.append((
                f"rank {r.rank} ({r.device})",
                f"peak {format_bytes(r.peak_bytes)}{used}, "
                f"{format_bytes(r.peak_delta_bytes, signed=True)} in the block, "
                f"{r.steps} step{'s' if r.steps != 1 else ''}, {format_seconds(r.wall_seconds)}"
                + (f", stopped by {r.error.split(':')[0]}" if r.error else ""),
            ))
        return rows

    def to_text(self) -> str:
        """The report as an aligned plain-text table (for scripts and terminals)."""
        text = _text_table(self._title(), self._rows())
        rows = self.what_if_rows()
        return text + "\n" + grid_text("what if (each remedy planned)", WHAT_IF_HEADER, rows) if rows else text

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        """IPython's plain-text display (a terminal): the summary, then a short table fitting the terminal."""
        p.text(memory_report_text(self, color=use_color()))

    def _repr_html_(self) -> str:
        rows = self.what_if_rows()
        table = html_table(self._title(), self._rows())
        return table + html_grid("what if (each remedy planned)", WHAT_IF_HEADER, rows) if rows else table

    def _title(self) -> str:
        return "gpumagic memory plan (dry run)" if self.dry_run else "gpumagic memory report"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return mimebundle(self, include, exclude)


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
            return f"the largest sample ({_number(self.largest)}): no batch of the heaviest samples fit"
        head = f"the largest sample ({_number(self.largest)}) limits the batch to {self.heaviest_batch_size}"
        if self.p99 < self.largest and self.p99_batch_size is not None:
            head += f"; 99% of samples are <= {_number(self.p99)}, where {self.p99_batch_size} would fit"
        elif self.p99 < self.largest:
            head += f"; 99% of samples are <= {_number(self.p99)}"
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


def _number(v: float) -> str:
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:,.3g}"


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
    margin: float = 0.05
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
            f"{len(self.trials)} trials, {self.oom_count} OOM; {self.reason}>"
        )

    def _rows(self) -> list[tuple[str, str]]:
        rows = [
            ("recommended", str(self.recommended_batch_size)
             + (f" × {self.accumulation_steps} accumulation steps = {self.effective_batch_size}"
                if self.effective_batch_size else "")),
            ("largest planned to fit" if self.dry_run else "largest that ran", str(self.max_batch_size)),
            ("why", self.reason),
        ]
        if self.evaluation:
            rows.append(("trials", "evaluation: forward calls of the outermost model, no backward or optimizer step"))
        if self.sample_sizes is not None:
            ss = self.sample_sizes
            rows.append(("samples", ss.summary()))
            rows.append(("sizes", f"{ss.measure}: median {_number(ss.median)}, 99th percentile {_number(ss.p99)}, "
                                  f"largest {_number(ss.largest)}; {ss.measured:,} of {ss.total:,} samples measured "
                                  f"in {format_seconds(ss.seconds)}"))
            rows.extend((f"advice {i}", a) for i, a in enumerate(ss.advice, 1))
        if self.variable_inputs is not None:
            v = self.variable_inputs
            line = (f"steps drew {v.smallest_elements:,} to {v.largest_elements:,} elements; peak ≈ "
                    f"{format_bytes(round(v.intercept_bytes))} + {format_bytes(round(v.bytes_per_element))}/element")
            if v.worst_elements is not None and v.predicted_peak_bytes is not None:
                line += (f"; the largest input ({v.worst_source}, {v.worst_elements:,} elements) needs "
                         f"{format_bytes(v.predicted_peak_bytes)}")
            if v.surviving_batch_size is not None:
                line += f"; {v.surviving_batch_size} survives it"
            rows.append(("input sizes", line))
        if self.world_size is not None:
            rows[0] = (rows[0][0], rows[0][1] + " per rank")
            rows[1] = (rows[1][0], rows[1][1] + " per rank, on every rank")
            rows.insert(1, ("global batch", f"{self.global_batch_size} ({self.recommended_batch_size} per rank"
                            + (f" × {self.accumulation_steps} accumulation steps" if self.accumulation_steps > 1
                               else "") + f" × {self.world_size} ranks)"))
        if self.dry_run:
            rows.insert(0, ("kind", "planned: every trial a dry run on fake tensors, not a measurement"))
        if self.lr_note:
            rows.append(("learning rate", self.lr_note))
        if self.capacity_bytes is not None:
            rows.append(("capacity", f"{format_bytes(self.capacity_bytes)} (margin {self.margin:.0%})"))
        if self.predicted_peak_bytes is not None:
            rows.append(("predicted peak", format_bytes(self.predicted_peak_bytes)))
        if self.fit is not None:
            rows.append(("fit", self.fit.describe()))
        for t in self.trials:
            sps = f", {t.samples_per_second:,.0f} samples/s" if t.samples_per_second else ""
            if t.planned:
                rows.append((
                    f"planned b={t.batch_size}",
                    "would not fit" if t.oom else f"planned peak {format_bytes(t.peak_bytes)}",
                ))
                continue
            per_rank = ""
            if len(t.rank_peak_bytes) > 1 and not t.oom:
                per_rank = " (ranks: " + ", ".join(format_bytes(p) for p in t.rank_peak_bytes) + ")"
            rows.append((
                f"trial b={t.batch_size}",
                "out of memory" if t.oom else f"peak {format_bytes(t.peak_bytes)}{per_rank}{sps}",
            ))
        rows.extend(("note", n) for n in self.notes)
        return rows

    def to_text(self) -> str:
        """The result as an aligned plain-text table (for scripts and terminals)."""
        return _text_table(self._title(), self._rows())

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        """IPython's plain-text display (a terminal): the pick, then the trials with the pick marked."""
        p.text(search_text(self, color=use_color()))

    def _repr_html_(self) -> str:
        return html_table(self._title(), self._rows())

    def _title(self) -> str:
        return "gpumagic batch-size plan (dry run)" if self.dry_run else "gpumagic batch-size search"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return mimebundle(self, include, exclude)


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
        return (
            f"<DeviceStatus {self.device}: allocated {format_bytes(self.allocated_bytes)}, "
            f"reserved {format_bytes(self.reserved_bytes)}, total {format_bytes(self.total_bytes)}, "
            f"free {format_bytes(self.free_bytes)}>"
        )

    def _repr_html_(self) -> str:
        rows = [
            ("device", f"{self.device}" + (f" ({self.name})" if self.name else "")),
            ("allocated by tensors", format_bytes(self.allocated_bytes)),
            ("reserved by PyTorch", format_bytes(self.reserved_bytes)),
            ("total", format_bytes(self.total_bytes)),
            ("free", format_bytes(self.free_bytes)),
        ]
        rows.extend((f"process {p.pid}" + (f" ({p.name})" if p.name else ""), format_bytes(p.used_bytes))
                    for p in self.processes)
        rows.extend(("note", n) for n in self.notes)
        return html_table("gpumagic device status", rows)


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

"""The row model: what each result shows, computed once, read by every renderer.

A result becomes a :class:`View`: a title, a headline (the one-line summary a terminal prints
first), labelled rows, and tables (a search's trials). The plain-text table (``to_text``), the
terminal text (``_repr_pretty_``) and the HTML table all read the same :class:`View`, so they
cannot show different figures (the way rich derives text and HTML from one rendering): the
terminal leaves out only the rows its headline already states (``Row.in_headline``).

>>> view(report).rows[0]                                          # doctest: +SKIP
Row(label='device', value='cpu (cpu)', in_headline=True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpumagic.report import trial_counts
from gpumagic.units import format_bytes, format_count, format_number, format_percent, format_seconds

if TYPE_CHECKING:
    from gpumagic.report import BatchSearchResult, DeviceStatus, MemoryReport
    from gpumagic.sweep_results import SweepResult, SweepRun

__all__ = ["WHAT_IF_HEADER", "Row", "Table", "View", "view"]

WHAT_IF_HEADER = ("remedy", "planned peak", "saved", "batch that then fits", "cost")
"""The columns of ``MemoryReport.what_if_rows()``: the what-if table in every renderer."""


@dataclass(frozen=True)
class Row:
    label: str
    value: str
    in_headline: bool = False
    """The headline states this figure already: the terminal text leaves the row out."""


@dataclass(frozen=True)
class Table:
    """Columns of figures (a search's trials): ``right`` names the right-aligned columns, and
    ``drop`` the columns a narrow terminal leaves out first."""

    header: tuple[str, ...]
    body: tuple[tuple[str, ...], ...]
    right: frozenset[int] = frozenset()
    drop: tuple[int, ...] = ()
    title: str | None = None


@dataclass(frozen=True)
class View:
    title: str
    headline: str
    rows: tuple[Row, ...]
    tables: tuple[Table, ...] = ()


_VIEWS: dict[str, Callable[[Any], View]] = {}


def view(result: Any) -> View:
    """The :class:`View` of a result (``MemoryReport``, ``BatchSearchResult``, ``DeviceStatus``, ...)."""
    for cls in type(result).__mro__:
        build = _VIEWS.get(cls.__name__)
        if build is not None:
            return build(result)
    raise TypeError(f"no row model for {type(result).__name__}")


def _for(name: str) -> Callable[[Callable[[Any], View]], Callable[[Any], View]]:
    def deco(fn: Callable[[Any], View]) -> Callable[[Any], View]:
        _VIEWS[name] = fn
        return fn

    return deco


def _step_name(index: int, count: int) -> str:
    return f"step {index + 1}" if count == 1 else f"steps {index + 1}–{index + count}"


# ---------------------------------------------------------------------------------------------
# %%gpumem


@_for("MemoryReport")
def memory_report_view(r: MemoryReport) -> View:
    cap = r.budget_bytes or r.capacity_bytes
    rows: list[Row] = []
    if r.dry_run:
        rows.append(Row("kind", "plan: a dry run on fake tensors, not a measurement"))
    rows += [
        Row("device", f"{r.device} ({r.backend})", True),
        Row("baseline", format_bytes(r.baseline_bytes), True),
        Row("peak", f"{format_bytes(r.peak_bytes)} ({format_bytes(r.peak_delta_bytes, signed=True)})", True),
        Row("end", f"{format_bytes(r.end_bytes)} ({format_bytes(r.end_bytes - r.baseline_bytes, signed=True)})"),
    ]
    if r.reserved_peak_bytes is not None:
        rows.append(Row("peak reserved" + (" (predicted)" if r.dry_run else ""), format_bytes(r.reserved_peak_bytes)))
    if cap is not None:
        label = "budget (simulated capacity)" if r.budget_bytes else "capacity"
        rows.append(Row(label, f"{format_bytes(cap)} ({100 * r.peak_bytes / cap:.1f}% used at peak)"))
    if r.breakdown is not None:
        b = r.breakdown
        rows.append(Row(
            "at the peak",
            f"parameters {format_bytes(b.parameters_bytes)}, gradients {format_bytes(b.gradients_bytes)}, "
            f"optimizer state {format_bytes(b.optimizer_state_bytes)}, "
            f"activations and other {format_bytes(b.other_bytes)}",
        ))
    steps = [s for s in r.steps if s.count > 0]
    if steps:
        per_step = sorted(s.seconds / s.count for s in steps)
        rows.append(Row("steps", f"{r.total_steps}, median {format_seconds(per_step[len(per_step) // 2])} per step"))
        sizes = sorted({s.batch_size for s in steps if s.batch_size is not None})
        if sizes:
            guessed = " (read from the inputs' leading dimension)" if any(s.batch_size_guessed for s in steps) else ""
            more = ", …" if len(sizes) > 6 else ""
            rows.append(Row("batch size", ", ".join(str(v) for v in sizes[:6]) + more + guessed))
        losses = r.losses
        if losses:
            rows.append(Row("loss", f"first {losses[0]:.4g}, last {losses[-1]:.4g}, min {min(losses):.4g}"))
        slow = max(steps, key=lambda s: s.seconds / s.count)
        slowest = format_seconds(slow.seconds / slow.count)
        rows.append(Row("slowest", f"{_step_name(slow.index, slow.count)}: {slowest}"))
        peaks = [s for s in steps if s.peak_bytes is not None]
        if peaks:
            heavy = max(peaks, key=lambda s: s.peak_bytes or 0)
            low = min(s.peak_bytes or 0 for s in peaks)
            rows.append(Row("step peak", f"{format_bytes(low)} … {format_bytes(heavy.peak_bytes)} "
                                         f"(heaviest: {_step_name(heavy.index, heavy.count)})"))
        drawn = [s for s in steps if s.input_elements is not None]
        if drawn:
            big = max(drawn, key=lambda s: s.input_elements or 0)
            rows.append(Row("step input", f"{min(s.input_elements or 0 for s in drawn):,} … "
                                          f"{big.input_elements:,} elements (largest at step {big.index:,}, "
                                          f"peak {format_bytes(big.peak_bytes)})"))
    else:
        rows.append(Row("steps", "none seen (no backward() in the block)"))
    anatomy = r.anatomy_text()
    if anatomy is not None:
        rows.append(Row("step time", anatomy))
    if r.loader_advice is not None:
        rows.extend(Row("loader advice", line) for line in r.loader_advice.lines)
    host = r.host_text()
    if host is not None and r.host_matters:
        rows.append(Row("host memory", host))
    rows.extend(Row("host advice", line) for line in r.host_advice)
    rows.append(Row("wall time", format_seconds(r.wall_seconds), True))
    if r.error:
        rows.append(Row("stopped by", r.error.splitlines()[0] if r.error.strip() else r.error))
    if r.incomplete:
        rows.append(Row("incomplete", r.incomplete))
    rows.extend(_rank_rows(r))
    rows.extend(Row("note", n) for n in r.notes)
    title = "gpumagic memory plan (dry run)" if r.dry_run else "gpumagic memory report"
    what_if = r.what_if_rows()
    tables = (Table(WHAT_IF_HEADER, tuple(what_if), title="what if (each remedy planned)"),) if what_if else ()
    return View(title, f"gpumem{' plan' if r.dry_run else ''}: {r.summary()}", tuple(rows), tables)


def _rank_rows(r: MemoryReport) -> list[Row]:
    top = r.peak_rank
    if top is None:
        return []
    n = r.world_size or len(r.ranks)
    rows = [Row("ranks", f"{len(r.ranks)} of {n}; rank {top.rank} peaks highest"
                         + (f", spread {format_bytes(r.peak_spread_bytes)}" if len(r.ranks) > 1 else ""))]
    for k in r.ranks:
        cap = k.budget_bytes or k.capacity_bytes
        used = f" ({100 * k.peak_bytes / cap:.1f}% of {format_bytes(cap)})" if cap else ""
        rows.append(Row(
            f"rank {k.rank} ({k.device})",
            f"peak {format_bytes(k.peak_bytes)}{used}, "
            f"{format_bytes(k.peak_delta_bytes, signed=True)} in the block, "
            f"{k.steps} step{'s' if k.steps != 1 else ''}, {format_seconds(k.wall_seconds)}"
            + (f", stopped by {k.error.split(':')[0]}" if k.error else ""),
        ))
    return rows


# ---------------------------------------------------------------------------------------------
# %find_batch


def _search_headline(r: BatchSearchResult) -> str:
    head = f"find_batch{' plan' if r.dry_run else ''}: recommended {r.recommended_batch_size}"
    if r.accumulation_steps > 1 or r.effective_batch_size:
        head += f" × {r.accumulation_steps} accumulation steps = {r.effective_batch_size}"
    return head + (f" ({'largest planned to fit' if r.dry_run else 'largest that ran'} {r.max_batch_size}) · "
                   f"{trial_counts(r)} {'for' if r.dry_run else 'on'} {r.device}")


@_for("BatchSearchResult")
def search_view(r: BatchSearchResult) -> View:
    per_rank = " per rank" if r.world_size is not None else ""
    rows: list[Row] = []
    if r.dry_run:
        rows.append(Row("kind", "planned: every trial a dry run on fake tensors, not a measurement"))
    rows.append(Row("recommended", str(r.recommended_batch_size)
                    + (f" × {r.accumulation_steps} accumulation steps = {r.effective_batch_size}"
                       if r.effective_batch_size else "") + per_rank, True))
    if r.world_size is not None:
        rows.append(Row("global batch", f"{r.global_batch_size} ({r.recommended_batch_size} per rank"
                        + (f" × {r.accumulation_steps} accumulation steps" if r.accumulation_steps > 1 else "")
                        + f" × {r.world_size} ranks)"))
    rows.append(Row("largest planned to fit" if r.dry_run else "largest that ran",
                    str(r.max_batch_size) + (" per rank, on every rank" if per_rank else ""), True))
    rows.append(Row("why", r.reason))
    if r.evaluation:
        rows.append(Row("trials", "evaluation: forward calls of the outermost model, no backward or optimizer step"))
    if r.sample_sizes is not None:
        ss = r.sample_sizes
        rows.append(Row("samples", ss.summary()))
        rows.append(Row("sizes", f"{ss.measure}: median {format_count(ss.median)}, 99th percentile "
                                 f"{format_count(ss.p99)}, largest {format_count(ss.largest)}; {ss.measured:,} of "
                                 f"{ss.total:,} samples measured in {format_seconds(ss.seconds)}"))
        rows.extend(Row(f"advice {i}", a) for i, a in enumerate(ss.advice, 1))
    if r.variable_inputs is not None:
        v = r.variable_inputs
        line = (f"steps drew {v.smallest_elements:,} to {v.largest_elements:,} elements; peak ≈ "
                f"{format_bytes(round(v.intercept_bytes))} + {format_bytes(round(v.bytes_per_element))}/element")
        if v.worst_elements is not None and v.predicted_peak_bytes is not None:
            line += (f"; the largest input ({v.worst_source}, {v.worst_elements:,} elements) needs "
                     f"{format_bytes(v.predicted_peak_bytes)}")
        if v.surviving_batch_size is not None:
            line += f"; {v.surviving_batch_size} survives it"
        rows.append(Row("input sizes", line))
    if r.lr_note:
        rows.append(Row("learning rate", r.lr_note))
    if r.capacity_bytes is not None:
        peak = (f"predicted peak {format_bytes(r.predicted_peak_bytes)} of "
                if r.predicted_peak_bytes is not None else "")
        rows.append(Row("memory", f"{peak}{format_bytes(r.capacity_bytes)} (margin {format_percent(r.margin)})"))
    elif r.predicted_peak_bytes is not None:
        rows.append(Row("memory", f"predicted peak {format_bytes(r.predicted_peak_bytes)}"))
    if r.fit is not None:
        rows.append(Row("fit", r.fit.describe()))
    rows.extend(Row("note", n) for n in r.notes)
    title = "gpumagic batch-size plan (dry run)" if r.dry_run else "gpumagic batch-size search"
    return View(title, _search_headline(r), tuple(rows), (_trials_table(r),) if r.trials else ())


def _trials_table(r: BatchSearchResult) -> Table:
    picked = next((i for i in range(len(r.trials) - 1, -1, -1)
                   if r.trials[i].batch_size == r.recommended_batch_size and not r.trials[i].oom), None)
    body: list[tuple[str, ...]] = []
    counts = {True: 0, False: 0}
    for i, t in enumerate(r.trials):  # real trials numbered as the progress numbered them; plans apart
        counts[t.planned] += 1
        number_ = f"plan {counts[True]}" if t.planned else str(counts[False])
        if t.planned:
            peak = "would not fit" if t.oom else f"≈ {format_bytes(t.peak_bytes)}"
        else:
            peak = "out of memory" if t.oom else format_bytes(t.peak_bytes)
            if len(t.rank_peak_bytes) > 1 and not t.oom:
                peak += " (ranks: " + ", ".join(format_bytes(p) for p in t.rank_peak_bytes) + ")"
        body.append((
            number_, str(t.batch_size), peak,
            f"{t.samples_per_second:,.0f}" if t.samples_per_second else "",
            "" if t.planned else format_seconds(t.seconds),
            "← pick" if i == picked else "",
        ))
    if picked is None and r.recommended_batch_size is not None:  # picked by the fit, not run as such
        predicted = f"≈ {format_bytes(r.predicted_peak_bytes)}" if r.predicted_peak_bytes is not None else ""
        body.append(("", str(r.recommended_batch_size), predicted, "", "", "← pick (predicted)"))
    return Table(("trial", "batch", "peak", "samples/s", "time", ""), tuple(body),
                 right=frozenset({0, 1, 3, 4}), drop=(4, 3, 0))


# ---------------------------------------------------------------------------------------------
# %gpumem without a cell


@_for("DeviceStatus")
def device_status_view(s: DeviceStatus) -> View:
    rows = [
        Row("device", f"{s.device}" + (f" ({s.name})" if s.name else ""), True),
        Row("allocated by tensors", format_bytes(s.allocated_bytes), True),
        Row("reserved by PyTorch", format_bytes(s.reserved_bytes), True),
        Row("total", format_bytes(s.total_bytes), True),
        Row("free", format_bytes(s.free_bytes), True),
    ]
    rows.extend(Row(f"process {p.pid}" + (f" ({p.name})" if p.name else ""), format_bytes(p.used_bytes))
                for p in s.processes)
    rows.extend(Row("note", n) for n in s.notes)
    headline = (f"gpumem: {s.device}: allocated {format_bytes(s.allocated_bytes)}, reserved "
                f"{format_bytes(s.reserved_bytes)}, total {format_bytes(s.total_bytes)}, "
                f"free {format_bytes(s.free_bytes)}")
    return View("gpumagic device status", headline, tuple(rows))


# ---------------------------------------------------------------------------------------------
# %%batch_sweep


def run_line(result: SweepResult, r: SweepRun) -> str:
    """One run in words: loss reached, samples and time, learning rate, validation, memory."""
    if r.oom is not None:
        return f"out of memory after {r.steps} steps ({r.oom})"
    loss = r.final_loss()
    parts = [f"loss {format_number(loss)}" if loss is not None else "no loss recorded",
             f"{r.total_samples:,} samples in {r.steps:,} steps, {format_seconds(r.total_seconds)}"]
    if r.samples_per_second:
        parts.append(f"{r.samples_per_second:,.0f} samples/s")
    if r.lrs:
        parts.append("lr " + ", ".join(f"{v:.3g}" for v in dict.fromkeys(r.lrs)))
    if r.val is not None:
        parts.append(f"{result.val_name or 'val'} {format_number(r.val)}")
    if r.peak_bytes is not None:
        parts.append(f"peak {format_bytes(r.peak_bytes)}")
    return "; ".join(parts)


@_for("SweepResult")
def sweep_view(s: SweepResult) -> View:
    rows = [Row("recommended", str(s.recommended) if s.recommended is not None else "none", True),
            Row("why", s.why)]
    if s.noise_scale is not None:
        rows.append(Row("noise scale", s.noise_scale.describe()))
    else:
        rows.append(Row("noise scale", f"not estimated: {s.noise_scale_why}"))
    rule = {"none": "none: every run at the cell's learning rate"}.get(s.lr_rule, s.lr_rule)
    rows.append(Row("learning rate", f"{rule} ({s.lr_rule_why})"))
    if s.samples_target is not None:
        rows.append(Row("each run", f"stops after the step that reaches {s.samples_target:,} samples"))
    elif s.seconds_target is not None:
        rows.append(Row("each run", f"stops after the step that reaches {format_seconds(s.seconds_target)}"))
    if s.full_batch and s.dataset_size is not None:
        rows.append(Row("full batch", f"the whole data set ({s.dataset_size:,} samples) fits in one batch: "
                                      f"batch {s.dataset_size} is full-batch training"))
    for r in s.runs:
        mark = " ◀" if r.batch_size == s.recommended else ""
        rows.append(Row(f"b={r.batch_size}{mark}", run_line(s, r)))
    rows.extend(Row("note", n) for n in s.notes)
    headline = f"batch_sweep: recommended {s.recommended} of {', '.join(map(str, s.sizes))}"
    return View("gpumagic batch-size sweep", headline, tuple(rows))

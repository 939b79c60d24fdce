"""Plain-text rendering for terminals, logs and CI: a headline, then a short table.

Pure (standard library only): results call it from ``_repr_pretty_``, the demo and the
progress reporters use its colour rule. Every line fits ``width`` columns; escape codes are
added only when asked (:func:`use_color` says when a stream takes them).

>>> print(render("find_batch: recommended 64", [("why", "largest that fits")], width=40))
find_batch: recommended 64
  why  largest that fits
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from gpumagic.units import format_seconds

if TYPE_CHECKING:
    from gpumagic.report import BatchSearchResult, MemoryReport, Trial

__all__ = [
    "bold",
    "describe_trial",
    "grid_text",
    "memory_report_text",
    "render",
    "search_text",
    "terminal_width",
    "use_color",
    "wrap_block",
]

_MIN_WIDTH = 20
WHAT_IF_HEADER = ("remedy", "planned peak", "saved", "batch that then fits", "cost")
"""The columns of ``MemoryReport.what_if_rows()``, for every renderer of the what-if table."""


def terminal_width() -> int:
    """Columns of the terminal (``COLUMNS`` first, as :func:`shutil.get_terminal_size` reads it); 80 otherwise."""
    return max(shutil.get_terminal_size((80, 24)).columns, _MIN_WIDTH)


def use_color(stream: TextIO | Any = None) -> bool:
    """Whether ``stream`` (default stdout) is a terminal that takes escape codes: a tty, ``NO_COLOR``
    unset or empty (https://no-color.org), and ``TERM`` not ``dumb``."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def bold(text: str, stream: TextIO | Any = None) -> str:
    """``text`` in bold where ``stream`` takes escape codes, else unchanged."""
    return f"\033[1m{text}\033[0m" if use_color(stream) else text


_NBSP = "\u00a0"
# a number and its unit stay on one line ("3.80 MiB", "45.2 ms")
_QUANTITY = re.compile(r"(\d) (B|KiB|MiB|GiB|TiB|kB|MB|GB|TB|µs|ms|s|min)\b")


def _wrap(text: str, width: int, first: str, rest: str) -> list[str]:
    lines = textwrap.wrap(
        _QUANTITY.sub(f"\\1{_NBSP}\\2", text), max(width, len(rest) + 8), initial_indent=first,
        subsequent_indent=rest, break_on_hyphens=False, break_long_words=True,
    ) or [first.rstrip()]
    return [line.replace(_NBSP, " ") for line in lines]


def wrap_block(text: str, width: int | None = None, *, code_indent: int | None = None) -> str:
    """Each line of ``text`` wrapped to ``width``, continuation lines indented under the line's own
    indentation (two more for a numbered item "1. ..."). Lines indented by ``code_indent`` spaces
    or more are code and stay whole: a wrapped line of code would not run when copied."""
    width = terminal_width() if width is None else max(width, _MIN_WIDTH)
    out: list[str] = []
    for line in text.splitlines():
        code = code_indent is not None and line.startswith(" " * code_indent)
        if len(line) <= width or code:
            out.append(line)
            continue
        body = line.lstrip(" ")
        indent = " " * (len(line) - len(body))
        head = body.split(" ", 1)[0]
        extra = len(head) + 1 if head[:-1].isdigit() and head.endswith(".") else 2
        out.extend(_wrap(body, width, indent, indent + " " * extra))
    return "\n".join(out)


def render(headline: str, rows: Sequence[tuple[str, str]], width: int, *, color: bool = False,
           tail: Sequence[str] = ()) -> str:
    """The headline, then ``label  value`` rows aligned and wrapped to ``width``, then ``tail``
    lines (already laid out, each at most ``width`` wide)."""
    width = max(width, _MIN_WIDTH)
    lines = _wrap(headline, width, "", "  ")
    if color:
        lines = [f"\033[1m{line}\033[0m" for line in lines]
    label_w = min(max((len(k) for k, _ in rows), default=0), max(width // 3, 8))
    indent = " " * (2 + label_w + 2)
    for label, value in rows:
        if len(label) > label_w:  # a long label on a line of its own
            lines.extend(_wrap(label, width, "  ", "    "))
            lines.extend(_wrap(value, width, indent, indent))
        else:
            lines.extend(_wrap(value, width, f"  {label:<{label_w}}  ", indent))
    lines.extend(tail)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the results


def _bytes(n: int | float | None) -> str:
    from gpumagic.units import format_bytes

    return format_bytes(None if n is None else round(n))


def describe_trial(trial: Trial) -> str:
    """'batch 1024: peak 3.50 MiB, 6,360 samples/s' or 'batch 2048: out of memory' (for progress lines)."""
    if trial.oom:
        return f"batch {trial.batch_size}: out of memory"
    sps = f", {trial.samples_per_second:,.0f} samples/s" if trial.samples_per_second else ""
    return f"batch {trial.batch_size}: peak {_bytes(trial.peak_bytes)}{sps}"


def _step_name(index: int, count: int) -> str:
    return f"step {index + 1}" if count == 1 else f"steps {index + 1}–{index + count}"


def memory_report_text(report: MemoryReport, width: int | None = None, *, color: bool = False) -> str:
    """``%%gpumem``'s report for a terminal: the summary line, then breakdown, steps and notes.

    >>> print(memory_report_text(report, width=60))   # doctest: +SKIP
    gpumem: peak 444.18 KiB (+369.14 KiB over baseline ...) on cpu · 5 steps · 609.4 ms
      at the peak  parameters 83.04 KiB · gradients 83.04 KiB · ...
    """
    r = report
    width = terminal_width() if width is None else width
    rows: list[tuple[str, str]] = []
    if r.breakdown is not None:
        b = r.breakdown
        rows.append(("at the peak", f"parameters {_bytes(b.parameters_bytes)} · gradients {_bytes(b.gradients_bytes)}"
                     f" · optimizer state {_bytes(b.optimizer_state_bytes)} · activations and other "
                     f"{_bytes(b.other_bytes)}"))
    rows.append(("end", f"{_bytes(r.end_bytes)} ({_signed(r.end_bytes - r.baseline_bytes)} over the baseline)"))
    if r.reserved_peak_bytes is not None:
        rows.append(("peak reserved", _bytes(r.reserved_peak_bytes)))
    steps = [s for s in r.steps if s.count > 0]
    if steps:
        per_step = sorted(s.seconds / s.count for s in steps)
        text = f"{r.total_steps}, median {format_seconds(per_step[len(per_step) // 2])} each"
        sizes = sorted({s.batch_size for s in steps if s.batch_size is not None})
        if sizes:
            text += f", batch size {', '.join(str(v) for v in sizes[:4])}{', …' if len(sizes) > 4 else ''}"
            if any(s.batch_size_guessed for s in steps):
                text += " (read from the inputs' leading dimension)"
        rows.append(("steps", text))
        losses = r.losses
        if losses:
            rows.append(("loss", f"first {losses[0]:.4g}, last {losses[-1]:.4g}, min {min(losses):.4g}"))
        slow = max(steps, key=lambda s: s.seconds / s.count)
        rows.append(("slowest", f"{_step_name(slow.index, slow.count)}: {format_seconds(slow.seconds / slow.count)}"))
        peaks = [s for s in steps if s.peak_bytes is not None]
        if peaks:
            heavy = max(peaks, key=lambda s: s.peak_bytes or 0)
            rows.append(("heaviest", f"{_step_name(heavy.index, heavy.count)}: peak {_bytes(heavy.peak_bytes)}"))
    else:
        rows.append(("steps", "none seen (no backward() in the block)"))
    if r.error:
        rows.append(("stopped by", r.error.splitlines()[0] if r.error.strip() else r.error))
    rows.extend(("note", n) for n in r.notes)
    text = render(f"gpumem: {r.summary()}", rows, width, color=color)
    grid = r.what_if_rows()
    if grid:
        text += "\n" + grid_text("what if (each remedy planned)", WHAT_IF_HEADER, grid)
    return text


def grid_text(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A title, then columns aligned under a header row (no wrapping: each row is one line).

    >>> print(grid_text("t", ("a", "b"), [("1", "22")]))
    t
      a  b
      1  22
    """
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [title] + ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
                       for r in [header, *rows]]
    return "\n".join(lines)


def _signed(n: int) -> str:
    from gpumagic.units import format_bytes

    return format_bytes(n, signed=True)


def search_text(result: BatchSearchResult, width: int | None = None, *, color: bool = False) -> str:
    """``%find_batch``'s result for a terminal: the pick, why, the fit, then the trials with the pick marked."""
    r = result
    width = terminal_width() if width is None else width
    rec = r.recommended_batch_size
    head = f"find_batch: recommended {rec}"
    if r.accumulation_steps > 1 or r.effective_batch_size:
        head += f" × {r.accumulation_steps} accumulation steps = {r.effective_batch_size}"
    head += f" (largest that ran {r.max_batch_size}) · {len(r.trials)} trials, {r.oom_count} OOM on {r.device}"
    rows: list[tuple[str, str]] = [("why", r.reason)]
    if r.lr_note:
        rows.append(("learning rate", r.lr_note))
    if r.capacity_bytes is not None:
        peak = f"predicted peak {_bytes(r.predicted_peak_bytes)} of " if r.predicted_peak_bytes is not None else ""
        rows.append(("memory", f"{peak}{_bytes(r.capacity_bytes)} (margin {r.margin:.0%})"))
    if r.fit is not None:
        rows.append(("fit", f"{_bytes(r.fit.intercept_bytes)} + {_bytes(r.fit.bytes_per_sample)} per sample "
                            f"(R² {r.fit.r2:.4f})"))
    rows.extend(("note", n) for n in r.notes)
    return render(head, rows, width, color=color, tail=_trials_table(r, width))


def _trials_table(r: BatchSearchResult, width: int) -> list[str]:
    if not r.trials:
        return []
    picked = next((i for i in range(len(r.trials) - 1, -1, -1)
                   if r.trials[i].batch_size == r.recommended_batch_size and not r.trials[i].oom), None)
    header = ["trial", "batch", "peak", "samples/s", "time", ""]
    body = [[
        str(i + 1), str(t.batch_size), "out of memory" if t.oom else _bytes(t.peak_bytes),
        f"{t.samples_per_second:,.0f}" if t.samples_per_second else "", format_seconds(t.seconds),
        "← pick" if i == picked else "",
    ] for i, t in enumerate(r.trials)]
    if picked is None and r.recommended_batch_size is not None:  # picked by the fit, not run as such
        predicted = f"≈ {_bytes(r.predicted_peak_bytes)}" if r.predicted_peak_bytes is not None else ""
        body.append(["", str(r.recommended_batch_size), predicted, "", "", "← pick (predicted)"])
    right = {0, 1, 3, 4}
    columns = list(range(len(header)))

    def lay(cols: list[int]) -> list[str]:
        widths = {c: max(len(row[c]) for row in [header, *body]) for c in cols}
        out = []
        for row in [header, *body]:
            cells = [row[c].rjust(widths[c]) if c in right else row[c].ljust(widths[c]) for c in cols]
            out.append(("  " + "  ".join(cells)).rstrip())
        return out

    lines = lay(columns)
    for drop in (4, 3, 0):  # time, then throughput, then the trial number, until it fits
        if max(len(line) for line in lines) <= width:
            break
        columns.remove(drop)
        lines = lay(columns)
    if max(len(line) for line in lines) > width:
        lines = [line[:width] for line in lines]
    return lines

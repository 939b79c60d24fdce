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

from gpumagic.render.rows import Table, view
from gpumagic.views import register_view

if TYPE_CHECKING:
    from gpumagic.report import DeviceSample, Trial

__all__ = [
    "bold",
    "describe_trial",
    "memory_report_text",
    "monitor_text",
    "render",
    "result_text",
    "search_text",
    "table_text",
    "terminal_width",
    "use_color",
    "wrap_block",
]

_MIN_WIDTH = 20


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
# the results: each reads its row model (gpumagic.render.rows), the same rows the HTML shows


def _bytes(n: int | float | None) -> str:
    from gpumagic.units import format_bytes

    return format_bytes(None if n is None else round(n))


def describe_trial(trial: Trial) -> str:
    """'batch 1024: peak 3.50 MiB, 6,360 samples/s' or 'batch 2048: out of memory' (for progress lines)."""
    if trial.oom:
        return f"batch {trial.batch_size}: " + ("would not fit (planned)" if trial.planned else "out of memory")
    sps = f", {trial.samples_per_second:,.0f} samples/s" if trial.samples_per_second else ""
    return f"batch {trial.batch_size}: {'planned peak' if trial.planned else 'peak'} {_bytes(trial.peak_bytes)}{sps}"


def result_text(result: Any, width: int | None = None, *, color: bool = False) -> str:
    """A result for a terminal: its headline, then the rows the headline does not state, then
    its tables, every line fitting ``width`` columns.

    >>> print(result_text(report, width=60))   # doctest: +SKIP
    gpumem: peak 444.18 KiB (+369.14 KiB over baseline ...) on cpu · 5 steps · 609.4 ms
      end          75.04 KiB (+0 B)
      ...
    """
    v = view(result)
    width = terminal_width() if width is None else width
    rows = [(row.label, row.value) for row in v.rows if not row.in_headline]
    tail = [line for table in v.tables for line in _lay_table(table, width)]
    return render(v.headline, rows, width, color=color, tail=tail)


memory_report_text = result_text
"""``%%gpumem``'s report for a terminal (:func:`result_text`)."""

search_text = result_text
"""``%find_batch``'s result for a terminal (:func:`result_text`): the pick, why, the fit, then the trials."""


def table_text(result: Any) -> str:
    """Every row of a result as an aligned plain-text table under its title (for scripts and logs)."""
    v = view(result)
    width = max((len(r.label) for r in v.rows), default=0)
    indent = "\n" + " " * (width + 4)  # multi-line values (code) stay in their column
    lines = [v.title, *(f"  {r.label:<{width}}  {r.value.replace(chr(10), indent)}" for r in v.rows)]
    for table in v.tables:
        lines.extend(_lay_table(table, None))
    return "\n".join(lines)


def _lay_table(table: Table, width: int | None) -> list[str]:
    columns = list(range(len(table.header)))

    def lay(cols: list[int]) -> list[str]:
        widths = {c: max(len(row[c]) for row in [table.header, *table.body]) for c in cols}
        out = []
        for row in [table.header, *table.body]:
            cells = [row[c].rjust(widths[c]) if c in table.right else row[c].ljust(widths[c]) for c in cols]
            out.append(("  " + "  ".join(cells)).rstrip())
        return out

    lines = lay(columns)
    title = [] if table.title is None else [table.title]
    if width is None:
        return title + lines
    for drop in table.drop:  # narrow terminals lose these columns first, until it fits
        if max(len(line) for line in lines) <= width:
            break
        columns.remove(drop)
        lines = lay(columns)
    if max(len(line) for line in lines) > width:
        lines = [line[:width] for line in lines]
    return title + lines



def monitor_text(devices: Sequence[DeviceSample], width: int | None = None) -> str:
    """``%gpumon`` where no widget can be drawn (terminal IPython): every device now, one row each.

    The live panel redraws itself in a notebook; a terminal gets the moment the magic ran.
    """
    from gpumagic.units import format_bytes, format_percent

    rows = []
    for d in devices:
        parts = []
        if d.used_bytes is not None:
            share = f" ({format_percent(d.used_bytes / d.total_bytes)})" if d.total_bytes else ""
            total = f" of {format_bytes(d.total_bytes)}" if d.total_bytes is not None else ""
            parts.append(f"used {format_bytes(d.used_bytes)}{total}{share}")
        if d.process_bytes is not None:
            parts.append(f"this process {format_bytes(d.process_bytes)}")
        if d.tracked_bytes is not None:
            parts.append(f"tracked tensors {format_bytes(d.tracked_bytes)}")
        if d.utilization_percent is not None:
            parts.append(f"{d.utilization_label} {d.utilization_percent:.0f}%")
        label = d.device + (f" ({d.name})" if d.name else "")
        rows.append((label, "; ".join(parts) or "nothing known"))
    headline = "gpumon: the devices now (the live panel needs a notebook; run %gpumon again to refresh)"
    return render(headline, rows, width or terminal_width())

for _name in ("MemoryReport", "BatchSearchResult", "DeviceStatus", "SweepResult"):  # the results with a row model
    register_view("pretty", _name, lambda result: result_text(result, color=use_color()))
    register_view("table", _name, table_text)
# a terminal: the advice's prose within its width, its code whole (a wrapped line would not run)
register_view("pretty", "Advice", lambda advice: wrap_block(advice.text(), code_indent=5))

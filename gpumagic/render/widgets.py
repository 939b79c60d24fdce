"""The rendering layer: figures, PNGs and ipywidgets for gpumagic's results and the live monitor.

The only module that imports ipywidgets and matplotlib, both inside functions, and matplotlib
only through :class:`matplotlib.figure.Figure` and the Agg canvas: the user's pyplot state
(current figure, backend, ``plt.show()`` queue) is never touched.

Registered with :mod:`gpumagic.views` for :class:`MemoryReport` and :class:`BatchSearchResult`:
:func:`rich_bundle` adds a widget view (an interactive panel where a widget manager runs) and a
PNG of the same plot (for GitHub, nbviewer, nbconvert and frontends without widgets) to the text
and HTML the result makes itself. Nothing here displays or prints: the IPython layer does.

>>> fig = search_figure(result)          # doctest: +SKIP
>>> panel = search_widget(result)        # doctest: +SKIP
>>> panel.slider.value = 256             # doctest: +SKIP
>>> print(panel.readout.value)           # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from gpumagic.batchmath import interpolate, lr_note
from gpumagic.report import BatchSearchResult, MemoryReport, Trial
from gpumagic.units import IEC_UNITS, format_bytes, format_percent
from gpumagic.views import register as register_renderer

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from gpumagic.monitor import Monitor, Sample
    from gpumagic.report import DeviceSample

__all__ = [
    "DPI",
    "MAX_DRAWN_POINTS",
    "advice_widget",
    "envelope",
    "figure_png",
    "memory_figure",
    "memory_widget",
    "monitor_widget",
    "rich_bundle",
    "search_figure",
    "search_readout",
    "search_widget",
    "sparkline",
]

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
DPI = 100
MAX_DRAWN_POINTS = 2000
"""Longer per-step series are drawn through :func:`envelope` (min and max per bucket)."""

_BLUE, _RED, _ORANGE, _GREEN, _PURPLE, _GREY = "#1f77b4", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#7f7f7f"


# ---------------------------------------------------------------------------------------------
# the mimebundle


def rich_bundle(obj: object, kind: str) -> dict[str, Any]:
    """The widget view and a PNG for a result (``kind`` "memory" or "search"), to merge over its
    text/plain and text/html.

    Without ipywidgets only the PNG comes back; without matplotlib nothing does (the caller's
    text and HTML still show).
    """
    if kind not in ("memory", "search"):
        raise ValueError(f"kind must be 'memory' or 'search', got {kind!r}")
    try:
        import matplotlib.figure  # noqa: F401  (only asking whether it is installed)
    except ImportError:
        return {}
    if kind == "search":
        if not isinstance(obj, BatchSearchResult):
            raise TypeError(f"kind 'search' needs a BatchSearchResult, got {type(obj).__name__}")
        plot = _SearchPlot(obj)
        png = figure_png(plot.figure)
    else:
        if not isinstance(obj, MemoryReport):
            raise TypeError(f"kind 'memory' needs a MemoryReport, got {type(obj).__name__}")
        png = figure_png(memory_figure(obj))
    bundle: dict[str, Any] = {"image/png": base64.b64encode(png).decode("ascii")}
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return bundle
    widget = _search_panel(obj, plot, png) if isinstance(obj, BatchSearchResult) else memory_widget(obj, png=png)
    bundle[WIDGET_MIME] = {"version_major": 2, "version_minor": 0, "model_id": widget.model_id}
    return bundle


def figure_png(fig: Figure) -> bytes:
    """The figure as PNG bytes, at its own size and dpi, through the Agg canvas (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    buf = io.BytesIO()
    canvas.print_png(buf)  # type: ignore[no-untyped-call]  # untyped in matplotlib's stubs
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# shared drawing helpers


def _unit_for(span: float) -> tuple[str, int]:
    for name, scale in reversed(IEC_UNITS):
        if span >= scale:
            return name, scale
    return "B", 1


def _tick(v: float) -> str:
    text = f"{v:,.3f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _byte_axis(ax: Axes, unit: str, label: str) -> None:
    """Tick labels such as "512 MiB" on data already divided by the unit's scale."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{_tick(v)} {unit}"))
    ax.set_ylabel(label)


def _new_figure(height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(8.0, height), dpi=DPI, layout="constrained")


def envelope(values: Sequence[float], buckets: int) -> list[int]:
    """Indices of the points to draw for a long series: the minimum and the maximum of each of
    ``buckets`` consecutive slices, in order, plus the first and last point. A single-step spike
    always survives, unlike plain striding.

    >>> envelope([0, 0, 9, 0, 0, 0, 0, 0], 2)
    [0, 2, 4, 7]
    """
    if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
        raise ValueError(f"buckets must be an int >= 1, got {buckets!r}")
    n = len(values)
    if n <= 2 * buckets:
        return list(range(n))
    import numpy as np

    arr = np.asarray(values, dtype=float)
    edges = np.linspace(0, n, buckets + 1).astype(int)
    keep = {0, n - 1}
    for lo, hi in itertools.pairwise(edges.tolist()):
        seg = arr[lo:hi]
        keep.add(lo + int(seg.argmin()))
        keep.add(lo + int(seg.argmax()))
    return sorted(keep)


def _thin(xs: Sequence[float], ys: Sequence[float]) -> tuple[list[float], list[float]]:
    if len(ys) <= MAX_DRAWN_POINTS:
        return list(xs), list(ys)
    idx = envelope(ys, MAX_DRAWN_POINTS // 2)
    return [xs[i] for i in idx], [ys[i] for i in idx]


# ---------------------------------------------------------------------------------------------
# batch-size search: memory (and throughput) versus batch size


def _measured(result: BatchSearchResult) -> list[Trial]:
    """Trials that ran, one per batch size (the last one wins), sorted by batch size."""
    by_size = {t.batch_size: t for t in result.trials if not t.oom and t.peak_bytes is not None}
    return [by_size[b] for b in sorted(by_size)]


def _predicted_peak(result: BatchSearchResult, b: int) -> int | None:
    if result.fit is not None:
        return result.fit.predict(b)
    value = interpolate([(t.batch_size, float(t.peak_bytes or 0)) for t in _measured(result)], b)
    return None if value is None else round(value)


def _fitted(result: BatchSearchResult) -> list[Trial]:
    """The trials the fit was made on: the largest sizes that ran (on a hinge, only the piece
    above the bend), all of them when the fit does not say."""
    measured = _measured(result)
    points = result.fit.points if result.fit is not None else 0
    return measured[-points:] if points else measured


def _band(result: BatchSearchResult) -> float:
    """Half-width of the fit's band, relative: the largest relative residual, at least 1%."""
    fit = result.fit
    if fit is None:
        return 0.0
    worst = 0.01
    # how well the fit describes the trials it covers, not the flat part of a hinge below them
    for t in _fitted(result):
        predicted = fit.predict(t.batch_size)
        if predicted > 0 and t.peak_bytes is not None:
            worst = max(worst, abs(t.peak_bytes - predicted) / predicted)
    return min(worst, 0.5)


def _slider_bounds(result: BatchSearchResult) -> tuple[int, int] | None:
    """1 .. the largest size that ran and whose predicted peak fits the capacity."""
    hi = result.max_batch_size
    if hi is None or hi < 1:
        return None
    if result.fit is not None and result.capacity_bytes is not None:
        by_fit = result.fit.largest_under(result.capacity_bytes)
        if by_fit is not None and 1 <= by_fit < hi:
            hi = by_fit
    return 1, hi


def _lr_optimizer(result: BatchSearchResult) -> str | None:
    # lr_note() takes an optimizer name; "adam" stands for every Adam-like (square-root) one
    return "adam" if result.lr_rule == "sqrt" else None


def search_readout(result: BatchSearchResult, batch_size: int) -> list[str]:
    """What the widget's readout says for one batch size, one fact a line (deterministic text).

    >>> search_readout(result, 256)   # doctest: +SKIP
    ['batch size 256', 'predicted peak 356.00 MiB', 'headroom 444.50 MiB of 800.50 MiB capacity', ...]
    """
    b = batch_size
    lines = [f"batch size {b}" + (" (recommended)" if b == result.recommended_batch_size else "")]
    predicted = _predicted_peak(result, b)
    ran = {t.batch_size: t for t in _measured(result)}
    how = "planned" if b in ran and ran[b].planned else "measured"
    measured = f" ({how} {format_bytes(ran[b].peak_bytes)})" if b in ran else ""
    if predicted is None:
        sizes = sorted(ran)
        where = f", outside the measured sizes {sizes[0]}–{sizes[-1]}" if sizes else ""
        lines.append(f"predicted peak unknown (no fit{where})" + measured)
    else:
        basis = "" if result.fit is not None else " (interpolated)"
        lines.append(f"predicted peak {format_bytes(predicted)}{basis}{measured}")
    cap = result.capacity_bytes
    if cap is not None and predicted is not None:
        room = f"headroom {format_bytes(cap - predicted)} of {format_bytes(cap)} capacity"
        if predicted > cap * (1 - result.margin):
            room += f" (inside the {format_percent(result.margin)} safety margin)"
        lines.append(room)
    rates = [(t.batch_size, t.samples_per_second) for t in _measured(result) if t.samples_per_second]
    rate = interpolate([(x, float(y)) for x, y in rates if y is not None], b)
    if rate is None:
        lines.append("throughput not measured at this size")
    else:
        how = "measured" if any(x == b for x, _ in rates) else "interpolated"
        lines.append(f"throughput {rate:,.0f} samples/s ({how})")
    effective = result.effective_batch_size
    if effective is not None:
        k = math.ceil(effective / b)
        lines.append(f"accumulation {k} step{'s' if k != 1 else ''} × {b} = {b * k} "
                     f"(effective batch {effective})")
        if b * k == effective:
            lines.append(f"learning rate unchanged (the effective batch stays {effective})")
        else:
            lines.append(f"learning rate: {lr_note(effective, b * k, _lr_optimizer(result))}")
    return lines


def _readout_html(lines: Sequence[str]) -> str:
    return "<br>".join(html.escape(s) for s in lines)


class _SearchPlot:
    """The search figure plus a marker for a chosen batch size that can be moved and redrawn."""

    def __init__(self, result: BatchSearchResult) -> None:
        self.result = result
        ran = _measured(result)
        rated = [t for t in ran if t.samples_per_second]
        fig = _new_figure(6.0 if rated else 4.4)
        if rated:
            ax, tp = fig.subplots(2, 1, sharex=True, height_ratios=[2.0, 1.0])
        else:
            ax, tp = fig.subplots(1, 1), None
        self.figure, self.ax, self.tp = fig, ax, tp

        rec = result.recommended_batch_size
        rec_peak = result.predicted_peak_bytes
        if rec_peak is None and rec is not None:
            rec_peak = _predicted_peak(result, rec)
        top = max([result.capacity_bytes or 0, rec_peak or 0, *(t.peak_bytes or 0 for t in ran)]) or 1
        unit, self.scale = _unit_for(top)
        x_right = max([t.batch_size for t in result.trials] + [rec or 1]) * 1.05
        ax.set_xlim(0, x_right)
        ax.set_ylim(0, top * 1.1 / self.scale)
        title = f"Peak memory versus batch size on {result.device}"
        if result.dry_run:
            title = f"PLANNED peak memory versus batch size for {result.device} (dry run)"
        ax.set_title(title, loc="left", fontsize=11)

        self._draw_fit(x_right)
        self._draw_trials(ran, top, rec, rec_peak)
        _byte_axis(ax, unit, "peak memory")
        ax.grid(True, alpha=0.25)
        if ax.get_legend_handles_labels()[0]:  # nothing to list when no trial ran and the capacity is unknown
            ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
        if tp is not None:
            self._draw_throughput(tp, rated, rec)
        bottom = tp if tp is not None else ax
        bottom.set_xlabel("batch size")
        from matplotlib.ticker import MaxNLocator as _XLocator

        bottom.xaxis.set_major_locator(_XLocator(integer=True))

        self._lines = [a.axvline(0, color=_PURPLE, lw=1.0, ls="--", visible=False)
                       for a in (ax, tp) if a is not None]
        (self._dot,) = ax.plot([], [], "o", color=_PURPLE, ms=7, zorder=6)
        self.selected: int | None = None

    def _draw_fit(self, x_right: float) -> None:
        """The fitted line with its band, the capacity and the margin."""
        result, ax, scale = self.result, self.ax, self.scale
        cap = result.capacity_bytes
        if result.fit is not None:
            import numpy as np

            # on a hinge the line holds from the smallest size it was fitted on; below that the
            # measured points (the flat part) speak for themselves
            fitted = _fitted(result)
            x_left = fitted[0].batch_size if len(fitted) < len(_measured(result)) else 0.0
            xs = np.linspace(float(x_left), x_right, 50)
            ys = (result.fit.intercept_bytes + result.fit.bytes_per_sample * xs) / scale
            band = _band(result)
            ax.fill_between(xs, ys * (1 - band), ys * (1 + band), color=_GREY, alpha=0.15, lw=0,
                            label=f"fit ± {band:.0%}")
            ax.plot(xs, ys, color=_GREY, lw=1.2, label=f"fit: {result.fit.describe(r2=False)}")
        if cap is not None:
            ax.axhline(cap / scale, color=_RED, lw=1.2, label=f"capacity {format_bytes(cap)}")
            if result.margin > 0:
                ax.axhline(cap * (1 - result.margin) / scale, color=_ORANGE, lw=1.0, ls="--",
                           label=f"capacity − {format_percent(result.margin)} margin")

    def _draw_trials(self, ran: list[Trial], top: int, rec: int | None, rec_peak: int | None) -> None:
        """The measured (and planned) peaks, the trials that ran out of memory and the recommendation."""
        result, ax, scale = self.result, self.ax, self.scale
        trials, cap = result.trials, result.capacity_bytes
        measured = [t for t in ran if not t.planned]
        planned = [t for t in ran if t.planned]
        if measured:
            ax.plot([t.batch_size for t in measured], [(t.peak_bytes or 0) / scale for t in measured], "o",
                    color=_BLUE, ms=5, label="trial: peak measured", zorder=3)
        if planned:  # a plan is not a measurement: hollow diamonds
            ax.plot([t.batch_size for t in planned], [(t.peak_bytes or 0) / scale for t in planned], "D",
                    color=_BLUE, mfc="none", ms=6, mew=1.5, label="planned (dry run): peak predicted", zorder=3)
        ooms = [t.batch_size for t in trials if t.oom and not t.planned]
        if ooms:
            y_oom = (cap if cap is not None else top) / scale
            ax.plot(ooms, [y_oom] * len(ooms), "x", color=_RED, ms=8, mew=2, label="trial: out of memory",
                    zorder=4)
        too_big = [t.batch_size for t in trials if t.oom and t.planned]
        if too_big:
            y_oom = (cap if cap is not None else top) / scale
            ax.plot(too_big, [y_oom] * len(too_big), "D", color=_RED, mfc="none", ms=7, mew=1.5,
                    label="planned: would not fit", zorder=4)
        if rec is not None:
            ax.axvline(rec, color=_GREEN, lw=1.2, ls=":")
            if rec_peak is not None:
                ax.plot([rec], [rec_peak / scale], "*", color=_GREEN, ms=14, zorder=5,
                        label=f"recommended {rec} ({format_bytes(rec_peak)})")
        if not trials:
            ax.text(0.5, 0.5, "no trials ran", transform=ax.transAxes, ha="center", va="center", color=_GREY)

    @staticmethod
    def _draw_throughput(tp: Axes, rated: list[Trial], rec: int | None) -> None:
        """Samples per second against batch size, the fastest marked."""
        xs_r = [t.batch_size for t in rated]
        ys_r = [float(t.samples_per_second or 0) for t in rated]
        tp.plot(xs_r, ys_r, "o-", color=_BLUE, ms=4, lw=1.2)
        best = max(range(len(ys_r)), key=ys_r.__getitem__)
        tp.plot([xs_r[best]], [ys_r[best]], "o", color=_GREEN, ms=8, mfc="none", mew=1.5,
                label=f"fastest: {xs_r[best]} ({ys_r[best]:,.0f} samples/s)")
        if rec is not None:
            tp.axvline(rec, color=_GREEN, lw=1.2, ls=":")
        tp.set_ylim(0, max(ys_r) * 1.15)
        from matplotlib.ticker import FuncFormatter, MaxNLocator

        tp.yaxis.set_major_locator(MaxNLocator(nbins=4))
        tp.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))
        tp.set_ylabel("samples/s")
        tp.grid(True, alpha=0.25)
        tp.legend(loc="lower right", fontsize=8, framealpha=0.9)

    def select(self, batch_size: int | None) -> None:
        """Mark ``batch_size`` (a slider's value); None or the recommendation hides the marker."""
        self.selected = batch_size
        show = batch_size is not None and batch_size != self.result.recommended_batch_size
        for line in self._lines:
            line.set_visible(show)
            if show:
                line.set_xdata([batch_size, batch_size])
        peak = None if batch_size is None else _predicted_peak(self.result, batch_size)
        if show and peak is not None and batch_size is not None:
            self._dot.set_data([batch_size], [peak / self.scale])
        else:
            self._dot.set_data([], [])


def search_figure(result: BatchSearchResult, selected: int | None = None) -> Figure:
    """Peak memory versus batch size: the trials (out-of-memory ones as red × at the capacity), the
    fit with its band, the capacity and margin lines, the recommendation; below, samples/s versus
    batch size when the trials measured it. ``selected`` adds a marker at another size."""
    plot = _SearchPlot(result)
    plot.select(selected)
    return plot.figure


def _search_panel(result: BatchSearchResult, plot: _SearchPlot, png: bytes) -> Any:
    import ipywidgets as w

    image = w.Image(value=png, format="png", layout=w.Layout(max_width="100%", height="auto"))
    image.add_class("gpumagic-plot")
    bounds = _slider_bounds(result)
    if bounds is None:
        slider = w.IntSlider(value=1, min=1, max=1, disabled=True, description="batch size")
        readout = w.HTML(value=_readout_html(["no batch size ran without running out of memory: "
                                              "nothing to choose from"]))
    else:
        lo, hi = bounds
        start = min(max(result.recommended_batch_size or hi, lo), hi)
        slider = w.IntSlider(value=start, min=lo, max=hi, description="batch size", continuous_update=False,
                             style={"description_width": "initial"}, layout=w.Layout(width="min(100%, 640px)"))
        readout = w.HTML(value=_readout_html(search_readout(result, start)))
        plot.select(start)
        if start != result.recommended_batch_size:  # the marker shows: the caller's PNG lacks it
            image.value = figure_png(plot.figure)

        def on_value(change: dict[str, Any]) -> None:
            b = int(change["new"])
            readout.value = _readout_html(search_readout(result, b))
            plot.select(b)
            image.value = figure_png(plot.figure)  # only on a new value: the slider sends on release

        slider.observe(on_value, names="value")
    slider.add_class("gpumagic-slider")
    readout.add_class("gpumagic-readout")
    box = w.VBox([image, slider, readout])
    box.add_class("gpumagic-search")
    box.image, box.slider, box.readout, box.result, box.plot = image, slider, readout, result, plot
    return box


def advice_widget(advice: Any, run: Callable[[str], Any]) -> Any:
    """An ``ipywidgets.VBox`` showing out-of-memory advice, with a button (``.button``) that runs
    the first measuring command in place (``run(code)``, its output in ``.output``); ``None``
    when the advice has no command to run. The text form (``advice.text()``) works without it.
    """
    code = next((s.code for s in advice.suggestions if s.kind == "measure" and s.code), None)
    if code is None:
        return None
    import ipywidgets as w

    body = w.HTML(value=advice._repr_html_())
    button = w.Button(description="Measure the batch size that fits", icon="play",
                      tooltip=code, layout=w.Layout(width="auto"))
    output = w.Output()

    def on_click(_: Any) -> None:
        button.disabled = True
        with output:
            run(code)

    button.on_click(on_click)
    box = w.VBox([body, button, output])
    box.add_class("gpumagic-oom")
    box.button, box.output, box.code = button, output, code
    return box


def search_widget(result: BatchSearchResult) -> Any:
    """An ``ipywidgets.VBox``: the plot (``.image``), a batch-size slider limited to sizes that fit
    (``.slider``, starting at the recommendation) and a readout for the chosen size (``.readout``):
    predicted peak, headroom, samples/s, and accumulation steps and learning rate when the search
    had an effective batch."""
    plot = _SearchPlot(result)
    return _search_panel(result, plot, figure_png(plot.figure))


# ---------------------------------------------------------------------------------------------
# one tracked cell: loss and peak memory per step


def memory_figure(report: MemoryReport) -> Figure:
    """Loss (top) and peak memory (bottom) per step on a shared step axis, with the cell's
    baseline, peak and capacity (or budget) as lines. Long loops are drawn through
    :func:`envelope` so spikes stay visible; with no steps, bars of baseline, peak and end."""
    if len(report.ranks) > 1:
        return _rank_bars(report)
    cap = report.budget_bytes or report.capacity_bytes
    cap_name = "budget" if report.budget_bytes else "capacity"
    title = f"Peak memory per step on {report.device}" if report.steps else f"Memory of the block on {report.device}"
    mem = [(s.index, s.peak_bytes) for s in report.steps if s.peak_bytes is not None]
    losses = [(s.index, s.loss) for s in report.steps if s.loss is not None]
    if losses:
        title = f"Loss and peak memory per step on {report.device}"
    n = report.total_steps or len(report.steps)
    title += f" · {n:,} step{'s' if n != 1 else ''}" if report.steps else " · no training steps seen"
    if report.error:
        title += f" · partial: stopped by {report.error.split(':')[0]}"
    elif report.incomplete:
        title += " · incomplete (see the report)"

    if not report.steps:
        return _memory_bars(report, cap, cap_name, title)

    inputs = _varied_inputs(report)
    fig = _new_figure((5.6 if losses else 3.8) + (3.0 if inputs else 0.0))
    if losses:
        axes = fig.subplots(3 if inputs else 2, 1, height_ratios=[1.0, 1.4, 1.6][: 3 if inputs else 2])
        lax, ax = axes[0], axes[1]
        lax.sharex(ax)
        lax.tick_params(labelbottom=False)
    elif inputs:
        lax, (ax, _) = None, fig.subplots(2, 1, height_ratios=[1.4, 1.6])
    else:
        lax, ax = None, fig.subplots(1, 1)
    (lax or ax).set_title(title, loc="left", fontsize=11)

    if lax is not None:
        lx, ly = _thin([float(x) for x, _ in losses], [float(y) for _, y in losses if y is not None])
        few = len(losses) <= 200
        lax.plot(lx, ly, color=_BLUE, lw=1.0, marker="." if few else None, ms=4)
        positive = [v for v in ly if v > 0]
        if len(positive) == len(ly) and max(ly) / min(ly) > 100:
            lax.set_yscale("log")
        lax.set_ylabel("loss")
        lax.grid(True, alpha=0.25)

    peaks = [p for _, p in mem if p is not None]
    high = max([report.peak_bytes, report.baseline_bytes, *peaks])
    low = min([report.baseline_bytes, *peaks])
    cap_on_scale = cap is not None and cap <= 4 * max(high, 1)
    if cap_on_scale and cap is not None:
        high = max(high, cap)
    bottom = 0.0 if low < 0.5 * high else low - 0.15 * (high - low)
    unit, scale = _unit_for(max(high - bottom, 1))
    if mem:
        mx, my = _thin([float(x) for x, _ in mem], [float(p) for p in peaks])
        few = len(mem) <= 200
        ax.plot(mx, [v / scale for v in my], color=_BLUE, lw=1.0, marker="." if few else None, ms=4,
                label="peak in the step", zorder=3)
    ax.axhline(report.baseline_bytes / scale, color=_GREY, lw=1.0, ls="--",
               label=f"baseline {format_bytes(report.baseline_bytes)}")
    ax.axhline(report.peak_bytes / scale, color=_ORANGE, lw=1.0, ls=":",
               label=f"peak {format_bytes(report.peak_bytes)}")
    if cap is not None and cap_on_scale:
        ax.axhline(cap / scale, color=_RED, lw=1.2, label=f"{cap_name} {format_bytes(cap)}")
    elif cap is not None:
        ax.text(0.99, 0.03, f"{cap_name} {format_bytes(cap)} (off the scale)", transform=ax.transAxes,
                ha="right", va="bottom", fontsize=8, color=_RED)
    ax.set_ylim(bottom / scale, high * 1.08 / scale)
    _byte_axis(ax, unit, "memory")
    ax.set_xlabel("step")
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))
    ax.grid(True, alpha=0.25)
    handles, labels = ax.get_legend_handles_labels()
    host = [(s.index, s.host_peak_bytes) for s in report.steps if s.host_peak_bytes is not None]
    if report.host_matters and host:  # beside the device's, on its own scale
        hax = ax.twinx()
        hunit, hscale = _unit_for(max(p for _, p in host))
        hx, hy = _thin([float(x) for x, _ in host], [float(p) for _, p in host])
        (line,) = hax.plot(hx, [v / hscale for v in hy], color=_GREEN, lw=1.0, ls="-.")
        _byte_axis(hax, hunit, "host")
        handles.append(line)
        labels.append(f"host peak in the step (machine {format_bytes(report.host_total_bytes)})")
    # Under the axes: lines at baseline, peak and capacity leave no free corner inside.
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=8, ncols=4, frameon=False)
    if inputs:
        _input_panel(fig.axes[-1], inputs, cap if cap_on_scale else None, cap_name)
    return fig


def _varied_inputs(report: MemoryReport) -> list[tuple[int, int, int]]:
    """(input elements, peak, step) of the steps, when the input size varied by more than 10%."""
    pts = [(s.input_elements, s.peak_bytes, s.index) for s in report.steps
           if s.input_elements is not None and s.peak_bytes is not None]
    if len(pts) < 2 or max(p[0] for p in pts) <= 1.1 * min(p[0] for p in pts):
        return []
    return pts


def _input_panel(ax: Axes, pts: list[tuple[int, int, int]], cap: int | None, cap_name: str) -> None:
    """Peak against the input each step drew: why the step with the largest input set the peak."""
    high = max([p for _, p, _ in pts] + ([cap] if cap is not None else []))
    unit, scale = _unit_for(max(high, 1))
    ax.scatter([e for e, _, _ in pts], [p / scale for _, p, _ in pts], s=10, color=_BLUE, alpha=0.7, zorder=3,
               label="step")
    e, p, i = max(pts, key=lambda t: t[1])
    ax.annotate(f"step {i:,}", (e, p / scale), textcoords="offset points", xytext=(-6, 6), ha="right", fontsize=8)
    if cap is not None:
        ax.axhline(cap / scale, color=_RED, lw=1.2, label=f"{cap_name} {format_bytes(cap)}")
    _byte_axis(ax, unit, "peak in the step")
    ax.set_xlabel("input elements drawn in the step")
    ax.grid(True, alpha=0.25)
    ax.legend(loc="upper left", fontsize=8, frameon=False)


def _rank_bars(report: MemoryReport) -> Figure:
    """One bar per rank: its peak, with its budget (or capacity) as a tick on the bar."""
    ranks = report.ranks
    top = report.peak_rank
    title = f"Peak memory per rank · {len(ranks)} ranks"
    if top is not None:
        title += f" · rank {top.rank} highest, spread {format_bytes(report.peak_spread_bytes)}"
    fig = _new_figure(1.2 + 0.42 * len(ranks))
    ax = fig.subplots(1, 1)
    ax.set_title(title, loc="left", fontsize=11)
    names = [f"rank {r.rank}" for r in reversed(ranks)]
    peaks = [r.peak_bytes for r in reversed(ranks)]
    caps = [r.budget_bytes or r.capacity_bytes for r in reversed(ranks)]
    high = max([*peaks, 1])
    known = [c for c in caps if c is not None and c <= 4 * high]
    high = max([high, *known])
    unit, scale = _unit_for(high)
    colors = [_ORANGE if top is not None and r.rank == top.rank else _BLUE for r in reversed(ranks)]
    ax.barh(names, [v / scale for v in peaks], color=colors, height=0.6, label="peak")
    for i, (v, c) in enumerate(zip(peaks, caps, strict=True)):
        ax.text(v / scale, i, f" {format_bytes(v)}", va="center", fontsize=9)
        if c is not None and c <= 4 * max(peaks[i], 1):
            ax.plot([c / scale] * 2, [i - 0.4, i + 0.4], color=_RED, lw=1.4)
    ax.set_xlim(0, high * 1.25 / scale)
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{_tick(v)} {unit}"))
    ax.grid(True, axis="x", alpha=0.25)
    return fig


def _memory_bars(report: MemoryReport, cap: int | None, cap_name: str, title: str) -> Figure:
    fig = _new_figure(2.6)
    ax = fig.subplots(1, 1)
    ax.set_title(title, loc="left", fontsize=11)
    names = ["end", "peak", "baseline"]
    values = [report.end_bytes, report.peak_bytes, report.baseline_bytes]
    high = max([*values, 1])
    cap_on_scale = cap is not None and cap <= 4 * high
    if cap_on_scale and cap is not None:
        high = max(high, cap)
    unit, scale = _unit_for(high)
    ax.barh(names, [v / scale for v in values], color=[_GREY, _ORANGE, _BLUE], height=0.6)
    for i, v in enumerate(values):
        ax.text(v / scale, i, f" {format_bytes(v)}", va="center", fontsize=9)
    if cap is not None and cap_on_scale:
        ax.axvline(cap / scale, color=_RED, lw=1.2, label=f"{cap_name} {format_bytes(cap)}")
        ax.legend(loc="lower right", fontsize=8)
    elif cap is not None:
        ax.text(0.99, 0.03, f"{cap_name} {format_bytes(cap)} (off the scale)", transform=ax.transAxes,
                ha="right", va="bottom", fontsize=8, color=_RED)
    ax.set_xlim(0, high * 1.25 / scale)
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{_tick(v)} {unit}"))
    ax.grid(True, axis="x", alpha=0.25)
    return fig


def memory_widget(report: MemoryReport, *, png: bytes | None = None) -> Any:
    """An ``ipywidgets.VBox``: the per-step plot (``.image``) over the report's table (``.summary``)."""
    import ipywidgets as w

    image = w.Image(value=png if png is not None else figure_png(memory_figure(report)), format="png",
                    layout=w.Layout(max_width="100%", height="auto"))
    image.add_class("gpumagic-plot")
    summary = w.HTML(value=report._repr_html_())
    summary.add_class("gpumagic-summary")
    box = w.VBox([image, summary])
    box.add_class("gpumagic-memory")
    box.image, box.summary, box.report = image, summary, report
    return box


# ---------------------------------------------------------------------------------------------
# the live monitor

_BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float | None], width: int = 60, top: float | None = None) -> str:
    """A one-line unicode chart of ``values`` (unknown ones blank), at most ``width`` characters,
    scaled to ``top`` (default: the largest value). Each character shows its bucket's maximum.

    >>> sparkline([0, 1, 2, 4], top=4)
    '▁▃▅█'
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an int >= 1, got {width!r}")
    n = len(values)
    if n == 0:
        return ""
    buckets = [values[i * n // width:(i + 1) * n // width] for i in range(width)] if n > width else [
        [v] for v in values]
    known = [v for v in values if v is not None]
    scale = top if top is not None and top > 0 else max(known, default=0.0)
    out = []
    for bucket in buckets:
        vals = [v for v in bucket if v is not None]
        if not vals:
            out.append(" ")
            continue
        frac = 0.0 if scale <= 0 else min(1.0, max(0.0, max(vals) / scale))
        out.append(_BLOCKS[min(len(_BLOCKS) - 1, int(frac * len(_BLOCKS)))])
    return "".join(out)


def _span(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _device_text(d: DeviceSample) -> str:
    parts = [f"{format_bytes(d.used_bytes)} of {format_bytes(d.total_bytes)} in use"]
    if d.utilization_percent is not None:
        parts.append(f"{d.utilization_label} {d.utilization_percent:.0f}%")
    parts.append(f"this process {format_bytes(d.process_bytes)}")
    if d.other_bytes is not None:
        parts.append(f"others {format_bytes(d.other_bytes)}")
    if d.tracked_bytes is not None:
        parts.append(f"tracked tensors {format_bytes(d.tracked_bytes)}")
    return " · ".join(parts)


def monitor_widget(monitor: Monitor) -> Any:
    """An ``ipywidgets.VBox`` showing ``monitor``'s devices, updated from its thread.

    One row per device: a used/total bar, the numbers (utilisation, this process versus the
    rest) and a sparkline of the history. ``.rows`` maps device names to rows, ``.status`` and
    ``.stop_button`` are the footer; ``.update(sample)`` redraws from a sample by hand.
    """
    import ipywidgets as w

    header = w.HTML(value=f"<b>gpumagic monitor</b> · {html.escape(monitor.source.name)} "
                          f"every {monitor.interval:g} s")
    stop_button = w.Button(description="stop", tooltip="stop sampling", layout=w.Layout(width="80px"))
    stop_button.add_class("gpumagic-monitor-stop")
    status = w.HTML(value="waiting for the first sample…")
    status.add_class("gpumagic-monitor-status")
    rows_box = w.VBox([])
    box = w.VBox([w.HBox([header, stop_button]), rows_box, status])
    box.add_class("gpumagic-monitor")
    rows: dict[str, Any] = {}

    def row_for(d: DeviceSample) -> Any:
        row = rows.get(d.device)
        if row is None:
            label = w.HTML(value=f"<b>{html.escape(d.device)}</b> {html.escape(d.name or '')}",
                           layout=w.Layout(width="220px"))
            bar = w.FloatProgress(value=0.0, min=0.0, max=100.0, layout=w.Layout(width="240px"))
            bar.add_class("gpumagic-monitor-bar")
            text = w.HTML(value="")
            text.add_class("gpumagic-monitor-text")
            spark = w.HTML(value="")
            spark.add_class("gpumagic-monitor-sparkline")
            row = w.VBox([w.HBox([label, bar, text]), spark])
            row.add_class("gpumagic-monitor-row")
            row.bar, row.text, row.spark = bar, text, spark
            rows[d.device] = row
            rows_box.children = (*rows_box.children, row)
        return row

    def update(sample: Sample | None) -> None:
        if sample is None:
            status.value = "stopped" + (f" · last error: {html.escape(repr(monitor.last_error))}"
                                        if monitor.last_error is not None else "")
            stop_button.disabled = True
            return
        history = monitor.samples()
        for d in sample.devices:
            row = row_for(d)
            if d.used_bytes is not None and d.total_bytes:
                row.bar.value = 100.0 * d.used_bytes / d.total_bytes
                row.bar.bar_style = "danger" if row.bar.value >= 90 else ""
            row.text.value = html.escape(_device_text(d))
            used = [next((x.used_bytes for x in s.devices if x.device == d.device), None) for s in history]
            line = sparkline([None if u is None else float(u) for u in used], 60,
                             None if d.total_bytes is None else float(d.total_bytes))
            span = _span(history[-1].time - history[0].time) if len(history) > 1 else "0 s"
            row.spark.value = (f'<span style="font-family:monospace">{line}</span> '
                               f"<small>memory in use, last {span}</small>")
        n = len(history)
        status.value = f"{n} sample{'s' if n != 1 else ''} · running" if monitor.is_running else "stopped"

    def on_sample(sample: Sample | None) -> None:
        if box.comm is None:  # the panel was closed: stop feeding it
            monitor.remove_callback(on_sample)
            return
        update(sample)

    stop_button.on_click(lambda _b: monitor.stop())
    latest = monitor.latest()
    if latest is not None:
        update(latest)
    if not monitor.is_running and latest is not None:
        update(None)
    monitor.add_callback(on_sample)
    box.rows, box.status, box.stop_button, box.monitor, box.update = rows, status, stop_button, monitor, update
    return box


def _memory_bundle(report: MemoryReport) -> dict[str, Any]:
    return rich_bundle(report, "memory")


def _search_bundle(result: BatchSearchResult) -> dict[str, Any]:
    return rich_bundle(result, "search")


register_renderer(MemoryReport, _memory_bundle)
register_renderer(BatchSearchResult, _search_bundle)


# ---------------------------------------------------------------------------------------------
# progress of a search in a notebook


class WidgetProgress:
    """A notebook bar for ``%find_batch``: trials done (of at most ``max_trials``) and the last one
    in words. The IPython layer shows :attr:`widget` and removes it when the search ends.

    >>> progress = WidgetProgress()     # doctest: +SKIP
    >>> progress(trial, 0); progress.close()   # doctest: +SKIP
    """

    def __init__(self, label: str = "find_batch", max_trials: int = 12) -> None:
        import ipywidgets as w  # lazy, like every widget here

        self._bar = w.IntProgress(value=0, min=0, max=max_trials, bar_style="info",
                                  layout=w.Layout(width="160px"))
        self._label = label
        self._text = w.HTML(value=html.escape(f"{label}: first trial running"))
        self.widget = w.HBox([self._bar, self._text])

    def __call__(self, trial: Trial, index: int) -> None:
        from gpumagic.render.text import describe_trial

        self._bar.value = min(index + 1, self._bar.max)
        done = f"{index + 1} trial{'s' if index else ''} done"
        self._text.value = html.escape(f"{self._label}: {done}, last {describe_trial(trial)}")

    def close(self) -> None:
        self.widget.close()

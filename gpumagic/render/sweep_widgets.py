"""The figure, PNG and widget of a batch-size sweep (:class:`~gpumagic.sweep_results.SweepResult`).

A renderer module: matplotlib (through :class:`matplotlib.figure.Figure` and the Agg canvas,
never pyplot) and ipywidgets are imported inside the functions. Registered with
:mod:`gpumagic.views` when the first result renders; the text and HTML come from the result.

>>> fig = sweep_figure(result)                 # doctest: +SKIP
>>> panel = sweep_widget(result)               # doctest: +SKIP
>>> panel.size.value = 64                      # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import math
from typing import TYPE_CHECKING, Any

from gpumagic.sweep_results import SweepResult, smoothed
from gpumagic.views import register as register_renderer

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["sweep_figure", "sweep_png", "sweep_readout", "sweep_widget"]

_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
_GREY = "#7f7f7f"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def _curve(ax: Axes, xs: list[float], losses: tuple[float | None, ...], color: str, label: str,
           chosen: bool) -> None:
    pts = [(x, v) for x, v in zip(xs, losses, strict=False) if v is not None and math.isfinite(v)]
    if not pts:
        return
    ax.plot([x for x, _ in pts], [v for _, v in pts], color=color, alpha=0.22, linewidth=0.8)
    smooth = [v if v is not None else math.nan for v in smoothed([v for _, v in pts])]
    ax.plot([x for x, _ in pts], smooth, color=color, linewidth=2.6 if chosen else 1.4, label=label)


def sweep_figure(result: SweepResult, selected: int | None = None) -> Figure:
    """Loss against samples seen and against wall time (one line per size: each step faint, a
    smoothed line over it), and per batch size the loss reached, the validation figure and the
    noise scale with its band; ``selected`` (default the recommendation) drawn thicker."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    pick = result.recommended if selected is None else selected
    fig = Figure(figsize=(12.0, 3.6), dpi=100, layout="constrained")
    by_samples, by_time, by_size = fig.subplots(1, 3)
    for i, run in enumerate(result.runs):
        color = _COLORS[i % len(_COLORS)]
        label = f"b={run.batch_size}" + (" (out of memory)" if run.oom else "") + (" ◀" if run.batch_size == pick
                                                                                     else "")
        chosen = run.batch_size == pick
        _curve(by_samples, list(run.samples), run.losses, color, label, chosen)
        _curve(by_time, list(run.seconds), run.losses, color, label, chosen)
    by_samples.set_xlabel("samples seen")
    by_samples.set_ylabel("loss (the loop's own)")
    by_samples.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:,.0f}"))
    by_time.set_xlabel("wall time (s)")
    by_samples.set_title("loss vs samples", fontsize=10)
    by_time.set_title("loss vs time", fontsize=10)
    if any(r.losses for r in result.runs):
        by_samples.legend(fontsize=8, frameon=False)
    _size_panel(by_size, result, pick)
    for ax in (by_samples, by_time, by_size):
        ax.grid(alpha=0.25)
    return fig


def _size_panel(ax: Axes, result: SweepResult, pick: int | None) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:,.0f}"))
    ran = [(r, r.final_loss()) for r in result.runs if r.oom is None]
    pts = [(r.batch_size, v) for r, v in ran if v is not None]
    if pts:
        ax.plot([b for b, _ in pts], [v for _, v in pts], "o-", color=_GREY, label="loss reached")
    for r in result.runs:
        if r.oom is not None:
            ax.axvline(r.batch_size, color="#d62728", linestyle=":", linewidth=1)
            ax.annotate("OOM", (r.batch_size, 0.02), xycoords=("data", "axes fraction"), color="#d62728",
                        fontsize=8, ha="center")
    ax.set_ylabel("loss reached (smoothed)")
    vals = [(r.batch_size, r.val) for r in result.runs if r.val is not None]
    twin = None
    if vals:
        twin = ax.twinx()
        twin.plot([b for b, _ in vals], [v for _, v in vals], "s--", color="#9467bd",
                  label=result.val_name or "validation")
        twin.set_ylabel(f"{result.val_name or 'validation'} ({'higher' if result.val_higher_is_better else 'lower'}"
                        " is better)", color="#9467bd")
    ns = result.noise_scale
    if ns is not None:
        ax.axvspan(max(ns.low, 0.5), ns.high, color="#2ca02c", alpha=0.12)
        ax.axvline(ns.value, color="#2ca02c", linewidth=1.5)
        ax.annotate(f"noise scale ≈ {ns.value:,.0f}", (ns.value, 0.5), xycoords=("data", "axes fraction"),
                    color="#2ca02c", fontsize=8, ha="right", va="center", rotation=90)
    if pick is not None:
        got = dict(pts)
        if pick in got:
            ax.plot([pick], [got[pick]], "*", color="#d62728", markersize=14, label=f"recommended {pick}")
    sizes = [r.batch_size for r in result.runs]
    lo = min([*sizes, *([ns.low] if ns else [])])
    hi = max([*sizes, *([ns.high] if ns else [])])
    ax.set_xlim(max(lo / 1.6, 0.5), hi * 1.6)
    ax.set_xlabel("batch size")
    ax.set_title("per batch size", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    if twin is not None:
        more = twin.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if handles:
        ax.legend(handles, labels, fontsize=8, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)


def sweep_png(result: SweepResult, selected: int | None = None) -> bytes:
    """:func:`sweep_figure` as PNG bytes (the Agg canvas: the user's pyplot state is untouched)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(sweep_figure(result, selected))
    buf = io.BytesIO()
    canvas.print_png(buf)  # type: ignore[no-untyped-call]  # untyped in matplotlib's stubs
    return buf.getvalue()


def sweep_readout(result: SweepResult, batch_size: int) -> str:
    """One size's run in words (the widget's readout)."""
    from gpumagic.render.rows import run_line

    return f"batch {batch_size}: {run_line(result, result.run(batch_size))}"


def sweep_widget(result: SweepResult, *, png: bytes | None = None) -> Any:
    """An ``ipywidgets.VBox``: the figure (``.image``), a size chooser (``.size``) that redraws it
    with that size's lines thick, its run in words (``.readout``) and the result's table."""
    import ipywidgets as w

    pick = result.recommended if result.recommended is not None else (result.sizes[0] if result.sizes else None)
    image = w.Image(value=png if png is not None else sweep_png(result), format="png",
                    layout=w.Layout(max_width="100%", height="auto"))
    image.add_class("gpumagic-plot")
    size = w.Dropdown(options=list(result.sizes), value=pick, description="batch size",
                      style={"description_width": "initial"})
    readout = w.HTML(value=html.escape(sweep_readout(result, pick)) if pick is not None else "")

    def on_value(change: dict[str, Any]) -> None:
        b = int(change["new"])
        readout.value = html.escape(sweep_readout(result, b))
        image.value = sweep_png(result, b)

    size.observe(on_value, names="value")
    table = w.HTML(value=result._repr_html_())
    box = w.VBox([image, size, readout, table])
    box.add_class("gpumagic-sweep")
    box.image, box.size, box.readout, box.table, box.result = image, size, readout, table, result
    return box


def _sweep_bundle(result: SweepResult) -> dict[str, Any]:
    """The PNG, and the widget where ipywidgets is installed; nothing without matplotlib."""
    try:
        import matplotlib.figure  # noqa: F401  (only asking whether it is installed)
    except ImportError:
        return {}
    png = sweep_png(result)
    bundle: dict[str, Any] = {"image/png": base64.b64encode(png).decode("ascii")}
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return bundle
    widget = sweep_widget(result, png=png)
    bundle[WIDGET_MIME] = {"version_major": 2, "version_minor": 0, "model_id": widget.model_id}
    return bundle


register_renderer(SweepResult, _sweep_bundle)

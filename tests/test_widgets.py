"""The rendering layer: figures, PNGs, the search and memory widgets, the monitor panel.

Results are built directly from the frozen dataclasses with realistic numbers; widgets are real
ipywidgets objects (with ipywidgets' stand-in comm, as in any process without a kernel) driven by
setting their values, as a frontend would.
"""

from __future__ import annotations

import math
import struct
import subprocess
import sys
import textwrap
import time
import types
from typing import Any

import pytest

from gpumagic import _shell
from gpumagic.batchmath import lr_note
from gpumagic.monitor import DeviceSample, Monitor
from gpumagic.render import widgets
from gpumagic.report import BatchSearchResult, Fit, MemoryReport, StepRecord, Trial
from gpumagic.units import format_bytes

KiB, MiB, GiB = 2**10, 2**20, 2**30
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WIDGET = "application/vnd.jupyter.widget-view+json"

# A 24 GiB GPU; 3.2 GiB of model and optimizer state plus 36 MiB per sample: 576 fits, 608 does not.
CAP = 24 * GiB
FIT = Fit(intercept_bytes=3.2 * GiB, bytes_per_sample=36 * MiB, r2=0.9997, points=5)


def _trial(b: int, rate: float | None = None) -> Trial:
    peak = FIT.predict(b)
    if peak > CAP:
        return Trial(b, None, True, None, 0.8, 0)
    return Trial(b, round(peak * (1 + 0.002 * (b % 3 - 1))), False, rate, 0.6, 3)


def search_result(**changes: Any) -> BatchSearchResult:
    """A search as %find_batch --effective 1024 would leave it (Adam, sqrt rule)."""
    rates = {8: 760.0, 64: 2870.0, 256: 4130.0, 512: 4610.0}
    trials = tuple(_trial(b, rates.get(b)) for b in (8, 64, 256, 512, 1024, 768, 640, 576, 608))
    largest = max(t.batch_size for t in trials if not t.oom)
    fields: dict[str, Any] = {
        "trials": trials,
        "max_batch_size": largest,
        "recommended_batch_size": 512,
        "accumulation_steps": 2,
        "reason": "micro-batch 512 × 2 accumulation steps = 1024 for the effective batch 1024",
        "fit": FIT,
        "capacity_bytes": CAP,
        "predicted_peak_bytes": FIT.predict(512),
        "effective_batch_size": 1024,
        "lr_note": lr_note(512, 1024, "AdamW"),
        "lr_rule": "sqrt",
        "device": "cuda:0",
    }
    fields.update(changes)
    return BatchSearchResult(**fields)


def memory_report(n: int = 300, *, losses: bool = True, **changes: Any) -> MemoryReport:
    steps = tuple(
        StepRecord(i, 2.3 * math.exp(-i / 80) + 0.1 if losses else None, 2 * GiB + (i % 7) * 16 * MiB, 0.05, 64)
        for i in range(n)
    )
    fields: dict[str, Any] = {
        "backend": "cuda", "device": "cuda:0", "baseline_bytes": int(1.5 * GiB), "peak_bytes": 2 * GiB + 96 * MiB,
        "peak_delta_bytes": 2 * GiB + 96 * MiB - int(1.5 * GiB), "end_bytes": int(1.6 * GiB),
        "reserved_peak_bytes": 3 * GiB, "capacity_bytes": CAP, "wall_seconds": 15.2, "steps": steps,
        "total_steps": n,
    }
    fields.update(changes)
    return MemoryReport(**fields)


def png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == PNG_SIGNATURE
    assert png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    return width, height


def xy(line: Any) -> tuple[list[float], list[float]]:
    """A drawn line's data as plain floats."""
    import numpy as np

    return np.asarray(line.get_xdata(), dtype=float).tolist(), np.asarray(line.get_ydata(), dtype=float).tolist()


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


# ---------------------------------------------------------------------------------------------
# the mimebundle


def test_search_mimebundle_has_widget_png_text_and_html() -> None:
    bundle = search_result()._repr_mimebundle_()
    assert set(bundle) == {"text/plain", "text/html", "image/png", WIDGET}
    assert bundle[WIDGET]["model_id"]
    assert bundle[WIDGET]["version_major"] == 2


def test_memory_mimebundle_has_widget_png_text_and_html() -> None:
    bundle = memory_report()._repr_mimebundle_()
    assert set(bundle) == {"text/plain", "text/html", "image/png", WIDGET}


def test_bundle_png_decodes_to_the_figure_size_times_dpi() -> None:
    import base64

    result = search_result()
    png = base64.b64decode(widgets.rich_bundle(result, "search")["image/png"])
    fig = widgets.search_figure(result)
    w, h = fig.get_size_inches() * fig.dpi
    assert png_size(png) == (round(w), round(h))
    assert len(png) > 5000


def test_memory_png_decodes_to_the_figure_size_times_dpi() -> None:
    report = memory_report()
    fig = widgets.memory_figure(report)
    png = widgets.figure_png(fig)
    w, h = fig.get_size_inches() * fig.dpi
    assert png_size(png) == (round(w), round(h))
    assert len(png) > 5000


def test_rich_bundle_rejects_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="kind must be 'memory' or 'search', got 'table'"):
        widgets.rich_bundle(search_result(), "table")


def test_mimebundle_in_a_plain_process_has_a_widget_and_does_not_import_pyplot() -> None:
    out = run_python(f"""
        import base64, sys, gpumagic
        from gpumagic.report import BatchSearchResult, Fit, Trial
        fit = Fit({FIT.intercept_bytes}, {FIT.bytes_per_sample}, 0.999, 3)
        trials = tuple(Trial(b, fit.predict(b), False, None, 0.5, 3) for b in (8, 64, 512))
        res = BatchSearchResult(trials, 512, 480, 1, "why", fit, {CAP}, fit.predict(480))
        bundle = res._repr_mimebundle_()
        png = base64.b64decode(bundle["image/png"])
        print(sorted(bundle), png[:8] == b"\\x89PNG\\r\\n\\x1a\\n", len(png) > 5000,
              "matplotlib.pyplot" in sys.modules)
    """)
    assert out == (f"['{WIDGET}', 'image/png', 'text/html', 'text/plain'] True True False")


def test_importing_gpumagic_imports_neither_ipywidgets_nor_matplotlib() -> None:
    out = run_python("""
        import sys, gpumagic
        print([m for m in ("ipywidgets", "matplotlib", "gpumagic.render.widgets", "gpumagic.monitor") if m in sys.modules])
    """)
    assert out == "[]"


def test_without_ipywidgets_the_bundle_keeps_png_text_and_html() -> None:
    out = run_python(f"""
        import sys
        sys.modules["ipywidgets"] = None  # as if not installed
        from gpumagic.report import BatchSearchResult, Fit, Trial
        fit = Fit({FIT.intercept_bytes}, {FIT.bytes_per_sample}, 0.999, 3)
        trials = tuple(Trial(b, fit.predict(b), False, None, 0.5, 3) for b in (8, 64, 512))
        res = BatchSearchResult(trials, 512, 480, 1, "why", fit, {CAP}, fit.predict(480))
        print(sorted(res._repr_mimebundle_()))
    """)
    assert out == "['image/png', 'text/html', 'text/plain']"


def test_without_matplotlib_the_bundle_keeps_text_and_html() -> None:
    out = run_python("""
        import sys
        sys.modules["matplotlib"] = None  # as if not installed
        from gpumagic.report import MemoryReport
        rep = MemoryReport("cpu", "cpu", 100, 300, 200, 120, None, None, 0.1)
        print(sorted(rep._repr_mimebundle_()))
    """)
    assert out == "['text/html', 'text/plain']"


# ---------------------------------------------------------------------------------------------
# the search widget


def test_search_widget_slider_starts_at_the_recommendation() -> None:
    assert widgets.search_widget(search_result()).slider.value == 512


def test_search_widget_slider_max_is_the_largest_size_that_ran() -> None:
    result = search_result()
    slider = widgets.search_widget(result).slider
    assert (slider.min, slider.max) == (1, result.max_batch_size) == (1, 576)


def test_search_widget_slider_max_stops_where_the_fit_exceeds_the_capacity() -> None:
    # The fit is pessimistic here: it puts 576 over the capacity although 576 ran.
    steep = Fit(FIT.intercept_bytes, 38 * MiB, 0.999, 5)
    slider = widgets.search_widget(search_result(fit=steep)).slider
    assert slider.max == steep.largest_under(CAP) == 560
    assert steep.predict(slider.max) <= CAP < steep.predict(slider.max + 1)


def test_moving_the_slider_shows_the_fits_peak_and_the_headroom() -> None:
    panel = widgets.search_widget(search_result())
    panel.slider.value = 300
    text = panel.readout.value
    assert f"predicted peak {format_bytes(FIT.predict(300))}" in text
    assert f"headroom {format_bytes(CAP - FIT.predict(300))} of {format_bytes(CAP)} capacity" in text


def test_moving_the_slider_shows_accumulation_steps_and_the_lr_change() -> None:
    panel = widgets.search_widget(search_result())
    panel.slider.value = 300  # ceil(1024 / 300) = 4 steps, 1200 samples: the effective batch grows
    text = panel.readout.value
    assert "accumulation 4 steps × 300 = 1200 (effective batch 1024)" in text
    assert f"learning rate: {lr_note(1024, 1200, 'adam')}" in text
    assert "square-root" in text


def test_readout_says_learning_rate_unchanged_when_the_effective_batch_is_kept() -> None:
    panel = widgets.search_widget(search_result())
    panel.slider.value = 256
    assert "accumulation 4 steps × 256 = 1024" in panel.readout.value
    assert "learning rate unchanged (the effective batch stays 1024)" in panel.readout.value


def test_readout_interpolates_throughput_between_measured_sizes() -> None:
    lines = widgets.search_readout(search_result(), 384)  # halfway between 256 and 512
    assert "throughput 4,370 samples/s (interpolated)" in lines


def test_readout_reports_measured_throughput_and_peak_at_a_trial_size() -> None:
    result = search_result()
    lines = widgets.search_readout(result, 512)
    measured = next(t.peak_bytes for t in result.trials if t.batch_size == 512)
    assert lines[0] == "batch size 512 (recommended)"
    assert lines[1] == f"predicted peak {format_bytes(FIT.predict(512))} (measured {format_bytes(measured)})"
    assert "throughput 4,610 samples/s (measured)" in lines


def test_readout_flags_a_size_inside_the_safety_margin() -> None:
    lines = widgets.search_readout(search_result(), 570)
    assert any(line.endswith("(inside the 5% safety margin)") for line in lines)


def test_readout_without_effective_batch_has_no_accumulation_line() -> None:
    lines = widgets.search_readout(search_result(effective_batch_size=None, accumulation_steps=1), 300)
    assert not any("accumulation" in line or "learning rate" in line for line in lines)


def test_moving_the_slider_redraws_the_plot_with_a_marker() -> None:
    panel = widgets.search_widget(search_result())
    before = bytes(panel.image.value)
    panel.slider.value = 200
    after = bytes(panel.image.value)
    assert after != before
    assert png_size(after) == png_size(before)


def test_search_widget_handles_carry_css_classes() -> None:
    panel = widgets.search_widget(search_result())
    assert "gpumagic-slider" in panel.slider._dom_classes
    assert "gpumagic-readout" in panel.readout._dom_classes
    assert "gpumagic-plot" in panel.image._dom_classes
    assert "gpumagic-search" in panel._dom_classes
    assert list(panel.children) == [panel.image, panel.slider, panel.readout]


def test_search_widget_disables_the_slider_when_nothing_ran() -> None:
    trials = (Trial(2, None, True, None, 0.3, 0), Trial(1, None, True, None, 0.3, 0))
    result = BatchSearchResult(trials, None, None, 1, "even 1 ran out of memory", None, CAP, None)
    panel = widgets.search_widget(result)
    assert panel.slider.disabled
    assert "nothing to choose from" in panel.readout.value


def test_search_figure_of_a_search_without_trials_renders() -> None:
    result = BatchSearchResult((), None, None, 1, "max_trials reached", None, None, None)
    png = widgets.figure_png(widgets.search_figure(result))
    assert png[:8] == PNG_SIGNATURE


def test_readout_without_fit_interpolates_measured_peaks() -> None:
    trials = (Trial(64, 2 * GiB, False, None, 0.5, 3), Trial(128, 3 * GiB, False, None, 0.5, 3))
    result = BatchSearchResult(trials, 128, 128, 1, "not affine", None, 4 * GiB, 3 * GiB)
    assert widgets.search_readout(result, 96)[1] == "predicted peak 2.50 GiB (interpolated)"
    assert widgets.search_readout(result, 32)[1] == "predicted peak unknown (no fit, outside the measured sizes 64–128)"


def test_search_figure_draws_out_of_memory_trials_at_the_capacity() -> None:
    fig = widgets.search_figure(search_result())
    ax = fig.axes[0]
    oom = next(line for line in ax.get_lines() if line.get_label() == "trial: out of memory")
    scale = GiB  # the axis is in GiB for a 24 GiB device
    xs, ys = xy(oom)
    assert xs == [1024, 768, 640, 608]
    assert set(ys) == {CAP / scale}


def test_search_figure_has_a_throughput_panel_only_when_trials_measured_it() -> None:
    with_rates = widgets.search_figure(search_result())
    plain = search_result(trials=tuple(_trial(t.batch_size) for t in search_result().trials))
    assert len(with_rates.axes) == 2
    assert len(widgets.search_figure(plain).axes) == 1


# ---------------------------------------------------------------------------------------------
# the per-step view


def test_envelope_keeps_the_maximum_and_minimum_of_every_bucket() -> None:
    values = [float((i * 7919) % 1000) for i in range(50_000)]
    values[31_337] = 1e9  # a single-step spike
    buckets = 1000
    kept = set(widgets.envelope(values, buckets))
    size = len(values) // buckets
    for b in range(buckets):
        chunk = values[b * size:(b + 1) * size]
        assert b * size + chunk.index(max(chunk)) in kept
        assert b * size + chunk.index(min(chunk)) in kept
    assert 31_337 in kept
    assert len(kept) <= 2 * buckets + 2


def test_envelope_keeps_a_short_series_whole() -> None:
    assert widgets.envelope([3.0, 1.0, 2.0], 10) == [0, 1, 2]


def test_envelope_rejects_zero_buckets() -> None:
    with pytest.raises(ValueError, match="buckets must be an int >= 1, got 0"):
        widgets.envelope([1.0, 2.0], 0)


def test_memory_figure_with_50k_steps_renders_quickly_and_keeps_the_spike() -> None:
    steps = tuple(StepRecord(i, 1 / (1 + i / 1000), GiB + (i % 100) * MiB + (3 * GiB if i == 31_337 else 0),
                             0.01, 32) for i in range(50_000))
    report = memory_report(steps=steps, total_steps=50_000, peak_bytes=4 * GiB + 99 * MiB)
    t0 = time.perf_counter()
    fig = widgets.memory_figure(report)
    png = widgets.figure_png(fig)
    assert time.perf_counter() - t0 < 10
    assert len(png) > 5000
    drawn = next(line for line in fig.axes[1].get_lines() if line.get_label() == "peak in the step")
    xs, ys = xy(drawn)
    assert len(xs) <= widgets.MAX_DRAWN_POINTS + 2
    assert 31_337 in xs
    assert max(ys) == pytest.approx((4 * GiB + 37 * MiB) / GiB)


def test_memory_figure_puts_loss_above_memory_on_a_shared_step_axis() -> None:
    fig = widgets.memory_figure(memory_report())
    loss_ax, mem_ax = fig.axes
    assert loss_ax.get_ylabel() == "loss"
    assert mem_ax.get_ylabel() == "memory"
    assert loss_ax.get_shared_x_axes().joined(loss_ax, mem_ax)


def test_memory_figure_marks_baseline_peak_and_capacity() -> None:
    fig = widgets.memory_figure(memory_report(capacity_bytes=3 * GiB))
    labels = {line.get_label() for line in fig.axes[1].get_lines()}
    assert {"baseline 1.50 GiB", "peak 2.09 GiB", "capacity 3.00 GiB"} <= labels


def test_memory_figure_notes_a_far_away_capacity_instead_of_flattening_the_steps() -> None:
    fig = widgets.memory_figure(memory_report(capacity_bytes=CAP))  # 24 GiB against a 2.09 GiB peak
    ax = fig.axes[1]
    assert "capacity 24.00 GiB (off the scale)" in [t.get_text() for t in ax.texts]
    assert not any(str(line.get_label()).startswith("capacity") for line in ax.get_lines())


def test_memory_figure_names_the_budget_when_one_was_set() -> None:
    fig = widgets.memory_figure(memory_report(budget_bytes=3 * GiB))
    assert "budget 3.00 GiB" in {line.get_label() for line in fig.axes[1].get_lines()}


def test_memory_figure_without_losses_has_only_the_memory_panel() -> None:
    fig = widgets.memory_figure(memory_report(losses=False))
    assert [ax.get_ylabel() for ax in fig.axes] == ["memory"]


def test_memory_figure_without_steps_draws_baseline_peak_and_end_bars() -> None:
    report = memory_report(steps=(), total_steps=0)
    fig = widgets.memory_figure(report)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["end", "peak", "baseline"]
    assert "no training steps seen" in ax.get_title(loc="left")


def test_memory_figure_title_says_a_report_is_partial() -> None:
    report = memory_report(error="OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    fig = widgets.memory_figure(report)
    assert fig.axes[0].get_title(loc="left").endswith("partial: stopped by OutOfMemoryError")


def test_memory_widget_shows_the_plot_and_the_report_table() -> None:
    report = memory_report()
    panel = widgets.memory_widget(report)
    assert panel.summary.value == report._repr_html_()
    assert "gpumagic-plot" in panel.image._dom_classes
    assert bytes(panel.image.value[:8]) == PNG_SIGNATURE


# ---------------------------------------------------------------------------------------------
# the monitor panel


class FakeNVML:
    """Two GPUs as NVML reports them; only NVML itself cannot exist on this machine."""

    name = "fake-nvml"

    def __init__(self) -> None:
        self.used = 10 * GiB

    def __call__(self) -> list[DeviceSample]:
        self.used += GiB
        return [
            DeviceSample("cuda:0", "NVIDIA H100 80GB HBM3", self.used, 80 * GiB, 57.0, self.used - GiB, GiB),
            DeviceSample("cuda:1", "NVIDIA H100 80GB HBM3", 512 * MiB, 80 * GiB, 0.0, 0, 512 * MiB),
        ]


def test_sparkline_scales_to_the_top() -> None:
    assert widgets.sparkline([0, 1, 2, 4], top=4) == "▁▃▅█"


def test_sparkline_keeps_the_maximum_of_each_bucket() -> None:
    values: list[float | None] = [0.0] * 100
    values[42] = 10.0
    line = widgets.sparkline(values, width=10)
    assert line == "▁▁▁▁█▁▁▁▁▁"


def test_sparkline_leaves_unknown_values_blank() -> None:
    assert widgets.sparkline([None, 2.0], top=2.0) == " █"


def test_monitor_widget_shows_each_device_with_its_numbers() -> None:
    mon = Monitor(interval=1.0, source=FakeNVML())
    mon.sample_now()
    panel = widgets.monitor_widget(mon)
    assert list(panel.rows) == ["cuda:0", "cuda:1"]
    row = panel.rows["cuda:0"]
    assert row.bar.value == pytest.approx(100 * 11 / 80)
    assert row.text.value == ("11.00 GiB of 80.00 GiB in use · utilisation 57% · "
                              "this process 10.00 GiB · others 1.00 GiB")
    assert "gpumagic-monitor" in panel._dom_classes


def test_monitor_widget_follows_samples_from_the_monitor_thread() -> None:
    mon = Monitor(interval=0.1, source=FakeNVML())
    panel = widgets.monitor_widget(mon)
    mon.start()
    try:
        deadline = time.monotonic() + 10
        while len(mon.samples()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        mon.stop()
    assert len(mon.samples()) >= 3
    last = mon.samples()[-1].devices[0]
    assert panel.rows["cuda:0"].bar.value == pytest.approx(100 * (last.used_bytes or 0) / 80 / GiB)
    assert panel.status.value.startswith("stopped")
    assert panel.stop_button.disabled


def test_monitor_widget_stop_button_stops_the_monitor() -> None:
    mon = Monitor(interval=0.1, source=FakeNVML()).start()
    panel = widgets.monitor_widget(mon)
    panel.stop_button.click()
    assert not mon.is_running


def test_closed_monitor_panel_is_no_longer_fed() -> None:
    mon = Monitor(interval=1.0, source=FakeNVML())
    panel = widgets.monitor_widget(mon)
    panel.close()
    mon._notify(mon.sample_now())
    assert mon._callbacks == []


def test_show_monitor_inline_displays_the_panel() -> None:
    shown: list[Any] = []
    mon = Monitor(interval=1.0, source=FakeNVML())
    panel = _shell.show_monitor(mon, sidebar=False, display=shown.append)
    assert shown == [panel]


def test_show_monitor_sidebar_without_sidecar_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "sidecar", None)
    monkeypatch.delenv("VSCODE_PID", raising=False)
    shown: list[Any] = []
    panel = _shell.show_monitor(Monitor(interval=1.0, source=FakeNVML()), sidebar=True, display=shown.append)
    assert "pip install gpumagic[sidecar]" in capsys.readouterr().out
    assert shown == [panel]


def test_show_monitor_sidebar_in_vscode_falls_back_inline(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VSCODE_PID", "4242")
    shown: list[Any] = []
    panel = _shell.show_monitor(Monitor(interval=1.0, source=FakeNVML()), sidebar=True, display=shown.append)
    assert "VS Code" in capsys.readouterr().out
    assert shown == [panel]


def test_show_monitor_sidebar_in_colab_falls_back_inline(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.delenv("VSCODE_PID", raising=False)
    shown: list[Any] = []
    _shell.show_monitor(Monitor(interval=1.0, source=FakeNVML()), sidebar=True, display=shown.append)
    assert "Google Colab" in capsys.readouterr().out


def test_show_monitor_sidebar_opens_a_sidecar(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("sidecar")
    monkeypatch.delenv("VSCODE_PID", raising=False)
    shown: list[Any] = []
    panel = _shell.show_monitor(Monitor(interval=1.0, source=FakeNVML()), sidebar=True, display=shown.append)
    assert type(panel.sidecar).__name__ == "Sidecar"
    assert panel.sidecar.title == "gpumagic monitor " + str(panel.monitor.id)
    assert shown == [panel]


def test_readout_uses_square_root_scaling_for_adam_even_when_the_effective_batch_is_kept():
    from gpumagic.render.widgets import search_readout
    from gpumagic.report import BatchSearchResult, Fit, Trial

    res = BatchSearchResult(
        trials=(Trial(2, 2**20, False, None, 0.1, 3), Trial(512, 513 * 2**20, False, None, 0.1, 3)),
        max_batch_size=512, recommended_batch_size=256, accumulation_steps=4, reason="test",
        fit=Fit(2**20, 2**20, 1.0, 2), capacity_bytes=600 * 2**20, predicted_peak_bytes=257 * 2**20,
        effective_batch_size=1024, lr_note="keep the learning rate: the effective batch stays 1024",
        lr_rule="sqrt",
    )
    text = " ".join(search_readout(res, 300))
    assert "square-root" in text


def test_the_advice_button_runs_the_measuring_command_in_place():
    from gpumagic.oom import Advice, Suggestion
    from gpumagic.render.widgets import advice_widget

    code = "%find_batch --var batch_size -d cpu --budget 96MiB"
    advice = Advice("Out of memory", (Suggestion("Measure the batch size that fits", "", "measure", code=code),))
    ran = []
    panel = advice_widget(advice, ran.append)
    panel.button.click()
    assert ran == [code]
    assert panel.button.disabled


def test_advice_without_a_measuring_command_has_no_button():
    from gpumagic.oom import Advice, Suggestion
    from gpumagic.render.widgets import advice_widget

    advice = Advice("Out of memory", (Suggestion("Checkpoint activations", "", "checkpointing"),))
    assert advice_widget(advice, print) is None

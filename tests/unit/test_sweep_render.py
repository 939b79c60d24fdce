"""The sweep's views: PNG and widget from the registered renderer, text in a terminal, table in HTML."""

from __future__ import annotations

import base64

import pytest

from gpumagic.noise import NoiseScale
from gpumagic.sweep_results import SweepResult, SweepRun


def result(val: bool = False) -> SweepResult:
    def run(b: int, base: float, oom: str | None = None) -> SweepRun:
        n = 0 if oom else 256 // b
        return SweepRun(b, (0.1 * b / 32,), tuple(b * (i + 1) for i in range(n)),
                        tuple(0.01 * (i + 1) for i in range(n)), tuple(base - 0.001 * i for i in range(n)),
                        (1.0 / b) if val and not oom else None,
                        None if oom else 1000 * b, None, oom)

    runs = (run(8, 1.0), run(32, 1.1), run(4096, 0, oom="OutOfMemoryError: simulated"))
    noise = NoiseScale(60.0, 40.0, 90.0, (8, 32), (60, 20))
    return SweepResult(runs, 8, "batch 8 reached the lowest loss", "linear", "SGD", 32, noise, None,
                       val_name="accuracy" if val else None, val_higher_is_better=val)


def test_the_bundle_has_a_png_and_a_widget() -> None:
    bundle = result()._repr_mimebundle_()
    assert base64.b64decode(bundle["image/png"]).startswith(b"\x89PNG")
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert "b=8" in bundle["text/html"]


def test_the_widget_redraws_for_the_chosen_size() -> None:
    pytest.importorskip("ipywidgets")
    from gpumagic.render.sweep_widgets import sweep_widget

    panel = sweep_widget(result(val=True))
    first = panel.image.value
    assert panel.size.value == 8
    panel.size.value = 32
    assert panel.readout.value.startswith("batch 32: loss")
    assert "accuracy" in panel.readout.value
    assert panel.image.value != first


def test_the_figure_draws_the_noise_scale_and_the_oom_size() -> None:
    from gpumagic.render.sweep_widgets import sweep_figure

    fig = sweep_figure(result(val=True))
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "noise scale ≈ 60" in texts
    assert "OOM" in texts


def test_the_text_names_every_size_and_marks_the_pick() -> None:
    text = result().to_text()
    assert "b=8 ◀" in text
    assert "b=4096" in text
    assert "out of memory" in text
    assert "≈ 60 (10–90%: 40–90)" in text


def test_a_terminal_shell_prints_the_text_table(ip, clean_ns) -> None:
    from IPython.utils.capture import capture_output

    formatter = ip.display_formatter
    saved = list(formatter.active_types)
    formatter.active_types = ["text/plain"]
    try:
        ip.push({"res": result()})
        with capture_output() as out:
            ip.run_cell("res").raise_error()
    finally:
        formatter.active_types = saved
    assert "batch_sweep: recommended 8 of 8, 32, 4096" in out.stdout  # the headline, as %find_batch prints its own
    assert "b=8 ◀" in out.stdout

"""Plain-text rendering and text progress: widths, colour rules, the pick marked, lines per trial."""

from __future__ import annotations

import io
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gpumagic
from gpumagic import views
from gpumagic.render.progress import BarProgress, LineProgress, text_progress
from gpumagic.render.text import bold, memory_report_text, search_text, use_color, wrap_block
from gpumagic.report import BatchSearchResult, DeviceStatus, Trial

ESC = "\x1b"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def report() -> gpumagic.MemoryReport:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    with gpumagic.track(device="cpu", budget="4MiB") as t:
        for _ in range(4):
            loss = F.cross_entropy(model(torch.randn(32, 64)), torch.randint(0, 10, (32,)))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return t.report


def _search(recommended: int) -> BatchSearchResult:
    trials = (Trial(2, 1000, False, 50.0, 0.2, 3), Trial(64, None, True, None, 0.1, 1),
              Trial(32, 3000, False, 900.0, 0.3, 3))
    return BatchSearchResult(trials=trials, max_batch_size=32, recommended_batch_size=recommended, accumulation_steps=1,
                             reason="32 is the largest that ran; 64 ran out of memory", fit=None,
                             capacity_bytes=4000, predicted_peak_bytes=3000)


@pytest.mark.parametrize("width", [24, 40, 80, 120])
def test_the_memory_report_fits_the_width(report: gpumagic.MemoryReport, width: int) -> None:
    lines = memory_report_text(report, width).splitlines()

    assert max(len(line) for line in lines) <= width


def test_the_memory_report_has_a_headline_breakdown_and_step_summary(report: gpumagic.MemoryReport) -> None:
    text = memory_report_text(report, 100)

    assert text.startswith("gpumem: peak ")
    for label in ("at the peak", "steps", "loss", "slowest", "step peak"):
        assert re.search(rf"^  {label} +\S", text, re.MULTILINE), label
    assert ESC not in text


def test_the_terminal_text_shows_every_html_row_its_headline_does_not_state(report: gpumagic.MemoryReport) -> None:
    from html import unescape

    text = memory_report_text(report, 1000)
    html = unescape(report._repr_html_())
    labels = re.findall(r"<th[^>]*>([^<]+)</th><td", html)

    assert {"device", "baseline", "peak", "end", "at the peak", "steps", "loss", "wall time"} <= set(labels)
    shown = {label for label in labels if re.search(rf"^  {re.escape(label)} +\S", text, re.MULTILINE)}
    assert set(labels) - shown == {"device", "baseline", "peak", "wall time"}  # the headline states these
    assert all(re.search(rf"^  {re.escape(label)} ", report.to_text(), re.MULTILINE) for label in labels)


def test_a_number_and_its_unit_stay_on_one_line(report: gpumagic.MemoryReport) -> None:
    lines = memory_report_text(report, 30).splitlines()

    assert not [line for line in lines if re.match(r"^\s*(KiB|MiB|ms|s)\b", line)]


def test_the_trial_that_is_the_pick_is_marked() -> None:
    text = search_text(_search(32), 80)

    (marked,) = [line for line in text.splitlines() if "← pick" in line]
    assert marked.split()[:2] == ["3", "32"]
    assert "out of memory" in text


def test_a_pick_that_did_not_run_is_marked_as_predicted() -> None:
    text = search_text(_search(20), 80)

    assert re.search(r"^\s+20\s+≈ .*← pick \(predicted\)$", text, re.MULTILINE)


@pytest.mark.parametrize("width", [20, 30, 50])
def test_the_trials_table_drops_columns_before_overflowing(width: int) -> None:
    lines = search_text(_search(32), width).splitlines()

    assert max(len(line) for line in lines) <= width


def test_wrap_block_keeps_code_lines_whole() -> None:
    code = "     with torch.autocast(device_type='cpu', dtype=torch.bfloat16):  # a long comment here"
    text = "1. Use mixed precision: " + "word " * 30 + "\n" + code

    lines = wrap_block(text, 40, code_indent=5).splitlines()

    assert code in lines
    assert all(len(line) <= 40 for line in lines if line != code)
    assert lines[1].startswith("   ")  # continuation under the item's text


def test_colour_only_on_a_tty_without_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")

    assert use_color(_Tty())
    assert not use_color(io.StringIO())
    assert bold("x", io.StringIO()) == "x"
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_color(_Tty())


def test_a_dumb_terminal_gets_no_colour(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "dumb")

    assert not use_color(_Tty())


def test_the_repr_stays_one_line_and_pretty_is_the_table(report: gpumagic.MemoryReport) -> None:
    from IPython.lib.pretty import pretty

    assert "\n" not in repr(report)
    assert pretty(report).startswith("gpumem: peak ")
    assert len(pretty(report).splitlines()) > 3


@pytest.mark.parametrize("result", [
    _search(32),
    DeviceStatus("cpu", "cpu", 10, None, 100, 90),
], ids=["search", "device-status"])
def test_ipython_shows_every_result_through_its_pretty_view(result: object) -> None:
    # _repr_pretty_ must sit in the class's own __dict__: IPython prefers a class's __repr__ to an inherited one
    from IPython.lib.pretty import pretty

    assert pretty(result) == views.view(result, "pretty") != repr(result)


# --- progress ---------------------------------------------------------------------------------------


def test_line_progress_writes_one_line_per_trial() -> None:
    out = io.StringIO()
    progress = LineProgress(out)
    for i, t in enumerate(_search(32).trials):
        progress(t, i)
    progress.close()

    assert out.getvalue().splitlines() == [
        "find_batch: trial 1: batch 2: peak 1000 B, 50 samples/s (0.20 s)",
        "find_batch: trial 2: batch 64: out of memory (0.10 s)",
        "find_batch: trial 3: batch 32: peak 2.93 KiB, 900 samples/s (0.30 s)",
    ]


def test_text_progress_is_a_bar_on_a_tty_and_lines_elsewhere() -> None:
    assert isinstance(text_progress(io.StringIO()), LineProgress)
    bar = text_progress(_Tty())
    assert isinstance(bar, BarProgress)
    bar.close()


def test_the_bar_says_trials_with_a_space_and_is_erased_on_close() -> None:
    out = _Tty()
    bar = BarProgress(out)
    bar(_search(32).trials[0], 0)
    bar.close()

    frames = out.getvalue().split("\r")
    assert "0trial" not in out.getvalue()
    assert any(f.startswith("find_batch trials: 1, last batch 2: peak 1000 B") for f in frames)
    assert frames[-1].strip() == ""
    assert "\n" not in out.getvalue()


def test_find_batch_api_logs_its_trials_to_a_non_tty_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    model = nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), 0.1)

    def trial(b: int) -> None:
        for _ in range(3):
            loss = model(torch.randn(b, 8)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()

    res = gpumagic.find_batch(trial, device="cpu", budget="64KiB", max_size=64)
    err = capsys.readouterr().err

    assert re.findall(r"^find_batch: trial (\d+):", err, re.MULTILINE) == [str(i + 1) for i in range(len(res.trials))]
    assert "\r" not in err


# --- in a shell ---------------------------------------------------------------------------------------


def test_a_text_only_shell_shows_the_table_and_builds_no_widget(ip, report: gpumagic.MemoryReport) -> None:
    formatter = ip.display_formatter
    saved = list(formatter.active_types)
    formatter.active_types = ["text/plain"]  # what terminal IPython sets
    try:
        data, _ = formatter.format(report)
    finally:
        formatter.active_types = saved

    assert list(data) == ["text/plain"]
    assert data["text/plain"].startswith("gpumem: peak ")


def test_a_notebook_shell_still_gets_the_widget_and_html(ip, report: gpumagic.MemoryReport) -> None:
    data, _ = ip.display_formatter.format(report)

    assert "text/html" in data
    assert "image/png" in data


def test_unload_removes_the_text_only_printers(ip) -> None:
    from gpumagic.report import BatchSearchResult, MemoryReport

    bundles = ip.display_formatter.mimebundle_formatter
    ip.run_line_magic("unload_ext", "gpumagic")
    try:
        for t in (MemoryReport, BatchSearchResult):
            with pytest.raises(KeyError):
                bundles.lookup_by_type(t)
    finally:
        ip.run_line_magic("load_ext", "gpumagic")
    assert bundles.lookup_by_type(MemoryReport) is not None

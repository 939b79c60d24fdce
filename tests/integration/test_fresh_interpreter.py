"""What a fresh interpreter shows: imports kept light, a broken install still renders, compiled
models measured. Each test starts a new Python process (or, for ``own_process``, a new pytest)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from gpumagic.report import Fit

KiB, MiB, GiB = 2**10, 2**20, 2**30
WIDGET = "application/vnd.jupyter.widget-view+json"
CAP = 24 * GiB
FIT = Fit(intercept_bytes=3.2 * GiB, bytes_per_sample=36 * MiB, r2=0.9997, points=5)


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def run(ip, source):
    return ip.run_cell(source, store_history=True)


# from test_monitor.py
def test_monitoring_imports_neither_torch_nor_ipywidgets() -> None:
    code = textwrap.dedent("""
        import sys
        from gpumagic.monitor import Monitor
        mon = Monitor(interval=0.1).start()
        while not mon.samples():
            pass
        mon.stop()
        print([m for m in ("torch", "ipywidgets", "matplotlib") if m in sys.modules])
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# from test_public_api.py
def test_core_modules_never_import_ipython():
    code = (
        "import sys, gpumagic, gpumagic.tracking, gpumagic.batch, gpumagic.search, gpumagic.oom, gpumagic.devices,"
        " gpumagic.distributed, gpumagic.sweep, gpumagic.noise, gpumagic.sweep_results;"
        "print(sorted(m for m in ('IPython', 'ipywidgets', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# from test_render.py
def test_include_applies_when_the_widgets_module_cannot_be_imported() -> None:
    code = textwrap.dedent("""
        import sys
        sys.modules["gpumagic.render.widgets"] = None  # a broken install
        from gpumagic.report import MemoryReport
        rep = MemoryReport("cpu", "cpu", 100, 300, 200, 120, None, None, 0.1)
        print(sorted(rep._repr_mimebundle_(include={"text/plain"})), sorted(rep._repr_mimebundle_()))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['text/plain'] ['text/html', 'text/plain']"


# from test_tracking.py
def test_import_is_light_and_does_not_touch_cuda():
    import subprocess
    import sys

    code = (
        "import sys, gpumagic;"
        "bad = [m for m in ('IPython', 'ipywidgets', 'matplotlib', 'torch') if m in sys.modules];"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# from test_widgets.py
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


# from test_widgets.py
def test_importing_gpumagic_imports_neither_ipywidgets_nor_matplotlib() -> None:
    out = run_python("""
        import sys, gpumagic
        heavy = ("ipywidgets", "matplotlib", "gpumagic.render.widgets", "gpumagic.monitor")
        print([m for m in heavy if m in sys.modules])
    """)
    assert out == "[]"


# from test_widgets.py
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


# from test_widgets.py
def test_without_matplotlib_the_bundle_keeps_text_and_html() -> None:
    out = run_python("""
        import sys
        sys.modules["matplotlib"] = None  # as if not installed
        from gpumagic.report import MemoryReport
        rep = MemoryReport("cpu", "cpu", 100, 300, 200, 120, None, None, 0.1)
        print(sorted(rep._repr_mimebundle_()))
    """)
    assert out == "['text/html', 'text/plain']"


# from test_magics.py
@pytest.mark.own_process
def test_compiled_model_is_measured(ip, clean_ns):
    r = run(ip, """
%%gpumem -o -q -d cpu
torch.manual_seed(0)
m = torch.compile(nn.Linear(16, 4), backend="aot_eager")
o = torch.optim.SGD(m.parameters(), 0.1)
truth = []
for _ in range(3):
    loss = m(torch.randn(8, 16)).pow(2).mean()
    o.zero_grad(); loss.backward(); o.step(); truth.append(loss.item())
""")
    assert r.error_in_exec is None, r.error_in_exec
    rep = r.result
    assert list(rep.losses) == pytest.approx(ip.user_ns["truth"])
    assert rep.peak_delta_bytes > 0
    assert any("torch.compile" in n for n in rep.notes)
    from torch._dynamo.utils import counters

    assert counters["stats"]["unique_graphs"] >= 1  # measuring did not stop the model from compiling

"""JupyterLab in a real browser: the find_batch widget renders and reacts, and ``%gpumon --sidebar`` opens.

A JupyterLab server runs on a free localhost port with no token, in throwaway Jupyter and IPython
folders, with a kernelspec for this interpreter; Debian's Chromium is driven by Playwright (never
``playwright install``). Server and browser are stopped by the fixtures, also when a test fails.
Screenshots go to ``test-artifacts/`` (git-ignored); with ``GPUMAGIC_WRITE_DOCS=1`` the widget's
picture is also written to ``docs/widget.png``, the image README.md shows.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import nbformat
import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("GPUMAGIC_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
RUN_TIMEOUT_MS = 150_000  # running every cell of the quickstart, on a loaded 2-core CI machine
UI_TIMEOUT_MS = 30_000

# JupyterLab settings for the throwaway user: every cell in the DOM (no windowing, so a widget
# far down is there to find), the notebook's kernel started without asking, and no news or
# update checks (no network, no pop-ups).
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {
        "windowingMode": "none",
        "autoStartDefaultKernel": True,
    },
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Lab:
    url: str
    root: Path
    log: Path

    def log_tail(self, n: int = 40) -> str:
        lines = self.log.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(lines[-n:])


def _write_kernelspec(data_dir: Path) -> None:
    # "python3" is what the notebooks' metadata names; this one is this interpreter, whatever else is installed
    spec = data_dir / "kernels" / "python3" / "kernel.json"
    spec.parent.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec.write_text(json.dumps({"argv": argv, "display_name": "Python 3 (gpumagic tests)", "language": "python"}))


def _write_settings(config_dir: Path) -> None:
    for rel, value in LAB_SETTINGS.items():
        path = config_dir / "lab" / "user-settings" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value), encoding="utf-8")


def _wait_ready(url: str, proc: subprocess.Popen[bytes], lab: Lab, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{lab.log_tail()}")
        try:
            with urllib.request.urlopen(url + "api/status", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer /api/status within {timeout:.0f} s:\n{lab.log_tail()}")


def _stop(url: str, proc: subprocess.Popen[bytes]) -> None:
    """Ask the server to shut down (it stops its kernels); terminate, then kill, its process group if not."""
    if proc.poll() is None:
        with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
            urllib.request.urlopen(urllib.request.Request(url + "api/shutdown", method="POST"), timeout=10).close()
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                os.killpg(proc.pid, sig)  # the session started for the server: it and its kernels
            try:
                proc.wait(timeout=20)
                break
            except subprocess.TimeoutExpired:
                continue
    with contextlib.suppress(ProcessLookupError):  # a kernel that outlived the server
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    base = tmp_path_factory.mktemp("jupyterlab")
    root = base / "notebooks"
    dirs = {name: base / name for name in ("config", "data", "runtime", "ipython")}
    for d in (root, *dirs.values()):
        d.mkdir()
    _write_kernelspec(dirs["data"])
    _write_settings(dirs["config"])
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(dirs["config"]),
        "JUPYTER_DATA_DIR": str(dirs["data"]),
        "JUPYTER_RUNTIME_DIR": str(dirs["runtime"]),
        "IPYTHONDIR": str(dirs["ipython"]),
        "JUPYTER_PLATFORM_DIRS": "1",
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    lab = Lab(url, root, base / "server.log")
    cmd = [
        sys.executable, "-m", "jupyterlab",
        "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0",
        "--IdentityProvider.token=", "--PasswordIdentityProvider.hashed_password=",
        "--ServerApp.disable_check_xsrf=True", f"--ServerApp.root_dir={root}",
        "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        *(["--allow-root"] if os.geteuid() == 0 else []),  # CI containers run as root
    ]  # fmt: skip
    with lab.log.open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(url, proc, lab)
        yield lab
    finally:
        _stop(url, proc)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(UI_TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


# --- driving JupyterLab --------------------------------------------------------------------------


NOTEBOOK = ".jp-NotebookPanel:visible"  # the notebook in the current tab


def open_notebook(page: Page, lab: Lab, name: str) -> None:
    page.goto(f"{lab.url}lab/tree/{name}?reset")  # ?reset: no tabs restored from an earlier test
    page.locator(f"{NOTEBOOK} .jp-Notebook").wait_for()
    started = page.locator(f"{NOTEBOOK} .jp-Notebook-ExecutionIndicator[data-status='idle']")
    ask = page.locator(".jp-Dialog", has_text="Select Kernel")
    started.or_(ask).first.wait_for(timeout=90_000)
    if ask.count():  # should not happen with autoStartDefaultKernel; accept the preferred kernel if it does
        ask.locator(".jp-mod-accept").click()
    kernel_idle(page, timeout=90_000)


def kernel_idle(page: Page, timeout: int) -> None:
    page.locator(f"{NOTEBOOK} .jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=timeout)


def run_all(page: Page) -> None:
    """Run → Run All Cells, on this notebook; again if no cell started (the click came too early)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.locator(f"{NOTEBOOK} .jp-Cell").first.click()  # makes it the notebook the command acts on
    started = page.locator(f"{NOTEBOOK} .jp-InputPrompt", has_text=re.compile(r"\[(\*|\d+)\]")).first
    for _ in range(3):
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-item:visible .lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
        try:
            started.wait_for(timeout=10_000)
            return
        except PlaywrightTimeout:
            continue
    pytest.fail("Run → Run All Cells started no cell")


def wait_until_done(page: Page, cells: int) -> None:
    """Every code cell of the current notebook has an execution count, and the kernel is idle again."""
    page.wait_for_function(
        """n => {
            const panel = [...document.querySelectorAll('.jp-NotebookPanel')].find(p => p.offsetParent !== null);
            const prompts = panel ? [...panel.querySelectorAll('.jp-CodeCell .jp-InputPrompt')] : [];
            return prompts.length === n && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
        }""",
        arg=cells,
        timeout=RUN_TIMEOUT_MS,
    )
    kernel_idle(page, timeout=UI_TIMEOUT_MS)


def stderr_outputs(page: Page) -> list[str]:
    return page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").all_inner_texts()


# --- tests ---------------------------------------------------------------------------------------


def predicted_peak(readout_text: str) -> str:
    found = re.search(r"predicted peak ([\d.]+ \w+)", readout_text)
    assert found, readout_text
    return found.group(1)


def test_find_batch_widget_renders_and_its_slider_changes_the_prediction(page: Page, lab: Lab) -> None:
    from playwright.sync_api import expect

    name = "01_quickstart.ipynb"
    shutil.copy(ROOT / "examples" / name, lab.root / name)
    cells = sum(c.cell_type == "code" for c in nbformat.read(lab.root / name, as_version=4).cells)
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        open_notebook(page, lab, name)
        run_all(page)
        wait_until_done(page, cells)
        widget = page.locator(".gpumagic-search")
        slider, readout = widget.locator(".gpumagic-slider"), widget.locator(".gpumagic-readout")
        value = slider.locator(".widget-readout")
        widget.scroll_into_view_if_needed()
        expect(widget.locator(".gpumagic-plot")).to_be_visible(timeout=UI_TIMEOUT_MS)
        start = value.inner_text().strip()
        expect(readout).to_contain_text(f"batch size {start}", timeout=UI_TIMEOUT_MS)
        before = readout.inner_text()
        widget.screenshot(path=str(ARTIFACTS / "e2e-widget.png"))  # at the recommendation, for docs/widget.png

        slider.locator(".noUi-handle").focus()
        page.keyboard.press("Home")  # the smallest size the slider offers
        expect(value).not_to_have_text(start, timeout=UI_TIMEOUT_MS)
        expect(readout).to_contain_text(f"batch size {value.inner_text().strip()}", timeout=UI_TIMEOUT_MS)
        kernel_idle(page, timeout=UI_TIMEOUT_MS)  # the plot's marker follows
        after = readout.inner_text()
    finally:
        page.screenshot(path=str(ARTIFACTS / "e2e-quickstart.png"))

    assert predicted_peak(after) != predicted_peak(before)
    if os.environ.get("GPUMAGIC_WRITE_DOCS") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(ARTIFACTS / "e2e-widget.png", ROOT / "docs" / "widget.png")


def test_gpumon_sidebar_opens_in_the_right_panel_and_updates(page: Page, lab: Lab) -> None:
    name = "monitor.ipynb"
    sources = ["%load_ext gpumagic", "import torch\nx = torch.ones(1024, 1024)", "%gpumon --sidebar --interval 0.5"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, lab.root / name)
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        open_notebook(page, lab, name)
        run_all(page)
        wait_until_done(page, len(sources))
        monitor = page.locator("#jp-right-stack .jupyterlab-sidecar .gpumagic-monitor")
        monitor.wait_for()
        status = monitor.locator(".gpumagic-monitor-status")
        page.wait_for_function(  # the kernel's sampling thread keeps the panel live
            "el => Number((el.innerText.match(/(\\d+) samples?/) || [0, 0])[1]) >= 3",
            arg=status.element_handle(),
            timeout=UI_TIMEOUT_MS,
        )
        text = monitor.inner_text()
        inline = page.locator(f"{NOTEBOOK} .jp-OutputArea .gpumagic-monitor").count()
    finally:
        page.screenshot(path=str(ARTIFACTS / "e2e-gpumon-sidebar.png"))

    assert "cpu" in text.lower()
    assert inline == 0, "--sidebar shows the monitor in the sidebar only"
    assert not stderr_outputs(page)

"""The IPython side of running user code: cells run in the user namespace, names guessed from it,
the live monitor shown. With :mod:`gpumagic.magics` it is the IPython layer: besides the demo,
the only modules that import IPython (``tests/unit/test_layering.py`` checks).

The core never sees a shell: the trial runner and the tracker get plain callables from here.
"""

from __future__ import annotations

import ast
import inspect
import os
import sys
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TextIO

from IPython.core.interactiveshell import InteractiveShell
from IPython.display import display

from gpumagic.views import register_progress

if TYPE_CHECKING:
    from gpumagic.monitor import Monitor
    from gpumagic.render.progress import TrialProgress
    from gpumagic.report import BatchSearchResult, Trial
    from gpumagic.sweep_results import SweepResult

__all__ = ["ShownProgress", "find_batch_in_shell", "hints", "last_gpumem_cell", "previous_cell", "run_cell_source",
           "show_monitor", "sweep_in_shell", "widget_progress"]


def _cell_number(shell: InteractiveShell, cell: str) -> int:
    """The number of the cell running now, for tracebacks ("Cell In[7]"): IPython counts a cell
    it stores in the history before running it, so the counter is then one ahead."""
    n = shell.execution_count
    hist = getattr(shell.history_manager, "input_hist_raw", None)
    if hist and len(hist) == n and cell.strip() and cell.strip() in hist[-1]:
        return n - 1
    return n


def run_cell_source(shell: InteractiveShell, cell: str) -> Any:
    """Execute a cell body in the user namespace; return the value of a final expression."""
    src = shell.transform_cell(cell)
    tree = shell.compile.ast_parse(src)
    assert isinstance(tree, ast.Module)
    last: ast.Expression | None = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body[-1].value)
        tree.body.pop()
    filename = shell.compile.cache(src, _cell_number(shell, cell), raw_code=cell)
    # top-level await compiles as IPython compiles it for a plain cell; such code evaluates to a
    # coroutine, run to its end here (a magic is synchronous)
    with shell.compile.extra_flags(ast.PyCF_ALLOW_TOP_LEVEL_AWAIT if shell.autoawait else 0):
        code = shell.compile(tree, filename, "exec")  # type: ignore[arg-type]
        tail = None if last is None else shell.compile(last, filename, "eval")  # type: ignore[arg-type]
    _finish(shell, eval(code, shell.user_global_ns, shell.user_ns), code)
    if tail is not None:
        return _finish(shell, eval(tail, shell.user_global_ns, shell.user_ns), tail)
    return None


def _finish(shell: InteractiveShell, value: Any, code: types.CodeType) -> Any:
    """``value`` of ``code``; when the code awaits at top level, what its coroutine returns."""
    if not code.co_flags & inspect.CO_COROUTINE:
        return value
    runner = getattr(shell, "trio_runner", None)
    if runner:
        return runner(value)
    import asyncio  # not at load: IPython itself imports it only when a loop is needed

    try:
        asyncio.get_running_loop()
    except RuntimeError:  # a terminal: IPython's own loop, the one a plain cell's await runs on
        return shell.loop_runner(value)
    # a kernel runs this (synchronous) magic inside its event loop, which cannot be re-entered:
    # the cell's coroutine runs to its end on a loop of its own, in this thread (so the measuring
    # layers, which are per thread, see it), and the kernel's loop is current again after
    running = asyncio.events._get_running_loop()
    asyncio.events._set_running_loop(None)
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(value)
    finally:
        loop.close()
        asyncio.events._set_running_loop(running)


class _Hints:
    """The namespace's models and tensors, read afresh at each iteration: it holds the namespace,
    never a list of its tensors (a search's frames, kept by an error's traceback, hold this)."""

    def __init__(self, ns: Mapping[str, Any]) -> None:
        self.ns = ns

    def __iter__(self) -> Iterator[Any]:
        import torch

        for name, v in list(self.ns.items()):
            if not name.startswith("_") and isinstance(v, (torch.nn.Module, torch.Tensor)):
                yield v


def hints(ns: Mapping[str, Any]) -> Iterable[Any]:
    """Models and tensors in the namespace, for choosing the default device (read when iterated)."""
    return _Hints(ns)


def last_gpumem_cell(shell: InteractiveShell) -> str | None:
    """The body of the most recent ``%%gpumem`` cell in the input history."""
    for src in reversed(list(getattr(shell.history_manager, "input_hist_raw", []))):
        lines = src.lstrip().splitlines()
        if lines and lines[0].startswith("%%gpumem"):
            return "\n".join(lines[1:])
    return None


def find_batch_in_shell(shell: InteractiveShell, code: str, **options: Any) -> BatchSearchResult:
    """``%find_batch``: run ``code`` as a cell per trial; ``options`` as for
    :func:`gpumagic.batch.find_batch_in_namespace`."""
    from gpumagic.batch import find_batch_in_namespace

    ns = shell.user_ns
    # the core reads the cell as Python: IPython's syntax (magics, !commands) transformed away
    python = shell.transform_cell(code)
    return find_batch_in_namespace(ns, lambda: run_cell_source(shell, code), python, hints=hints(ns), **options)


def previous_cell(shell: InteractiveShell) -> str | None:
    """The cell run before the current one (which is the last in the history when it is stored),
    without its ``%%gpumem`` line: the sweep tracks the runs itself."""
    hist: list[str] = list(getattr(shell.history_manager, "input_hist_raw", []))
    for src in reversed(hist):
        text = src.strip()
        if text and not text.lstrip("%").startswith("batch_sweep"):
            if text.startswith("%%gpumem"):
                return text.split("\n", 1)[1] if "\n" in text else None
            return src
    return None


def sweep_in_shell(shell: InteractiveShell, code: str, **options: Any) -> SweepResult:
    """``%%batch_sweep``: run ``code`` as a cell per run; ``options`` as for
    :func:`gpumagic.sweep.sweep_in_namespace`."""
    from gpumagic.sweep import sweep_in_namespace

    ns = shell.user_ns
    python = shell.transform_cell(code)
    return sweep_in_namespace(ns, lambda: run_cell_source(shell, code), python, hints=hints(ns), **options)


def _sidebar_problem() -> str | None:
    if "google.colab" in sys.modules:
        return "needs JupyterLab; Google Colab has no sidebar for widgets"
    if "VSCODE_PID" in os.environ:
        return "needs JupyterLab; VS Code notebooks have no sidebar for widgets"
    return None


def show_monitor(monitor: Monitor, sidebar: bool = False, *,
                 display: Callable[[Any], object] | None = None) -> Any:
    """Display :func:`monitor_widget` inline, or with ``sidebar=True`` in JupyterLab's right
    sidebar through sidecar (``pip install gpumagic[sidecar]``). Where that cannot work (no
    sidecar, Colab, VS Code) it says why and shows the panel inline. Returns the panel."""
    if display is None:
        from IPython.display import display as ipython_display

        display = ipython_display
    from gpumagic.render.widgets import monitor_widget

    panel = monitor_widget(monitor)
    if sidebar:
        problem = _sidebar_problem()
        if problem is None:
            try:
                from sidecar import Sidecar
            except ImportError:
                problem = "needs sidecar: pip install gpumagic[sidecar]"
        if problem is None:
            side = Sidecar(title=f"gpumagic monitor {monitor.id}")
            with side:
                display(panel)
            panel.sidecar = side
            return panel
        print(f"gpumagic: --sidebar {problem}; showing the monitor here instead")
    display(panel)
    return panel


class ShownProgress:
    """A notebook progress widget and the output it is displayed in (emptied when the search ends,
    so a saved notebook keeps no frame of the bar)."""

    def __init__(self, inner: TrialProgress, handle: Any) -> None:
        self.inner = inner
        self.handle = handle

    def __call__(self, trial: Trial, index: int) -> None:
        self.inner(trial, index)

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            self.handle.update({"text/plain": ""}, raw=True)


def widget_progress(stream: TextIO | None = None, label: str = "find_batch") -> TrialProgress:
    """A widget bar displayed in the running cell; one line per trial on ``stream`` without ipywidgets."""
    try:
        from gpumagic.render.widgets import WidgetProgress

        bar = WidgetProgress()
    except ImportError:  # no ipywidgets: lines in the cell's stderr
        from gpumagic.render.progress import LineProgress

        return LineProgress(stream if stream is not None else sys.stderr, label)
    return ShownProgress(bar, display(bar.widget, display_id=True))


register_progress("widget", widget_progress)

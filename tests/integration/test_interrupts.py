"""Ctrl-C at awkward moments and odd cells, in a real IPython shell: whatever gpumagic was doing
when interrupted, the next cell finds the session as it was."""

import importlib

import pytest
from IPython.utils.capture import capture_output

from gpumagic import backends


def test_ctrl_c_while_the_backends_load_leaves_none_loaded_and_the_next_cell_loads_all(ip, clean_ns, monkeypatch):
    saved = list(backends._REGISTRY)
    real_import = importlib.import_module

    def interrupted_after_the_first(name, *args):
        if name == backends._BUILTIN[1]:
            raise KeyboardInterrupt
        return real_import(name, *args)

    backends._REGISTRY.clear()
    try:
        monkeypatch.setattr(importlib, "import_module", interrupted_after_the_first)
        with capture_output():
            r = ip.run_cell("%%gpumem -d cpu -q\ny = 1", store_history=True)
        assert isinstance(r.error_in_exec, KeyboardInterrupt)
        assert backends._REGISTRY == []
        monkeypatch.undo()
        with capture_output():
            r = ip.run_cell("%%gpumem -d cpu -q -o\ny = 1", store_history=True)
        assert r.error_in_exec is None, r.error_in_exec
        assert [b.name for b in backends.registry()] == [real_import(m).BACKEND.name for m in backends._BUILTIN]
    finally:
        backends._REGISTRY[:] = saved


def _interrupt_at_line(n: int, files: set[str], lines_seen: list[int]):
    """A trace function raising KeyboardInterrupt at the n-th line run in ``files``, as a Ctrl-C
    landing there would; the repair after the cell is not interrupted."""
    state = {"armed": True}

    def local(frame, event, arg):
        if event == "line" and state["armed"]:
            lines_seen[0] += 1
            if lines_seen[0] == n:
                raise KeyboardInterrupt
        return local

    def calls(frame, event, arg):
        if frame.f_code.co_name == "forget_left_behind":
            state["armed"] = False
        return local if frame.f_code.co_filename in files else None

    return calls


@pytest.mark.slow
def test_ctrl_c_anywhere_in_silencing_warnings_leaves_no_filter_behind(ip, clean_ns):
    import sys
    import warnings

    from gpumagic import _quiet

    before = list(warnings.filters)
    files = {warnings.__file__, _quiet.__file__}
    n = 0
    while True:
        n += 1
        seen = [0]
        sys.settrace(_interrupt_at_line(n, files, seen))
        try:
            with capture_output():
                r = ip.run_cell("%%gpumem -d cpu -q\ny = torch.ones(3) * 2", store_history=True)
        finally:
            sys.settrace(None)
        assert warnings.filters == before, f"Ctrl-C at line {n} of {seen[0]} left {warnings.filters[:2]}"
        if seen[0] < n:  # the cell ran to its end: every line was interrupted once
            assert r.error_in_exec is None, r.error_in_exec
            break
        assert isinstance(r.error_in_exec, KeyboardInterrupt), (n, r.error_in_exec)
    assert n > 3  # the cell did silence warnings (the scan of live tensors), so there were lines to hit


AWAIT_CELL = """
import asyncio
async def fetch(n):
    await asyncio.sleep(0)
    return torch.ones(n)
t = await fetch(4)
"""


@pytest.fixture
def ipython_loop():
    """IPython's own event loop, which a terminal's top-level await runs on; closed after the test."""
    yield
    from IPython.core import async_helpers

    loop = async_helpers._asyncio_event_loop
    if loop is not None and not loop.is_closed():
        loop.close()


def test_a_cell_with_top_level_await_runs_under_gpumem(ip, clean_ns, ipython_loop):
    with capture_output():
        r = ip.run_cell("%%gpumem -d cpu -q -o" + AWAIT_CELL + "(await fetch(2)).sum()", store_history=True)
    assert r.error_in_exec is None, r.error_in_exec
    assert ip.user_ns["t"].tolist() == [1.0] * 4
    assert r.result.device == "cpu"


def test_the_value_of_a_final_await_is_the_cells_value_under_gpumem(ip, clean_ns, ipython_loop):
    with capture_output():
        r = ip.run_cell("%%gpumem -d cpu -q" + AWAIT_CELL + "(await fetch(2)).sum().item()", store_history=True)
    assert r.error_in_exec is None, r.error_in_exec
    assert r.result == 2.0


def test_a_cell_with_top_level_await_runs_under_gpumem_inside_a_running_loop(ip, clean_ns):
    import asyncio

    async def kernel():  # a Jupyter kernel runs each cell inside its own event loop
        return ip.run_cell("%%gpumem -d cpu -q" + AWAIT_CELL + "(await fetch(3)).sum().item()", store_history=True)

    with capture_output():
        r = asyncio.run(kernel())
    assert r.error_in_exec is None, r.error_in_exec
    assert r.result == 3.0


def test_a_cell_with_top_level_await_runs_under_find_batch(ip, clean_ns, ipython_loop):
    ip.run_cell("""
import asyncio
X, Y = torch.randn(256, 8), torch.randint(0, 2, (256,))
model = nn.Linear(8, 2)
opt = torch.optim.SGD(model.parameters(), 0.1)
bs = 4
async def batches(n):
    for i in range(0, 64, n):
        await asyncio.sleep(0)
        yield X[i:i + n], Y[i:i + n]
""")
    body = """
async for x, y in batches(bs):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
"""
    with capture_output():
        r = ip.run_cell("%%find_batch --var bs -d cpu --budget 1MiB -q -o\n" + body, store_history=True)
    assert r.error_in_exec is None, r.error_in_exec
    assert r.result.recommended_batch_size is not None


def test_a_patch_the_cell_makes_to_backward_stays_after_gpumem(ip, clean_ns):
    import torch

    true_backward = torch.autograd.backward
    cell = """
calls = []
theirs = torch.autograd.backward          # gpumagic's wrapper while the cell is measured
def mine(*args, **kwargs):
    calls.append(1)
    return theirs(*args, **kwargs)
torch.autograd.backward = mine
w = torch.ones(3, requires_grad=True)
(w * 2).sum().backward()
"""
    try:
        with capture_output():
            r = ip.run_cell("%%gpumem -d cpu -q -o\n" + cell, store_history=True)
        assert r.error_in_exec is None, r.error_in_exec
        assert torch.autograd.backward is ip.user_ns["mine"]
        r = ip.run_cell("(w * 3).sum().backward()", store_history=True)  # after the cell: through ours to torch's
        assert r.error_in_exec is None, r.error_in_exec
        assert ip.user_ns["calls"] == [1, 1]
        assert ip.user_ns["w"].grad.tolist() == [5.0] * 3
        assert r.result is None
    finally:
        torch.autograd.backward = true_backward


def test_a_patched_dataloader_iterator_stays_after_gpumem(ip, clean_ns):
    from torch.utils.data import dataloader

    true_next = dataloader._BaseDataLoaderIter.__dict__["__next__"]
    cell = """
from torch.utils.data import DataLoader, dataloader
drawn = []
theirs = dataloader._BaseDataLoaderIter.__next__
def counted(it):
    drawn.append(1)
    return theirs(it)
dataloader._BaseDataLoaderIter.__next__ = counted
for (x,) in DataLoader(torch.utils.data.TensorDataset(torch.ones(8, 2)), batch_size=4):
    pass
"""
    try:
        with capture_output():
            r = ip.run_cell("%%gpumem -d cpu -q\n" + cell, store_history=True)
        assert r.error_in_exec is None, r.error_in_exec
        assert dataloader._BaseDataLoaderIter.__dict__["__next__"] is ip.user_ns["counted"]
        during = len(ip.user_ns["drawn"])  # two batches and the end of the epoch
        ip.run_cell("for (x,) in DataLoader(torch.utils.data.TensorDataset(torch.ones(8, 2)), batch_size=4): pass")
        assert len(ip.user_ns["drawn"]) == 2 * during == 6
    finally:
        dataloader._BaseDataLoaderIter.__next__ = true_next


@pytest.mark.parametrize(
    ("outer", "inner"),
    [
        ("%%gpumem -d cpu -q", "get_ipython().run_cell_magic('gpumem', '-d cpu -q', 'y = 1')"),
        ("%%gpumem -d cpu -q",
         "get_ipython().run_line_magic('find_batch', '--var bs -d cpu --budget 1MiB -q -- f(bs)')"),
        ("%%find_batch --var bs -d cpu --budget 1MiB -q",
         "get_ipython().run_cell_magic('gpumem', '-d cpu -q', 'f(bs)')"),
    ],
)
def test_nesting_measuring_magics_is_a_usage_error(ip, clean_ns, outer, inner):
    import torch
    from IPython.core.error import UsageError

    true_backward = torch.autograd.backward
    ip.run_cell("bs = 4\ndef f(n):\n    w = torch.ones(n, requires_grad=True)\n    (w * 2).sum().backward()")
    with capture_output():
        r = ip.run_cell(f"{outer}\nf(bs)\n{inner}", store_history=True)
    assert isinstance(r.error_in_exec, UsageError), r.error_in_exec
    assert "nesting them is not supported" in str(r.error_in_exec)
    assert torch.autograd.backward is true_backward


def test_unloading_gpumagic_inside_a_budgeted_cell_marks_the_report_incomplete(ip, clean_ns):
    import torch

    from gpumagic import tracking

    true_backward = torch.autograd.backward
    try:
        with capture_output():
            r = ip.run_cell("%%gpumem -d cpu --budget 64MiB -q -o\nx = torch.ones(3)\n"
                            "get_ipython().run_line_magic('unload_ext', 'gpumagic')\ny = torch.ones(5)",
                            store_history=True)
        assert r.error_in_exec is None, r.error_in_exec
        assert r.result.incomplete is not None
        assert "unloaded" in r.result.incomplete
        assert tracking.active_tracker() is None
        assert torch.autograd.backward is true_backward
        r = ip.run_cell("z = torch.ones(10**7)")  # no budget left behind
        assert r.error_in_exec is None, r.error_in_exec
    finally:
        ip.run_line_magic("load_ext", "gpumagic")


SYMPY_INTERRUPTED = r'''
import sys
from IPython.testing import globalipapp
ip = globalipapp.start_ipython()
ip.run_line_magic("load_ext", "gpumagic")
ip.run_cell("import torch\nfrom torch import nn")
assert "sympy" not in sys.modules

class CtrlC:  # a Ctrl-C landing while torch imports sympy for the first time
    def find_spec(self, name, path=None, target=None):
        if name == "sympy.printing":
            sys.meta_path.remove(self)
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, CtrlC())
CELL = "m = nn.Linear(4, 2)\nfor _ in range(2):\n    m(torch.randn(3, 4)).sum().backward()"
r = ip.run_cell("%%gpumem --dry-run -d cpu -q\n" + CELL)
print("interrupted:", type(r.error_in_exec).__name__)
r = ip.run_cell("%%gpumem -d cpu -q -o\n" + CELL)
print("plain:", r.error_in_exec, type(r.result).__name__, "sympy" in sys.modules)
r = ip.run_cell("%%gpumem --dry-run -d cpu -q -o\n" + CELL)
print("dry run:", r.error_in_exec, type(r.result).__name__)
r = ip.run_cell("import sympy\nsympy.printing.sstr(sympy.Symbol('x') + 1)")
print("sympy:", r.error_in_exec, r.result)
'''


@pytest.mark.slow
def test_ctrl_c_during_the_first_sympy_import_breaks_no_later_cell(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "sympy_interrupted.py"
    script.write_text(SYMPY_INTERRUPTED)
    env = dict(os.environ, IPYTHONDIR=str(tmp_path / "ipython"))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    lines = [ln for ln in out.stdout.splitlines() if ln.split(":")[0] in ("interrupted", "plain", "dry run", "sympy")]
    assert lines == [
        "interrupted: KeyboardInterrupt",
        "plain: None MemoryReport False",  # the plain path never imports sympy
        "dry run: None MemoryReport",
        "sympy: None x + 1",
    ], out.stdout[-3000:] + out.stderr[-3000:]

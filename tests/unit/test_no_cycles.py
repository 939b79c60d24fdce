"""What the magics keep must not form reference cycles with the user's objects.

A cycle (an exception kept with its traceback, whose frames hold a closure that holds the
exception) keeps the model and its tensors alive after ``del model`` until Python's next garbage
collection: on a GPU, memory the user freed stays held, and a later cell runs out of memory at a
size that fits. Found by the advice-followed experiment: after a search whose plan on fake tensors
failed, the next loop's true maximum no longer fitted, by the 1.7 MB such a cycle held.

Each test runs with the collector off and checks, by weak reference, that deleting the names
frees the model at once.
"""

import gc
import warnings
import weakref
from collections.abc import Iterator

import pytest

SETUP = """
import torch, torch.nn as nn, torch.nn.functional as F
torch.manual_seed(0)
data = torch.randn(512, 32); labels = torch.randint(0, 4, (512,))
model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 4))
opt = torch.optim.SGD(model.parameters(), 0.1)
"""

CELL = """
for i in range(3):
    idx = torch.randint(0, len(data), (bs,))
    loss = F.cross_entropy(model(data[idx]), labels[idx])
    opt.zero_grad(); loss.backward(); opt.step()
"""


class _NoCopies:
    """An attribute the fake copier cannot copy: the plan on fake tensors fails, the search runs for real."""

    def __deepcopy__(self, memo: dict) -> "_NoCopies":
        raise TypeError("this object refuses to be copied")


@pytest.fixture
def no_gc(ip, clean_ns) -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _run(ip, src: str):
    r = ip.run_cell(src)
    return r


def _freed_without_gc(ip, names: list[str]) -> weakref.ref:
    ref = weakref.ref(ip.user_ns["model"])
    for name in names:
        ip.user_ns.pop(name, None)
    return ref


def test_a_search_whose_plan_failed_leaves_no_cycle_holding_the_model(ip, no_gc):
    _run(ip, SETUP)
    ip.user_ns["model"].odd = _NoCopies()
    ip.user_ns["bs"] = 8
    r = _run(ip, f"%%find_batch -d cpu --budget 2MiB --var bs -q\n{CELL}")
    assert r.error_in_exec is None, r.error_in_exec
    res = ip.magics_manager.registry["GPUMagics"].presenter.last_search
    assert any("no plan on fake tensors" in n for n in res.notes), res.notes  # the path under test ran
    ref = _freed_without_gc(ip, ["model", "opt", "data", "labels", "loss", "idx", "bs", "i"])
    assert ref() is None, "the model outlived its names: something in a reference cycle holds it"


def test_an_oom_then_the_advised_search_leaves_no_cycle_holding_the_model(ip, no_gc):
    _run(ip, SETUP)
    ip.user_ns["model"].odd = _NoCopies()
    ip.user_ns["bs"] = 100_000
    r = _run(ip, f"%%gpumem -d cpu --budget 2MiB -q\n{CELL}")
    assert r.error_in_exec is not None
    r = _run(ip, "%find_batch -d cpu --budget 2MiB --var bs -q")
    assert r.error_in_exec is None, r.error_in_exec
    ref = _freed_without_gc(ip, ["model", "opt", "data", "labels", "loss", "idx", "bs", "i"])
    assert ref() is None, "the model outlived its names: something in a reference cycle holds it"


def test_the_plan_does_not_fail_under_warnings_as_errors(ip, clean_ns):
    # pytest's filterwarnings=error, or a user's warnings.simplefilter("error"): torch's fake copier
    # warns when it reads a non-leaf tensor's .grad (the `loss` a previous cell left behind)
    _run(ip, SETUP)
    ip.user_ns["bs"] = 8
    assert _run(ip, f"%%gpumem -d cpu -q\n{CELL}").error_in_exec is None  # binds a non-leaf `loss`
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = _run(ip, f"%%find_batch -d cpu --budget 2MiB --var bs -q\n{CELL}")
    assert r.error_in_exec is None, r.error_in_exec
    res = ip.magics_manager.registry["GPUMagics"].presenter.last_search
    assert not any("no plan" in n for n in res.notes), res.notes
    assert any(t.planned for t in res.trials)

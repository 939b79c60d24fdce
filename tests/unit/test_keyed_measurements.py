"""A remembered measurement is used only for what it measured: the same cell on the same models,
optimizers and data (issue 19, section 4)."""

import pytest
from IPython.utils.capture import capture_output

SETUP = """
import torch, torch.nn as nn, torch.nn.functional as F
torch.manual_seed(0)
X = torch.randn(4096, 64); Y = torch.randint(0, 10, (4096,))
model = nn.Sequential(nn.Linear(64, {width}), nn.ReLU(), nn.Linear({width}, 10))
opt = torch.optim.SGD(model.parameters(), 0.1)
"""
CELL = """%%gpumem -d cpu --budget 8MiB -q
for i in range(3):
    idx = torch.randint(0, len(X), (batch_size,))
    out = model(X[idx])
    loss = F.cross_entropy(out, Y[idx])
    opt.zero_grad(); loss.backward(); opt.step()
"""
RUN_LINE = "a run that worked at a smaller size"


def run(ip, src):
    with capture_output():
        return ip.run_cell(src, store_history=True)


def at(ip, b):
    ip.user_ns["batch_size"] = b
    return run(ip, CELL)


@pytest.fixture
def forget(ip, clean_ns):
    p = ip.magics_manager.registry["GPUMagics"].presenter
    p.last_report = p.last_search = p.last_search_code = p.last_oom_cell = None
    yield p
    p.last_report = p.last_search = p.last_search_code = p.last_oom_cell = None


def test_a_run_of_the_same_cell_on_the_same_model_is_used(ip, forget):
    run(ip, SETUP.format(width=512))
    assert at(ip, 256).error_in_exec is None
    r = at(ip, 8192)
    assert r.error_in_exec is not None
    assert RUN_LINE in r.error_in_exec.advice.text()


def test_a_run_of_the_same_cell_on_another_model_is_not_used(ip, forget):
    run(ip, SETUP.format(width=64))
    assert at(ip, 256).error_in_exec is None
    run(ip, SETUP.format(width=512))  # a new model (and data) defined in an earlier cell
    r = at(ip, 8192)
    assert r.error_in_exec is not None
    assert RUN_LINE not in r.error_in_exec.advice.text()


def test_a_run_before_reset_is_not_used(ip, forget):
    run(ip, SETUP.format(width=512))
    assert at(ip, 256).error_in_exec is None
    run(ip, "%reset -f")
    run(ip, SETUP.format(width=512))
    r = at(ip, 8192)
    assert r.error_in_exec is not None
    assert RUN_LINE not in r.error_in_exec.advice.text()


def test_a_search_of_the_same_cell_on_another_model_is_not_used(ip, forget):
    run(ip, SETUP.format(width=64))
    ip.user_ns["batch_size"] = 256
    body = CELL.split("\n", 1)[1]
    assert run(ip, "%%find_batch --var batch_size -d cpu --budget 8MiB -q --max 4096\n" + body).error_in_exec is None
    assert forget.last_search is not None
    run(ip, SETUP.format(width=512))
    r = at(ip, 8192)
    assert r.error_in_exec is not None
    first = r.error_in_exec.advice.suggestions[0]
    assert first.kind == "measure" or at(ip, first.batch_size).error_in_exec is None  # followed, it fits

"""Loops without a DataLoader or a batch variable: the batch size read from the inputs' leading
dimension, and OOM advice that follows from it (real shell, real torch on CPU, --budget)."""

import re

import pytest
import torch
from IPython.utils.capture import capture_output

from gpumagic.oom import last_advice

LOOP = """
for i in range(3):
    idx = torch.randint(0, len(X), ({b},))
    loss = F.cross_entropy(model(X[idx]), Y[idx])
    opt.zero_grad(); loss.backward(); opt.step()
"""
# Found by bisection after a warm run at 300 and an OOM at 5000 (peak ≈ 1.26 MB + 6408 B per sample
# on this model): 1113 runs in 8 MiB, 1114 does not.
TRUE_MAX = 1113


def gpumem(ip, body, *flags):
    with capture_output() as cap:
        result = ip.run_cell(" ".join(["%%gpumem -d cpu --budget 8MiB", *flags]) + "\n" + body, store_history=True)
    return result, cap


def presenter(ip):
    return ip.magics_manager.registry["GPUMagics"].presenter


@pytest.fixture
def setup(ip, clean_ns, monkeypatch):
    monkeypatch.setattr(presenter(ip), "last_report", None)  # no warm run from another test
    ip.run_cell("""
torch.manual_seed(0)
X = torch.randn(4096, 64); Y = torch.randint(0, 10, (4096,))
model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 10))
opt = torch.optim.SGD(model.parameters(), 0.1)
""")


def test_an_index_batched_loop_reads_its_batch_size_from_the_inputs_leading_dimension(ip, setup):
    result, _ = gpumem(ip, LOOP.format(b=300), "-q")
    assert result.error_in_exec is None
    report = presenter(ip).last_report
    assert [(s.batch_size, s.batch_size_guessed) for s in report.steps] == [(300, True)] * 3
    assert re.search(r"batch size +300 \(read from the inputs' leading dimension\)", report.to_text())


def test_a_dataloader_batch_size_is_not_marked_as_a_guess(ip, setup):
    result, _ = gpumem(ip, """
from torch.utils.data import DataLoader, TensorDataset
for x, y in DataLoader(TensorDataset(X[:256], Y[:256]), batch_size=64):
    loss = F.cross_entropy(model(x.T.T), y)
    opt.zero_grad(); loss.backward(); opt.step()
""")
    assert result.error_in_exec is None
    steps = presenter(ip).last_report.steps
    assert [(s.batch_size, s.batch_size_guessed) for s in steps] == [(64, False)] * 4


def test_following_suggestion_one_after_a_warm_run_fits_and_is_near_the_true_max(ip, setup):
    assert gpumem(ip, LOOP.format(b=300), "-q")[0].error_in_exec is None
    result, _ = gpumem(ip, LOOP.format(b=5000))
    assert isinstance(result.error_in_exec, torch.OutOfMemoryError)
    first = last_advice().suggestions[0]
    assert first.kind == "batch_size"
    assert first.title.endswith("(now 5000): change 5000 in the cell")
    result, _ = gpumem(ip, LOOP.format(b=first.batch_size), "-q")  # the literal, replaced
    assert result.error_in_exec is None
    assert 0.8 * TRUE_MAX <= first.batch_size <= TRUE_MAX


def test_without_a_warm_run_the_first_suggestion_is_the_allocation_advice_as_before(ip, setup):
    result, _ = gpumem(ip, LOOP.format(b=5000))
    assert isinstance(result.error_in_exec, torch.OutOfMemoryError)
    advice = last_advice()
    assert advice.suggestions[0].kind == "allocation"
    assert not [s for s in advice.suggestions if s.kind == "batch_size"]


def test_a_sequence_first_input_gives_its_length_as_the_guess_and_no_batch_advice(ip, setup):
    ip.run_cell("gru = nn.GRU(16, 32); opt = torch.optim.SGD(gru.parameters(), 0.1)")
    body = """
for i in range(2):
    out, h = gru(torch.randn(12, {b}, 16))   # (sequence, batch, features): dimension 0 is the length
    loss = out.pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
"""
    assert gpumem(ip, body.format(b=300), "-q")[0].error_in_exec is None
    assert {(s.batch_size, s.batch_size_guessed) for s in presenter(ip).last_report.steps} == {(12, True)}
    result, _ = gpumem(ip, body.format(b=5000))
    assert isinstance(result.error_in_exec, torch.OutOfMemoryError)
    # the length did not change between the runs: nothing says what a smaller 12 would need
    assert not [s for s in last_advice().suggestions if s.batch_size is not None]

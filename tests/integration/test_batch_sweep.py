"""%%batch_sweep in a real IPython shell: equal samples, the learning-rate rule, the loop's own
losses, state put back, out of memory as a result, --val, the whole data set in one batch."""

from __future__ import annotations

import re

import pytest
import torch
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output

from gpumagic.sweep_results import SweepResult

LOOP = """
for x, y in DataLoader(data, batch_size=batch_size, shuffle=True):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
"""


def sweep(ip, line: str, body: str = LOOP) -> SweepResult:
    with capture_output():
        r = ip.run_cell(f"%%batch_sweep {line} -o\n{body}", store_history=True)
    r.raise_error()
    assert isinstance(r.result, SweepResult)
    return r.result


@pytest.fixture
def setup(ip, clean_ns):
    ip.run_cell("""
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0)
data = TensorDataset(torch.randn(512, 8), torch.randint(0, 3, (512,)))
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
batch_size = 32
""").raise_error()


def test_every_run_sees_the_same_samples_within_one_batch(ip, setup):
    res = sweep(ip, "--var batch_size --sizes 8,32,128 --samples 300 --noise-batches 4")
    for run in res.runs:
        assert 300 <= run.total_samples < 300 + run.batch_size, run
    assert res.samples_target == 300


def test_the_default_is_one_pass_over_the_data_set(ip, setup):
    res = sweep(ip, "--var batch_size --sizes 16,64 --noise-batches 4")
    assert [r.total_samples for r in res.runs] == [512, 512]


# module globals: out of the sweep's reach (it puts back every list the cell's namespace reaches)
SEEN: list[tuple[int, float]] = []
CALLS: list[int] = []


def test_each_run_uses_the_rules_learning_rate_read_from_the_optimizer(ip, setup):
    SEEN.clear()
    seen = SEEN
    ip.push({"record": lambda b, lr: SEEN.append((b, lr))})
    body = LOOP + "    record(batch_size, opt.param_groups[0]['lr'])\n"
    res = sweep(ip, "--var batch_size --sizes 8,32,128 --samples 256 --noise-batches 4", body)
    assert res.lr_rule == "linear"  # SGD, by family
    for b, lr in seen:  # the noise scale's steps too: they run at the rule's rate (and move no weight)
        assert lr == pytest.approx(0.1 * b / 32)
    assert {b for b, _ in seen} == {8, 32, 128}
    assert [r.lrs for r in res.runs] == [(pytest.approx(0.025),), (pytest.approx(0.1),), (pytest.approx(0.4),)]
    assert ip.user_ns["opt"].param_groups[0]["lr"] == 0.1


def test_adam_gets_the_square_root_rule(ip, setup):
    ip.run_cell("opt = torch.optim.Adam(model.parameters(), lr=1e-3)").raise_error()
    res = sweep(ip, "--var batch_size --sizes 8,128 --samples 128 --noise-batches 4")
    assert res.lr_rule == "sqrt"
    assert res.run(128).lrs == (pytest.approx(1e-3 * 2),)
    assert res.run(8).lrs == (pytest.approx(1e-3 / 2),)
    assert "adaptive" in res.lr_rule_why


def test_an_optimizer_made_in_the_cell_is_scaled_too(ip, setup):
    body = "opt2 = torch.optim.SGD(model.parameters(), lr=0.2)\n" + LOOP.replace("opt.", "opt2.")
    res = sweep(ip, "--var batch_size --sizes 16,64 --samples 128 --noise-batches 4", body)
    assert [r.lrs for r in res.runs] == [(pytest.approx(0.1),), (pytest.approx(0.4),)]
    assert "opt2" not in ip.user_ns


def test_the_state_after_the_sweep_is_the_state_before(ip, setup):
    ip.run_cell("""
for x, y in DataLoader(data, batch_size=64):   # optimizer state (momentum buffers) exists
    loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
import copy
weights_before = copy.deepcopy(model.state_dict())
opt_before = copy.deepcopy(opt.state_dict())
rng_before = torch.get_rng_state().clone()
history = [1, 2]
""").raise_error()
    names_before = set(ip.user_ns)
    body = LOOP + "    history.append(loss.item()); made_here = 1\n"
    sweep(ip, "--var batch_size --sizes 16,64 --samples 128 --noise-batches 4", body)
    ns = ip.user_ns
    for k, v in ns["weights_before"].items():
        assert torch.equal(ns["model"].state_dict()[k], v), k
    now = ns["opt"].state_dict()
    for i, st in ns["opt_before"]["state"].items():
        assert torch.equal(now["state"][i]["momentum_buffer"], st["momentum_buffer"])
    assert now["param_groups"][0]["lr"] == 0.1
    assert torch.equal(torch.get_rng_state(), ns["rng_before"])
    assert ns["history"] == [1, 2]
    assert ns["batch_size"] == 32
    assert set(ns) - names_before <= {"_", "__", "___"} | {n for n in ns if n.startswith("_")}


def test_recorded_losses_are_the_loops_own(ip, setup):
    SEEN.clear()
    own = SEEN
    ip.push({"record": lambda b, v: SEEN.append((b, v))})
    body = LOOP + "    record(batch_size, loss.item())\n"
    res = sweep(ip, "--var batch_size --sizes 16,64 --samples 200 --noise-batches 4", body)
    for run in res.runs:
        # the noise scale's steps come first; the step that reaches the target is stopped from the
        # optimizer's hook, before the loop records it
        mine = [v for b, v in own if b == run.batch_size][-(run.steps - 1):]
        assert list(run.losses[:-1]) == pytest.approx(mine)
        assert run.steps > 3


def test_a_size_that_runs_out_of_memory_is_a_result(ip, setup):
    ip.run_cell("model = nn.Sequential(nn.Linear(8, 4096), nn.ReLU(), nn.Linear(4096, 3))\n"
                "opt = torch.optim.SGD(model.parameters(), lr=0.1)").raise_error()
    res = sweep(ip, "--var batch_size --sizes 4,512 --samples 64 -d cpu --budget 2MiB --noise-batches 4")
    small, big = res.runs
    assert small.oom is None
    assert big.oom is not None
    assert "OutOfMemoryError" in big.oom
    assert res.recommended == 4
    assert "out of memory" in res.to_text()


def test_val_is_evaluated_once_per_run(ip, setup):
    CALLS.clear()
    calls = CALLS

    def evaluate(b: int) -> float:
        CALLS.append(b)
        return 1.0 / b

    ip.push({"evaluate": evaluate})
    res = sweep(ip, '--var batch_size --sizes 8,32 --samples 64 --noise-batches 4 --val "evaluate(batch_size)" '
                    "--val-name accuracy")
    assert calls == [8, 32]
    assert [r.val for r in res.runs] == [pytest.approx(1 / 8), pytest.approx(1 / 32)]
    assert res.val_higher_is_better
    assert res.recommended == 8
    assert "accuracy" in res.why


def test_the_whole_data_set_in_one_batch_is_said(ip, setup):
    res = sweep(ip, "--var batch_size --sizes 32,128,512 --noise-batches 4")
    assert res.full_batch
    assert res.dataset_size == 512
    assert "the whole data set (512 samples) fits in one batch" in res.to_text()


def test_an_error_in_the_cell_is_the_users_and_the_state_is_back(ip, setup):
    ip.run_cell("w = model[0].weight.detach().clone()").raise_error()
    body = LOOP + "    if batch_size == 64: raise ValueError('bad data')\n"
    with capture_output():
        r = ip.run_cell("%%batch_sweep --var batch_size --sizes 16,64 --samples 128 --noise-batches 4\n" + body)
    assert isinstance(r.error_in_exec, ValueError)
    assert torch.equal(ip.user_ns["model"][0].weight, ip.user_ns["w"])


def test_the_line_magic_alone_sweeps_the_previous_cell(ip, setup):
    ip.run_cell(LOOP, store_history=True).raise_error()
    with capture_output():
        r = ip.run_cell("%batch_sweep --var batch_size --sizes 16,64 --samples 64 --noise-batches 4 -o",
                        store_history=True)
    r.raise_error()
    assert r.result.sizes == (16, 64)


@pytest.mark.parametrize(("line", "message"), [
    ("--var batch_size --sizes 0,16", "--sizes must be integers >= 1"),
    ("--var batch_size --sizes a,b", "--sizes must be integers"),
    ("--var batch_size --sizes 16 --samples 10 --seconds 1", "--samples or --seconds"),
    ("--sizes 16", "--var NAME is required"),
    ("--var nope --sizes 16", "never reads a variable"),
    ("--var batch_size --sizes 16 --val 'model(('", "--val"),
])
def test_bad_options_are_usage_errors(ip, setup, line, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        ip.run_cell_magic("batch_sweep", line, LOOP)


def test_the_result_shows_as_text_and_html(ip, setup):
    res = sweep(ip, "--var batch_size --sizes 16,64 --samples 64 --noise-batches 4")
    text, html = res.to_text(), res._repr_html_()
    for size in ("b=16", "b=64"):
        assert size in text
        assert size in html
    assert "recommended" in repr(res)
    df = res.to_dataframe()
    assert set(df["batch_size"]) == {16, 64}
    assert len(df) == sum(r.steps for r in res.runs)


@pytest.mark.slow
def test_without_sizes_they_come_from_what_fits(ip, setup):
    ip.run_cell("model = nn.Sequential(nn.Linear(8, 1024), nn.ReLU(), nn.Linear(1024, 3))\n"
                "opt = torch.optim.SGD(model.parameters(), lr=0.1)").raise_error()
    res = sweep(ip, "--var batch_size -d cpu --budget 3MiB --samples 64 --noise-batches 4")
    assert len(res.runs) >= 3
    top = res.sizes[-1]
    assert all(r.oom is None for r in res.runs)
    assert res.sizes[-2] <= top / 2
    assert any("sizes chosen from what fits" in n for n in res.notes)


def test_the_python_api_sweeps_a_function(ip):
    from torch.utils.data import DataLoader, TensorDataset

    import gpumagic

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(256, 4), torch.randn(256, 1))
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = model.weight.detach().clone()

    def train(b: int) -> None:
        for x, y in DataLoader(data, batch_size=b, shuffle=True):
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    res = gpumagic.batch_sweep(train, sizes=[8, 32], samples=64, base_batch_size=8, noise_batches=4,
                               val=lambda: 0.5, device="cpu", restore=[model, opt])
    assert res.sizes == (8, 32)
    assert res.run(32).lrs == (pytest.approx(0.2),)
    assert [r.val for r in res.runs] == [0.5, 0.5]
    assert torch.equal(model.weight, before)
    with pytest.raises(ValueError, match="sizes must be integers >= 1, got \\[0\\]"):
        gpumagic.batch_sweep(train, sizes=[0], device="cpu", restore=[model, opt])


def test_a_loop_without_a_data_set_length_stops_at_the_smallest_runs_samples(ip, setup):
    body = """
X_all, y_all = data.tensors
for step in range(12):
    idx = torch.randint(0, 512, (batch_size,))
    loss = F.cross_entropy(model(X_all[idx]), y_all[idx])
    opt.zero_grad(); loss.backward(); opt.step()
"""
    res = sweep(ip, "--var batch_size --sizes 8,32 --noise-batches 4", body)
    assert [r.total_samples for r in res.runs] == [96, 96]
    assert any("no data set length" in n for n in res.notes)


def test_a_scheduler_that_computes_from_base_rates_is_scaled_too(ip, setup):
    SEEN.clear()
    seen = SEEN
    ip.push({"record": lambda b, lr: SEEN.append((b, lr))})
    ip.run_cell("sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0)").raise_error()
    body = LOOP + "    sched.step(); record(batch_size, opt.param_groups[0]['lr'])\n"
    sweep(ip, "--var batch_size --sizes 16,64 --samples 128 --noise-batches 4", body)
    assert {b for b, _ in seen} == {16, 64}
    for b, lr in seen:
        assert lr == pytest.approx(0.1 * b / 32)
    assert ip.user_ns["sched"].base_lrs == [0.1]


def test_by_time_compares_the_losses_at_the_time_every_run_reached(ip, setup):
    res = sweep(ip, "--var batch_size --sizes 8,64 --seconds 0.5 --by time --noise-batches 4")
    assert res.by == "time"
    assert res.seconds_target == 0.5
    assert res.samples_target is None
    for run in res.runs:
        assert run.seconds[-2] < 0.5 <= run.seconds[-1] or run.total_samples == 512
    assert re.search(r"reached the lowest loss \([\d.]+, smoothed\) for \d+\.\d s", res.why)


def test_a_failing_val_is_a_note_and_the_pick_goes_by_the_loss(ip, setup):
    res = sweep(ip, '--var batch_size --sizes 16,64 --samples 64 --noise-batches 4 --val "1/0"')
    assert [r.val for r in res.runs] == [None, None]
    assert any("ZeroDivisionError" in n for n in res.notes)
    assert "lowest loss" in res.why


def test_the_line_magic_runs_a_statement_after_the_double_dash(ip, setup):
    ip.run_cell("def train(model, bs):\n" + "\n".join("    " + line for line in
                                                    LOOP.replace("batch_size=batch_size", "batch_size=bs")
                                                    .strip().splitlines())
                ).raise_error()
    ip.run_cell("bs = 32").raise_error()
    with capture_output():
        r = ip.run_cell("%batch_sweep --var bs --sizes 8,32 --samples 64 --noise-batches 4 -o -- train(model, bs)")
    r.raise_error()
    assert [run.total_samples for run in r.result.runs] == [64, 64]
    assert [run.lrs for run in r.result.runs] == [(pytest.approx(0.025),), (pytest.approx(0.1),)]

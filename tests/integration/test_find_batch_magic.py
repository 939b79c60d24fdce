"""%find_batch / %%find_batch in a real IPython shell: results, restored state, faults."""

import pytest
import torch
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output

import gpumagic
from gpumagic.report import BatchSearchResult

MiB = 2**20
LOOP = """
loader = DataLoader(data, batch_size=batch_size, shuffle=True)
for x, y in loader:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
"""


def run(ip, src):
    return ip.run_cell(src, store_history=True)


@pytest.fixture
def setup(ip, clean_ns):
    run(ip, """
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0)
data = TensorDataset(torch.randn(2048, 64), torch.randint(0, 10, (2048,)))
model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
opt = torch.optim.Adam(model.parameters(), 1e-3)
for _ in range(2):
    l = F.cross_entropy(model(torch.randn(8, 64)), torch.randint(0, 10, (8,)))
    opt.zero_grad(); l.backward(); opt.step()
batch_size = 32
logged = [1.0]
step_count = 7
import copy
before_params = {k: v.clone() for k, v in model.state_dict().items()}
before_opt = copy.deepcopy(opt.state_dict())
before_rng = torch.get_rng_state().clone()
def same_state():
    now = opt.state_dict()
    return (all(torch.equal(v, before_params[k]) for k, v in model.state_dict().items())
            and all(torch.equal(now['state'][i]['exp_avg'], before_opt['state'][i]['exp_avg'])
                    and int(now['state'][i]['step']) == int(before_opt['state'][i]['step'])
                    for i in before_opt['state'])
            and torch.equal(torch.get_rng_state(), before_rng))
""")


def test_cell_magic_finds_a_size_and_restores_everything(ip, setup):
    body = LOOP + "logged.append(loss.item()); step_count += 1\n"
    with capture_output():
        r = run(ip, "%%find_batch --var batch_size -d cpu --budget 12MiB -o\n" + body)
    res = r.result
    assert r.error_in_exec is None
    assert isinstance(res, BatchSearchResult)
    assert 0 < len(res.trials) <= 8
    assert res.max_batch_size is not None
    assert res.max_batch_size <= 2048
    assert res.recommended_batch_size <= res.max_batch_size
    ns = ip.user_ns
    assert ns["batch_size"] == 32
    assert ns["logged"] == [1.0]
    assert ns["step_count"] == 7
    assert "loader" not in ns
    assert "x" not in ns
    assert ns["same_state"]()


def test_the_recommendation_runs_under_the_same_budget(ip, setup):
    with capture_output():
        res = run(ip, "%%find_batch --var batch_size -d cpu --budget 12MiB -o -q\n" + LOOP).result
        ip.user_ns["batch_size"] = res.recommended_batch_size
        r = run(ip, "%%gpumem -d cpu --budget 12MiB -q -o\n" + LOOP)
    assert r.error_in_exec is None
    assert r.result.peak_bytes <= 12 * MiB


def test_whole_data_set_in_one_batch_is_the_ceiling(ip, setup):
    with capture_output():
        res = run(ip, "%%find_batch --var batch_size -d cpu --budget 1GiB -o -q\n" + LOOP).result
    assert res.max_batch_size == 2048
    assert all(t.batch_size <= 2048 for t in res.trials)


def test_loader_built_earlier_is_rebuilt_per_trial_and_restored(ip, setup):
    run(ip, "train_loader = DataLoader(data, batch_size=16, shuffle=True)\n"
            "def train(m, dl):\n"
            "    for x, y in dl:\n"
            "        loss = F.cross_entropy(m(x), y)\n"
            "        opt.zero_grad(); loss.backward(); opt.step()\n")
    original = ip.user_ns["train_loader"]
    with capture_output():
        r = run(ip, "%find_batch --loader train_loader -d cpu --budget 12MiB -o -q -- train(model, train_loader)")
    assert r.error_in_exec is None, r.error_in_exec
    res = r.result
    assert res.max_batch_size is not None
    assert res.max_batch_size > 16
    assert ip.user_ns["train_loader"] is original
    assert ip.user_ns["same_state"]()


def test_variable_that_does_not_reach_the_loader_says_use_loader(ip, setup):
    run(ip, "fixed_loader = DataLoader(data, batch_size=16)")
    with capture_output():
        r = run(ip, "%%find_batch --var batch_size -d cpu --budget 12MiB\n"
                    "for x, y in fixed_loader:\n"
                    "    loss = F.cross_entropy(model(x), y)\n"
                    "    opt.zero_grad(); loss.backward(); opt.step()\n")
    assert isinstance(r.error_in_exec, UsageError)
    assert "--loader" in str(r.error_in_exec)
    assert ip.user_ns["same_state"]()


def test_line_magic_without_statement_reruns_the_last_gpumem_cell(ip, setup):
    with capture_output():
        run(ip, "%%gpumem -d cpu -q\n" + LOOP)
        r = run(ip, "%find_batch --var batch_size -d cpu --budget 12MiB -o -q")
    assert r.error_in_exec is None, r.error_in_exec
    assert r.result.max_batch_size is not None


def test_an_error_in_user_code_stops_the_search_and_restores(ip, setup):
    with capture_output():
        r = run(ip, "%%find_batch --var batch_size -d cpu --budget 12MiB\n"
                    "opt.zero_grad(); F.cross_entropy(model(torch.randn(batch_size, 64)), "
                    "torch.randint(0, 10, (batch_size,))).backward(); opt.step()\n"
                    "raise ValueError('bug in the loop')\n")
    assert isinstance(r.error_in_exec, ValueError)
    assert ip.user_ns["same_state"]()
    assert ip.user_ns["batch_size"] == 32


def test_ctrl_c_mid_trial_restores_state(ip, setup):
    with capture_output():
        r = run(ip, "%%find_batch --var batch_size -d cpu --budget 12MiB\n"
                    "opt.zero_grad(); F.cross_entropy(model(torch.randn(batch_size, 64)), "
                    "torch.randint(0, 10, (batch_size,))).backward(); opt.step()\n"
                    "if batch_size > 8: raise KeyboardInterrupt\n")
    assert isinstance(r.error_in_exec, KeyboardInterrupt)
    assert ip.user_ns["same_state"]()
    assert ip.user_ns["batch_size"] == 32
    assert gpumagic.tracking.active_tracker() is None


def test_a_loop_that_never_steps_the_optimizer_counts_backward_calls(ip, setup):
    with capture_output():
        r = run(ip, "%%find_batch --var batch_size -d cpu --budget 12MiB -o -q\n"
                    "for i in range(100):\n"
                    "    model.zero_grad()\n"
                    "    out = model(torch.randn(batch_size, 64))\n"
                    "    F.cross_entropy(out, torch.randint(0, 10, (batch_size,))).backward()\n")
    assert r.error_in_exec is None, r.error_in_exec
    assert all(t.steps <= 3 * 16 for t in r.result.trials)  # cut, not the loop's 100
    assert any("no optimizer.step()" in n for n in r.result.notes)
    assert ip.user_ns["same_state"]()


def test_oom_mid_step_is_a_trial_not_an_error(ip, setup):
    with capture_output():
        r = run(ip, "%%find_batch --var batch_size -d cpu --budget 6MiB --start 4096 -o -q\n" + LOOP)
    assert r.error_in_exec is None, r.error_in_exec
    assert r.result.trials[0].oom
    assert ip.user_ns["same_state"]()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("-d cpu --budget 8MiB", "--var NAME"),
        ("--var 'x y' -d cpu --budget 8MiB", "--var must be a Python name"),
        ("--var batch_size -d cpu --budget 8MiB --steps 0", "--steps must be >= 1, got 0"),
        ("--var batch_size -d cpu --budget 8MiB --pick fastest", "invalid choice"),
        ("--loader nope -d cpu --budget 8MiB", "'nope' is not defined"),
        ("--loader batch_size -d cpu --budget 8MiB", "must name a torch DataLoader"),
        ("--var batch_size -d cpu --budget 8MiB --margin 0.9", "margin must be in"),
    ],
)
def test_bad_options_are_usage_errors(ip, setup, line, message):
    with capture_output():
        r = run(ip, f"%%find_batch {line}\n" + LOOP)
    assert isinstance(r.error_in_exec, UsageError), r.error_in_exec
    assert message in str(r.error_in_exec)


def test_effective_batch_gives_micro_batch_accumulation_and_lr_rule(ip, setup):
    with capture_output():
        res = run(ip, "%%find_batch --var batch_size -d cpu --budget 8MiB --effective 2048 -o -q\n" + LOOP).result
    assert res.effective_batch_size is not None
    assert res.effective_batch_size >= 2048
    assert res.recommended_batch_size * res.accumulation_steps == res.effective_batch_size
    assert "square-root" in res.lr_note or "keep the learning rate" in res.lr_note


def test_python_api_restores_what_it_finds_through_the_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 4)
    opt = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()

    def trial(b):
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(b, 32)).sum().backward()
            opt.step()

    res = gpumagic.find_batch(trial, device="cpu", budget="4MiB", progress=False)
    assert res.max_batch_size is not None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert opt.state_dict()["state"] == {}
    assert torch.equal(torch.get_rng_state(), rng)

"""Odd options, odd namespaces, odd models: refused clearly before any work, or handled.

Each test runs the magics in the real IPython shell.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
import torch
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output

from gpumagic import autoload, tracking

LOOP = "for _ in range(3):\n    opt.zero_grad(); F.cross_entropy(model(X[:bs]), Y[:bs]).backward(); opt.step()\n"


def run(ip, src):
    return ip.run_cell(src, store_history=True)


@pytest.fixture(autouse=True)
def _forget_results(ip):
    """The searches and reports here are not the notebook story of later tests (OOM advice reads them)."""
    yield
    presenter = ip.magics_manager.registry["GPUMagics"].presenter
    presenter.last_search = presenter.last_report = None


@pytest.fixture
def loop_ns(ip, clean_ns):
    run(ip, """
torch.manual_seed(0)
X = torch.randn(256, 16); Y = torch.randint(0, 4, (256,))
model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
opt = torch.optim.SGD(model.parameters(), 0.1)
bs = 8
trial_count = [0]
""")


# --- options ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("magic", ["%%gpumem -d cpu", "%%find_batch --var bs -d cpu"])
def test_a_budget_too_large_for_any_device_is_a_usage_error_naming_the_flag_and_the_range(ip, loop_ns, magic):
    r = run(ip, f"{magic} --budget 1e400\nran = bs\n")
    assert isinstance(r.error_in_exec, UsageError)
    assert str(r.error_in_exec) == "--budget must be between 1 byte and 8 EiB (2**63 - 1 bytes), got '1e400'"
    assert "ran" not in ip.user_ns


def test_min_alone_starts_the_search_at_min(ip, loop_ns):
    r = run(ip, "%%find_batch -q -o --var bs -d cpu --budget 64MiB --min 10 --max 40\n" + LOOP)
    assert r.error_in_exec is None, r.error_in_exec
    assert r.result.trials[0].batch_size == 10
    assert min(t.batch_size for t in r.result.trials) >= 10


def test_max_alone_below_the_default_start_runs_at_max(ip, loop_ns):
    r = run(ip, "%%find_batch -q -o --var bs -d cpu --budget 64MiB --max 1\n" + LOOP)
    assert r.error_in_exec is None, r.error_in_exec
    assert {t.batch_size for t in r.result.trials} == {1}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("--min 8 --max 4", "--min (8) is larger than --max (4)"),
        ("--start 2 --min 4", "--start must be >= --min (4), got 2"),
        ("--start 16 --max 8", "--start must be <= --max (8), got 16"),
        ("--min 0", "--min must be >= 1, got 0"),
        ("--margin 0.7", "--margin must be in [0, 0.5), got 0.7"),
    ],
)
def test_bad_bounds_are_refused_in_the_flags_names_before_any_trial(ip, loop_ns, options, message):
    r = run(ip, f"%%find_batch --var bs -d cpu --budget 64MiB {options}\ntrial_count[0] += 1\n" + LOOP)
    assert isinstance(r.error_in_exec, UsageError)
    assert str(r.error_in_exec) == message
    assert ip.user_ns["trial_count"] == [0]


@pytest.mark.parametrize(
    ("line", "first"),
    [("%%gpumem --help", "%gpumem [-d DEVICE]"), ("%%find_batch --help", "%find_batch [--var VAR]"),
     ("%gpumon -h", "%gpumon [--interval INTERVAL]")],
)
def test_help_option_shows_the_help_like_a_question_mark_and_runs_nothing(ip, clean_ns, line, first):
    with capture_output() as cap:
        r = run(ip, f"{line}\nran = True\n" if line.startswith("%%") else line)
    assert r.error_in_exec is None
    assert first in cap.stdout
    assert "ran" not in ip.user_ns


def test_a_var_the_code_never_reads_is_refused_before_any_trial(ip, loop_ns):
    r = run(ip, "%%find_batch --var batch_size -d cpu --budget 64MiB\ntrial_count[0] += 1\n" + LOOP)
    assert isinstance(r.error_in_exec, UsageError)
    assert str(r.error_in_exec).startswith(
        "--var 'batch_size': the code never reads a variable of that name, and no variable of that name exists;"
    )
    assert "integers it reads: bs" in str(r.error_in_exec)
    assert ip.user_ns["trial_count"] == [0]


def test_a_var_that_exists_but_is_never_read_is_refused_as_such(ip, loop_ns):
    run(ip, "batch_size = 32")
    r = run(ip, "%%find_batch --var batch_size -d cpu --budget 64MiB\n" + LOOP)
    assert isinstance(r.error_in_exec, UsageError)
    assert str(r.error_in_exec).startswith("--var 'batch_size': the code never reads a variable of that name;")


def test_a_var_read_inside_a_function_from_an_earlier_cell_is_accepted(ip, loop_ns):
    run(ip, "def train():\n    " + LOOP.replace("\n    ", "\n        "))
    r = run(ip, "%%find_batch -q -o --var bs -d cpu --budget 64MiB --max 32\ntrain()\n")
    assert r.error_in_exec is None, r.error_in_exec
    assert r.result.max_batch_size == 32


# --- odd models --------------------------------------------------------------------------------------


def test_a_dynamically_quantized_model_in_the_namespace_is_restored(ip, loop_ns):
    # torch warns that its quantization API moves; the search itself must warn about nothing
    r = run(ip, "import warnings\nwith warnings.catch_warnings():\n    warnings.simplefilter('ignore')\n"
                "    qm = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(8, 8)), {nn.Linear}, "
                "dtype=torch.qint8)\n    q_before = qm(torch.ones(1, 8))")
    assert r.error_in_exec is None, r.error_in_exec
    r = run(ip, "%%find_batch -q -o --var bs -d cpu --budget 64MiB --max 32\n" + LOOP)
    assert r.error_in_exec is None, r.error_in_exec
    assert r.result.max_batch_size == 32
    assert not any("could not" in n for n in r.result.notes)
    assert torch.equal(ip.user_ns["qm"](torch.ones(1, 8)), ip.user_ns["q_before"])


LOOPING = '''
class Looping(torch.Tensor):
    """A subclass whose copy recurses forever: it can be used, never copied."""
    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=inner.device)
    def __init__(self, inner):
        self.inner = inner
    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default or func is torch.ops.aten.clone.default:
            return func(*args, **(kwargs or {}))
        unwrap = lambda a: a.inner if isinstance(a, Looping) else a
        out = func(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in (kwargs or {}).items()})
        return Looping(out) if isinstance(out, torch.Tensor) else out
'''


def test_an_object_that_cannot_be_copied_does_not_stop_the_search_or_the_restore(ip, loop_ns):
    # the undo log copies only what a trial writes: a buffer that cannot be copied is never asked to be
    run(ip, LOOPING + "odd_model = nn.Linear(2, 2)\nodd_model.register_buffer('scale', Looping(torch.ones(2)))\n"
                      "odd_opt = torch.optim.SGD(odd_model.parameters(), 0.1)\n"
                      "odd_before = odd_model.weight.detach().clone()")
    r = run(ip, "%%find_batch -q -o --var bs -d cpu --budget 64MiB --max 32\n" + LOOP)
    assert r.error_in_exec is None, r.error_in_exec
    assert r.result.max_batch_size == 32
    assert not any("could not" in n for n in r.result.notes)
    assert torch.equal(ip.user_ns["odd_model"].weight.detach(), ip.user_ns["odd_before"])


SCALED = '''
class Scaled(torch.Tensor):
    """A wrapper subclass that flattens to its inner tensor, as PyTorch's subclass guide shows."""
    @staticmethod
    def __new__(cls, elem):
        return torch.Tensor._make_wrapper_subclass(cls, elem.shape, dtype=elem.dtype, device=elem.device,
                                                   requires_grad=elem.requires_grad)
    def __init__(self, elem):
        self.elem = elem
    def __tensor_flatten__(self):
        return ["elem"], None
    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return Scaled(inner["elem"])
    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        un = lambda a: a.elem if isinstance(a, Scaled) else a
        out = func(*torch.utils._pytree.tree_map(un, args), **torch.utils._pytree.tree_map(un, kwargs or {}))
        return torch.utils._pytree.tree_map(lambda o: Scaled(o) if isinstance(o, torch.Tensor) else o, out)
'''


def test_a_wrapper_subclass_defined_in_the_cell_is_searched_and_the_namespace_restored(ip, loop_ns):
    before = set(ip.user_ns)
    w_before = model_weight = ip.user_ns["model"][0].weight
    r = run(ip, "%%find_batch -q -o --var bs -d cpu --budget 64MiB --max 32\n" + SCALED
                + "model[0].weight = nn.Parameter(Scaled(model[0].weight.detach().clone()))\n" + LOOP)
    assert r.error_in_exec is None, r.error_in_exec
    assert r.result.max_batch_size == 32
    assert set(ip.user_ns) - before <= {"_", "__", "___"} | {n for n in ip.user_ns if n.startswith("_")}
    assert ip.user_ns["model"][0].weight is w_before is model_weight
    assert type(ip.user_ns["model"][0].weight) is torch.nn.Parameter


def test_a_tiny_model_whose_peaks_differ_by_kilobytes_is_not_called_flat(ip, loop_ns):
    # peaks of 23.5, 27.2 and 29.8 KiB at 2, 16 and 32: less than 16 KiB apart, yet clearly growing
    r = run(ip, "%%find_batch -q -o --var bs -d cpu --budget 64MiB --max 32\n" + LOOP)
    assert r.error_in_exec is None, r.error_in_exec
    assert "does not change memory" not in r.result.reason
    assert r.result.max_batch_size == 32
    assert r.result.fit is not None
    assert r.result.fit.bytes_per_sample > 0


# --- step times ---------------------------------------------------------------------------------------


def test_step_times_exclude_the_trackers_own_record_merging(ip, clean_ns, monkeypatch):
    original = tracking._Records._halve

    def slow_halve(self):  # stands for the merge of a long loop's records (0.1-0.16 s measured)
        time.sleep(0.2)
        original(self)

    monkeypatch.setattr(tracking._Records, "_halve", slow_halve)
    run(ip, "import gpumagic\nm = nn.Linear(4, 1); o = torch.optim.SGD(m.parameters(), 0.1); x = torch.randn(4, 4)")
    r = run(ip, "with gpumagic.track(device='cpu', max_records=4) as t:\n"
                "    for _ in range(40):\n        o.zero_grad(); m(x).sum().backward(); o.step()\n"
                "t.report")
    rep = r.result
    assert rep.total_steps == 40
    assert rep.incomplete is None
    assert any(s.count > 1 for s in rep.steps)  # merges happened
    assert sum(s.seconds for s in rep.steps) < 0.2  # 40 tiny steps; each merge alone would take 0.2 s


# --- autoload -----------------------------------------------------------------------------------------


def test_autoload_enable_refuses_a_read_only_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = autoload.config_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text('{"InteractiveShellApp": {"extra_extensions": ["other"]}}\n', encoding="utf-8")
    os.chmod(path, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    try:
        assert autoload.main(["enable", "--prefix", str(tmp_path)]) == 2
    finally:
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    err = capsys.readouterr().err
    assert err.startswith(f"gpumagic.autoload: error: {path}: read-only (mode 444)")
    assert path.read_text(encoding="utf-8") == '{"InteractiveShellApp": {"extra_extensions": ["other"]}}\n'

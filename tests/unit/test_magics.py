"""%%gpumem and friends in a real IPython shell."""

import pytest
import torch
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output

from gpumagic import magics as gm
from gpumagic import tracking

MiB = 2**20


def run(ip, src):
    return ip.run_cell(src, store_history=True)


@pytest.fixture
def loop(ip, clean_ns):
    run(ip, """
torch.manual_seed(0)
X = torch.randn(256, 32); Y = torch.randint(0, 4, (256,))
model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
opt = torch.optim.Adam(model.parameters(), 1e-3)
def train(n, bs=16):
    out = []
    for i in range(n):
        loss = F.cross_entropy(model(X[i*bs:(i+1)*bs]), Y[i*bs:(i+1)*bs])
        opt.zero_grad(); loss.backward(); opt.step(); out.append(loss.item())
    return out
""")


def test_cell_magic_returns_the_report_with_exact_peak(ip, clean_ns):
    r = run(ip, "%%gpumem -o -q -d cpu\n"
               "a = torch.empty(2**20, dtype=torch.uint8)\nb = torch.empty(2**21, dtype=torch.uint8)\n")
    assert r.error_in_exec is None
    rep = r.result
    assert rep.peak_delta_bytes == 3 * MiB
    assert rep.backend == "cpu"
    assert rep.device == "cpu"


def test_loop_in_a_function_from_an_earlier_cell_records_its_losses(ip, loop):
    r = run(ip, "%%gpumem -o -q -d cpu\ntruth = train(5)\n")
    assert r.error_in_exec is None
    assert list(r.result.losses) == pytest.approx(ip.user_ns["truth"])
    assert len(r.result.steps) == 5


def test_without_o_the_cell_value_is_the_result_and_the_report_is_displayed(ip, clean_ns):
    with capture_output() as cap:
        r = run(ip, "%%gpumem -d cpu\nx = torch.ones(10)\n41 + 1\n")
    assert r.result == 42
    assert any("text/html" in o.data and "gpumagic memory report" in o.data["text/html"] for o in cap.outputs)


def test_quiet_shows_nothing(ip, clean_ns):
    with capture_output() as cap:
        run(ip, "%%gpumem -q -d cpu\nx = torch.ones(10)\n")
    assert cap.outputs == []
    assert cap.stdout == ""


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("-d tpu", "'tpu'"),
        ("-d cpu --budget lots", "'lots'"),
        ("-d cpu --free", "--free is for the line magic"),
        ("-d cpu --frobnicate", "unrecognized arguments"),
    ],
)
def test_bad_arguments_raise_usage_error_and_do_not_run_the_cell(ip, clean_ns, line, message):
    r = run(ip, f"%%gpumem {line}\nran = True\n")
    assert isinstance(r.error_in_exec, UsageError)
    assert message in str(r.error_in_exec)
    assert "ran" not in ip.user_ns


def test_empty_cell_is_a_usage_error(ip):
    with pytest.raises(UsageError, match="needs a cell body"):
        ip.run_cell_magic("gpumem", "-d cpu", "   \n")


def test_line_magic_shows_the_device_now(ip, clean_ns):
    status = ip.run_line_magic("gpumem", "-d cpu -o")
    assert status.backend == "cpu"
    assert status.allocated_bytes >= 0
    assert status.total_bytes
    assert status.free_bytes is not None
    assert "allocated" in repr(status)


def test_free_lists_the_names_still_holding_memory(ip, clean_ns):
    run(ip, "holder = torch.empty(3 * 2**20, dtype=torch.uint8)")
    status = ip.run_line_magic("gpumem", "--free -d cpu -o")
    assert any("'holder'" in n and "3.00 MiB" in n for n in status.notes)


def test_budget_on_the_line_magic_is_refused(ip):
    with pytest.raises(UsageError, match="--budget applies to the cell magic"):
        ip.run_line_magic("gpumem", "-d cpu --budget 1GiB")


@pytest.mark.parametrize("exc", ["ValueError('boom')", "KeyboardInterrupt()"])
def test_errors_in_the_cell_reach_the_user_and_remove_every_hook(ip, clean_ns, exc):
    before = torch.autograd.backward
    with capture_output() as cap:
        r = run(ip, f"%%gpumem -d cpu\nx = torch.ones(1000)\nraise {exc}\n")
    assert type(r.error_in_exec).__name__ == exc.split("(")[0]
    assert torch.autograd.backward is before
    assert tracking.active_tracker() is None
    assert not torch.utils._python_dispatch._get_current_dispatch_mode_stack()
    if exc.startswith("ValueError"):  # the partial report is shown
        assert any("stopped by" in o.data.get("text/html", "") for o in cap.outputs)


def test_line_magics_inside_the_cell_work(ip, clean_ns):
    r = run(ip, "%%gpumem -o -q -d cpu\nx = torch.ones(4)\n%time y = x + 1\n")
    assert r.error_in_exec is None
    assert ip.user_ns["y"].tolist() == [2.0] * 4


def test_default_device_follows_the_models_in_the_namespace(ip, loop):
    r = run(ip, "%%gpumem -o -q\ntrain(1)\n")
    assert r.result.device == "cpu"


def test_unload_removes_magics_and_handler_and_reload_is_idempotent(ip):
    handler_before = ip.CustomTB
    exc_before = ip.custom_exceptions
    ip.run_line_magic("reload_ext", "gpumagic")
    ip.run_line_magic("reload_ext", "gpumagic")
    assert ip.find_cell_magic("gpumem") is not None
    ip.run_line_magic("unload_ext", "gpumagic")
    try:
        assert ip.find_cell_magic("gpumem") is None
        assert ip.find_line_magic("find_batch") is None
        assert ip.find_line_magic("gpumon") is None
        assert Exception not in ip.custom_exceptions
    finally:
        ip.run_line_magic("load_ext", "gpumagic")
    assert ip.find_cell_magic("gpumem") is not None
    assert ip.custom_exceptions == exc_before or Exception in ip.custom_exceptions
    del handler_before


def test_oom_handler_chains_to_and_restores_a_previous_handler(ip, clean_ns):
    seen = []

    def mine(shell, etype, value, tb, tb_offset=None):
        seen.append(etype)
        return ["handled by mine"]

    ip.run_line_magic("gpumagic", "oom off")
    ip.set_custom_exc((KeyError,), mine)
    try:
        ip.run_line_magic("gpumagic", "oom on")
        with capture_output():
            run(ip, "raise KeyError('k')")
        assert seen == [KeyError]
        ip.run_line_magic("gpumagic", "oom off")
        assert ip.custom_exceptions == (KeyError,)
    finally:
        ip.set_custom_exc((), None)
        ip.run_line_magic("gpumagic", "oom on")


def test_gpumagic_status_and_bad_usage(ip, capsys):
    ip.run_line_magic("gpumagic", "status")
    assert "OOM translation in every cell on" in capsys.readouterr().out
    with pytest.raises(UsageError, match="usage: %gpumagic oom on\\|off"):
        ip.run_line_magic("gpumagic", "oom maybe")


@pytest.mark.filterwarnings("ignore")
def test_lightning_trainer_fit_records_the_training_losses(ip, clean_ns):
    pytest.importorskip("lightning")
    run(ip, """
import lightning as L
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0)
seen_losses = []
class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__(); self.net = nn.Linear(8, 2)
    def training_step(self, batch, i):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        seen_losses.append(loss.item())
        return loss
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), 0.1)
dl = DataLoader(TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,))), batch_size=16)
trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
""")
    r = run(ip, "%%gpumem -o -q -d cpu\ntrainer.fit(Tiny(), dl)\n")
    assert r.error_in_exec is None, r.error_in_exec
    assert list(r.result.losses) == pytest.approx(ip.user_ns["seen_losses"])
    assert len(r.result.steps) == 4
    assert [s.batch_size for s in r.result.steps] == [16, 16, 16, 16]


def test_run_cell_source_returns_the_last_expression(ip, clean_ns):
    assert gm.run_cell_source(ip, "a = 2\na * 21") == 42
    assert gm.run_cell_source(ip, "b = 1") is None


@pytest.mark.parametrize("raise_", [
    'raise OSError(12, "Cannot allocate memory")',  # the host: fork() of DataLoader workers, mmap
    'raise ValueError("The model\'s max seq len (32768) is larger than the maximum number of tokens that can be '
    'stored in KV cache (2048). Try increasing `gpu_memory_utilization` or decreasing `max_model_len` when '
    'initializing the engine.")',  # vLLM's capacity check
])
def test_an_out_of_memory_error_of_any_type_is_explained_and_keeps_its_type(ip, clean_ns, raise_):
    with capture_output() as cap:
        r = run(ip, raise_)
    assert type(r.error_in_exec).__name__ == raise_.split("(")[0].split()[-1]
    advice = getattr(r.error_in_exec, "advice", None)
    assert advice is not None, cap.stdout
    assert advice.suggestions
    assert "(full traceback: %tb)" in cap.stdout  # the short traceback, as for a CUDA OOM


def test_an_ordinary_error_shows_as_without_gpumagic(ip, clean_ns):
    with capture_output() as cap:
        r = run(ip, "raise KeyError('nope')")
    assert isinstance(r.error_in_exec, KeyError)
    assert getattr(r.error_in_exec, "advice", None) is None
    assert "KeyError" in cap.stdout + cap.stderr

"""gpumagic.track on CPU: exact bytes, steps and losses, budget OOMs, and hooks always removed."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gpumagic
from gpumagic import tracking
from gpumagic.backends.cpu_exact import CPUSession, live_tracker_bytes

MiB = 2**20


def _fresh():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 4))


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    return torch.randn(512, 32), torch.randint(0, 4, (512,))


def _hooks_state():
    import torch.optim.optimizer as optmod
    import torch.utils.data.dataloader as dl

    return (
        torch.autograd.backward,
        dl._BaseDataLoaderIter.__dict__["__next__"],
        dl.DataLoader.__dict__["__iter__"],
        dl._MultiProcessingDataLoaderIter.__dict__["_shutdown_workers"],
        torch.amp.GradScaler.__dict__["scale"],
        torch.amp.GradScaler.__dict__["step"],
        len(optmod._global_optimizer_pre_hooks),
        len(optmod._global_optimizer_post_hooks),
        torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is None,
        len(torch.utils._python_dispatch._get_current_dispatch_mode_stack()),
    )


def test_known_allocations_are_counted_exactly():
    with gpumagic.track(device="cpu") as t:
        a = torch.empty(MiB, dtype=torch.uint8)
        b = torch.empty(3 * MiB, dtype=torch.uint8)
        del a
        c = torch.empty(MiB, dtype=torch.uint8)
    r = t.report
    assert r.peak_delta_bytes == 4 * MiB
    assert r.end_bytes - r.baseline_bytes == 4 * MiB
    assert r.steps == ()
    del b, c


def test_views_and_inplace_ops_are_not_new_memory():
    w = torch.ones(1024, 256)
    with gpumagic.track(device="cpu") as t:
        v = w.t()
        w.add_(1.0)
        s = w[:10]
        v2 = w.view(-1)
    assert t.report.peak_delta_bytes == 0
    del v, s, v2


def test_tensors_alive_before_the_block_are_the_baseline_and_their_free_counts():
    big = torch.zeros(2 * MiB, dtype=torch.uint8)
    with gpumagic.track(device="cpu") as t:
        del big
    r = t.report
    assert r.baseline_bytes >= 2 * MiB
    assert r.baseline_bytes - r.end_bytes == 2 * MiB


def test_torch_tensor_from_python_data_is_counted():
    with gpumagic.track(device="cpu") as t:
        x = torch.tensor(list(range(1000)), dtype=torch.float64)
    assert t.report.peak_delta_bytes == 8000
    del x


def test_plain_loop_records_each_optimizer_step_with_its_loss(data):
    X, Y = data
    model = _fresh()
    opt = torch.optim.SGD(model.parameters(), 0.1)
    truth = []
    with gpumagic.track(device="cpu") as t:
        for i in range(12):
            loss = F.cross_entropy(model(X[i * 16 : (i + 1) * 16]), Y[i * 16 : (i + 1) * 16])
            opt.zero_grad()
            loss.backward()
            opt.step()
            truth.append(loss.item())
    r = t.report
    assert len(r.steps) == 12
    assert r.total_steps == 12
    assert r.losses == pytest.approx(truth, rel=1e-6)
    assert all(s.peak_bytes >= r.baseline_bytes for s in r.steps)
    assert all(s.seconds > 0 for s in r.steps)
    assert max(s.peak_bytes for s in r.steps) <= r.peak_bytes


def test_amp_scaled_backward_records_the_unscaled_loss(data):
    X, Y = data
    model = _fresh()
    opt = torch.optim.SGD(model.parameters(), 0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=65536.0)
    truth = []
    with gpumagic.track(device="cpu") as t:
        for i in range(5):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(X[i * 16 : (i + 1) * 16]), Y[i * 16 : (i + 1) * 16])
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            truth.append(loss.item())
    assert t.report.losses == pytest.approx(truth, rel=1e-5)


def test_accumulation_step_loss_is_the_mean_of_micro_batch_losses(data):
    X, Y = data
    model = _fresh()
    opt = torch.optim.SGD(model.parameters(), 0.1)
    k, truth = 4, []
    with gpumagic.track(device="cpu") as t:
        for i in range(3):
            acc = 0.0
            for j in range(k):
                s = (i * k + j) * 8
                loss = F.cross_entropy(model(X[s : s + 8]), Y[s : s + 8])
                (loss / k).backward()
                acc += loss.item() / k
            opt.step()
            opt.zero_grad()
            truth.append(acc)
    assert len(t.report.steps) == 3
    assert t.report.losses == pytest.approx(truth, rel=1e-6)


def test_undivided_backward_calls_before_one_step_give_the_sum_of_their_losses(data):
    X, Y = data
    model = _fresh()
    opt = torch.optim.SGD(model.parameters(), 0.01)
    with gpumagic.track(device="cpu") as t:
        losses = []
        for j in range(3):
            loss = F.cross_entropy(model(X[j * 8 : j * 8 + 8]), Y[j * 8 : j * 8 + 8])
            loss.backward()
            losses.append(loss.item())
        opt.step()
    assert t.report.losses == pytest.approx([sum(losses)], rel=1e-6)  # the gradient applied is their sum's


def test_closure_step_counts_once_with_the_value_step_returns(data):
    X, Y = data
    model = _fresh()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=10)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(X), Y)
        loss.backward()
        return loss

    with gpumagic.track(device="cpu") as t:
        truth = [opt.step(closure).item() for _ in range(2)]
    assert len(t.report.steps) == 2
    assert t.report.losses == pytest.approx(truth, rel=1e-6)


def test_without_optimizer_each_backward_is_a_step(data):
    X, Y = data
    model = _fresh()
    truth = []
    with gpumagic.track(device="cpu") as t:
        for i in range(7):
            loss = F.cross_entropy(model(X[i * 16 : (i + 1) * 16]), Y[i * 16 : (i + 1) * 16])
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(p.grad, alpha=-0.1)
            truth.append(loss.item())
    assert t.report.losses == pytest.approx(truth, rel=1e-6)


def test_evaluation_block_has_cell_figures_and_no_steps(data):
    X, _ = data
    model = _fresh()
    with torch.no_grad(), gpumagic.track(device="cpu") as t:
        model(X)
    assert t.report.steps == ()
    assert t.report.peak_delta_bytes > 0


def test_batch_size_comes_from_the_dataloader(data):
    X, Y = data
    model = _fresh()
    opt = torch.optim.SGD(model.parameters(), 0.1)
    loader = DataLoader(TensorDataset(X[:100], Y[:100]), batch_size=32)
    with gpumagic.track(device="cpu") as t:
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert [s.batch_size for s in t.report.steps] == [32, 32, 32, 4]


def test_without_a_dataloader_the_batch_size_is_the_inputs_leading_dimension_marked_as_a_guess(data):
    X, Y = data
    model = _fresh()
    opt = torch.optim.SGD(model.parameters(), 0.1)
    with gpumagic.track(device="cpu") as t:
        opt.zero_grad()
        F.cross_entropy(model(X[:8]), Y[:8]).backward()
        opt.step()
    step = t.report.steps[0]
    assert (step.batch_size, step.batch_size_guessed) == (8, True)


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.lin(x) @ w


def test_inputs_that_disagree_on_their_leading_dimension_give_no_batch_size():
    model = _TwoInputs()
    opt = torch.optim.SGD(model.parameters(), 0.1)
    with gpumagic.track(device="cpu") as t:
        model(torch.randn(8, 4), torch.randn(3, 5)).sum().backward()  # the inner call (8 rows) is not asked
        opt.step()
    assert t.report.steps[0].batch_size is None


def test_no_module_hook_is_left_after_the_block(data):
    from torch.nn.modules import module

    before = dict(module._global_forward_pre_hooks)
    with gpumagic.track(device="cpu"):
        _fresh()(data[0][:4])
    assert dict(module._global_forward_pre_hooks) == before


def test_breakdown_splits_parameters_gradients_and_optimizer_state(data):
    X, Y = data
    model = _fresh()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    n_params = sum(p.numel() * 4 for p in model.parameters())
    with gpumagic.track(device="cpu") as t:
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(X[:64]), Y[:64]).backward()
            opt.step()
    b = t.report.breakdown
    assert b is not None
    assert b.parameters_bytes == n_params
    assert b.gradients_bytes == n_params
    assert b.optimizer_state_bytes >= 2 * n_params  # exp_avg and exp_avg_sq (+ step counters)


def test_budget_raises_a_genuine_cuda_worded_oom_and_keeps_a_partial_report():
    t = gpumagic.track(device="cpu", budget="64MiB")
    with pytest.raises(torch.OutOfMemoryError, match=r"CUDA out of memory\. Tried to allocate 4\.00 MiB") as e, t:
        xs = [torch.empty(4 * MiB, dtype=torch.uint8) for _ in range(100)]
    assert "total capacity of 64.00 MiB" in str(e.value)
    assert "simulated by gpumagic" in str(e.value)
    r = t.report
    assert r.error.startswith("OutOfMemoryError")
    assert r.peak_bytes <= 64 * MiB
    assert r.budget_bytes == 64 * MiB
    assert r.capacity_bytes == 64 * MiB
    del e
    assert "xs" not in locals()


def test_simulated_oom_is_recognised_by_lightning_and_accelerate_rules():
    with pytest.raises(torch.OutOfMemoryError) as e, gpumagic.track(device="cpu", budget=MiB):
        torch.empty(2 * MiB, dtype=torch.uint8)
    msg = str(e.value)
    assert isinstance(e.value, RuntimeError)
    assert len(e.value.args) == 1
    assert "CUDA" in msg
    assert "out of memory" in msg
    assert " out of memory." in msg  # Accelerate's should_reduce_batch_size


def test_hooks_and_mode_are_removed_after_the_block():
    before = _hooks_state()
    with gpumagic.track(device="cpu"):
        assert live_tracker_bytes() is not None
        assert torch.autograd.backward is not before[0]
    assert _hooks_state() == before
    assert live_tracker_bytes() is None
    assert tracking.active_tracker() is None


@pytest.mark.parametrize("exc", [ValueError("boom"), KeyboardInterrupt()])
def test_hooks_are_removed_when_the_block_raises(exc):
    before = _hooks_state()
    def block(t):
        with t:
            torch.ones(10)
            raise exc

    t = gpumagic.track(device="cpu")
    with pytest.raises(type(exc)):
        block(t)
    assert _hooks_state() == before
    assert t.report.error is None or t.report.error.startswith(type(exc).__name__)


def test_nested_tracking_is_refused_with_a_clear_message():
    with gpumagic.track(device="cpu"), pytest.raises(RuntimeError, match="nested"), gpumagic.track(device="cpu"):
        pass
    assert tracking.active_tracker() is None


def test_report_is_unavailable_while_the_block_runs():
    with gpumagic.track(device="cpu") as t, pytest.raises(RuntimeError, match="ready when"):
        t.report  # noqa: B018


def test_long_loops_are_downsampled_keeping_spikes_and_mean_loss():
    w = torch.ones(4, requires_grad=True)
    with gpumagic.track(device="cpu", max_records=8) as t:
        for i in range(40):
            loss = (w * (i + 1)).sum()
            if i == 13:
                spike = torch.empty(MiB, dtype=torch.uint8)
                del spike
            loss.backward()
    r = t.report
    assert r.total_steps == 40
    assert len(r.steps) < 8
    assert sum(s.count for s in r.steps) == 40
    assert max(s.peak_bytes for s in r.steps) - r.baseline_bytes >= MiB
    mean_loss = sum(s.loss * s.count for s in r.steps) / 40
    assert mean_loss == pytest.approx(sum(4 * (i + 1) for i in range(40)) / 40)


def test_losses_stay_exact_across_chunked_conversion():
    w = torch.ones(2, requires_grad=True)
    with gpumagic.track(device="cpu") as t:
        for i in range(600):
            (w * i).sum().backward()
    assert t.report.losses == tuple(float(2 * i) for i in range(600))


def test_report_to_dict_and_dataframe(data):
    X, Y = data
    model = _fresh()
    opt = torch.optim.SGD(model.parameters(), 0.1)
    with gpumagic.track(device="cpu") as t:
        opt.zero_grad()
        F.cross_entropy(model(X[:8]), Y[:8]).backward()
        opt.step()
    d = t.report.to_dict()
    assert d["backend"] == "cpu"
    assert len(d["steps"]) == 1
    assert d["losses"] == list(t.report.losses)
    import json

    json.dumps(d)
    df = t.report.to_dataframe()
    assert list(df.columns)[:3] == ["index", "loss", "peak_bytes"]
    assert len(df) == 1


def test_report_text_and_html_show_the_figures():
    with gpumagic.track(device="cpu", budget="1GiB") as t:
        x = torch.empty(MiB, dtype=torch.uint8)
    text = repr(t.report)
    assert "peak" in text
    assert "1.00 GiB budget" in text
    html = t.report._repr_html_()
    assert "<table" in html
    assert "budget (simulated capacity)" in html
    del x


def test_invalid_arguments_name_the_value():
    with pytest.raises(ValueError, match="'tpu'"):
        gpumagic.track(device="tpu")
    with pytest.raises(ValueError, match="budget must be"):
        gpumagic.track(device="cpu", budget="lots")
    with pytest.raises(ValueError, match="max_records must be >= 2, got 1"):
        gpumagic.track(device="cpu", max_records=1)


def test_cpu_session_alone_counts_and_stops_cleanly():
    s = CPUSession()
    base = s.start()
    try:
        x = torch.empty(1000, dtype=torch.uint8)
        assert s.current() - base == 1000
        assert s.take_window_peak() - base == 1000
    finally:
        s.stop()
    assert live_tracker_bytes() is None
    del x


def test_loss_of_a_loop_defined_in_an_earlier_function_is_recorded(data):
    X, Y = data

    def train(model, opt, n):
        out = []
        for i in range(n):
            loss = F.cross_entropy(model(X[i * 8 : i * 8 + 8]), Y[i * 8 : i * 8 + 8])
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        return out

    model = _fresh()
    opt = torch.optim.SGD(model.parameters(), 0.1)
    with gpumagic.track(device="cpu") as t:
        truth = train(model, opt, 4)
    assert t.report.losses == pytest.approx(truth)


def test_gpu_free_math_is_consistent():
    # The report's headroom is capacity minus peak, None when unknown.
    with gpumagic.track(device="cpu") as t:
        pass
    assert t.report.headroom_bytes is None
    with gpumagic.track(device="cpu", budget=10 * MiB) as t:
        x = torch.empty(MiB, dtype=torch.uint8)
    assert t.report.headroom_bytes == 10 * MiB - t.report.peak_bytes
    assert math.isfinite(t.report.wall_seconds)
    del x


def test_to_text_renders_the_same_rows_as_the_html():
    with gpumagic.track(device="cpu", budget="1GiB") as t:
        x = torch.empty(MiB, dtype=torch.uint8)
    text = t.report.to_text()
    assert text.splitlines()[0] == "gpumagic memory report"
    assert "budget (simulated capacity)" in text
    assert "1.00 GiB" in text
    del x

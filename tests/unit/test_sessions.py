"""The tracker's session seam: step and loss logic against scripted sessions, and the CUDA and MPS
sessions driven by scripted allocator counters, so their code runs in CPU-only CI.

Real-device checks of the same sessions are in tests/test_gpu.py (marked gpu).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpumagic.backends.cuda import CUDASession
from gpumagic.backends.mps import MPSSession
from gpumagic.tracking import Tracker

MiB = 2**20
GiB = 2**30


class ScriptedSession:
    """Answers each take_window_peak() with the next scripted figure."""

    backend = "scripted"
    device = "scripted:0"
    budget_bytes = None

    def __init__(self, windows: list[int], baseline: int = 100) -> None:
        self.windows = list(windows)
        self.baseline = baseline
        self.notes: list[str] = []
        self.calls: list[str] = []
        self.highest = baseline

    def start(self) -> int:
        self.calls.append("start")
        return self.baseline

    def current(self) -> int:
        return self.baseline

    def take_window_peak(self) -> int:
        p = self.windows.pop(0) if self.windows else self.baseline
        self.highest = max(self.highest, p)
        return p

    def peak(self) -> int:
        return self.highest

    def reserved_peak(self) -> int | None:
        return None

    def capacity(self) -> int | None:
        return 10_000

    def stop(self) -> None:
        self.calls.append("stop")


def _model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(8, 2)
    return model, torch.optim.SGD(model.parameters(), 0.1)


def _step(model: nn.Module, opt: torch.optim.Optimizer, backwards: int = 1) -> list[float]:
    losses = []
    opt.zero_grad()
    for _ in range(backwards):
        loss = F.mse_loss(model(torch.randn(4, 8)), torch.zeros(4, 2))
        loss.backward()
        losses.append(loss.item())
    opt.step()
    return losses


def test_a_step_peak_is_the_highest_window_of_its_backwards_and_its_end() -> None:
    model, opt = _model()
    # step 1: one backward window (300), end window (250); step 2: two backward windows, then the end
    session = ScriptedSession([300, 250, 400, 700, 500])
    with Tracker("cpu", session=session) as t:
        _step(model, opt)
        _step(model, opt, backwards=2)
    assert t.report.step_peaks == (300, 700)
    assert t.report.backend == "scripted"
    assert session.calls == ["start", "stop"]


def test_the_tracker_reports_the_sessions_baseline_peak_and_capacity() -> None:
    model, opt = _model()
    with Tracker("cpu", session=ScriptedSession([900])) as t:
        _step(model, opt)
    r = t.report
    assert (r.baseline_bytes, r.peak_bytes, r.peak_delta_bytes, r.capacity_bytes) == (100, 900, 800, 10_000)


def test_without_an_optimizer_each_backward_is_a_step_with_its_window_and_loss() -> None:
    model, _ = _model()
    losses = []
    with Tracker("cpu", session=ScriptedSession([210, 220, 230])) as t:
        for _ in range(3):
            loss = F.mse_loss(model(torch.randn(4, 8)), torch.zeros(4, 2))
            loss.backward()
            losses.append(loss.item())
    assert t.report.step_peaks == (210, 220, 230)
    assert t.report.losses == pytest.approx(losses)


def test_the_session_is_stopped_when_the_block_raises() -> None:
    session = ScriptedSession([])
    with pytest.raises(KeyError), Tracker("cpu", session=session):
        raise KeyError("user error")
    assert session.calls == ["start", "stop"]


# ---------------------------------------------------------------------------------------------
# CUDA's allocator counters, scripted


class FakeCUDA:
    """The torch.cuda calls CUDASession makes, answering like one 4 GiB device."""

    def __init__(self, allocated: int = 64 * MiB) -> None:
        self.allocated = self.peak = allocated
        self.reserved = self.max_reserved = allocated
        self.fraction = 1.0
        self.fractions: list[float] = []

    def allocate(self, n: int) -> None:
        self.allocated += n
        self.peak = max(self.peak, self.allocated)
        self.reserved = max(self.reserved, self.allocated)
        self.max_reserved = max(self.max_reserved, self.reserved)

    def get_device_properties(self, i: int) -> SimpleNamespace:
        return SimpleNamespace(total_memory=4 * GiB)

    def get_per_process_memory_fraction(self, i: int) -> float:
        return self.fraction

    def set_per_process_memory_fraction(self, f: float, i: int) -> None:
        self.fraction = f
        self.fractions.append(f)

    def reset_peak_memory_stats(self, i: int) -> None:
        self.peak = self.allocated
        self.max_reserved = self.reserved

    def memory_allocated(self, i: int) -> int:
        return self.allocated

    def max_memory_allocated(self, i: int) -> int:
        return self.peak

    def memory_reserved(self, i: int) -> int:
        return self.reserved

    def max_memory_reserved(self, i: int) -> int:
        return self.max_reserved


def test_cuda_session_reads_step_peaks_from_the_allocator_counters() -> None:
    cuda = FakeCUDA()
    model, opt = _model()
    with Tracker("cpu", session=CUDASession(0, api=cuda)) as t:
        for spike in (10 * MiB, 30 * MiB, 20 * MiB):
            cuda.allocate(spike)
            cuda.allocate(-spike)
            _step(model, opt)
    r = t.report
    assert r.step_peaks == (74 * MiB, 94 * MiB, 84 * MiB)
    assert (r.backend, r.device, r.baseline_bytes, r.peak_bytes) == ("cuda", "cuda:0", 64 * MiB, 94 * MiB)
    assert r.reserved_peak_bytes == 94 * MiB
    assert r.capacity_bytes == 4 * GiB


def test_cuda_budget_sets_the_memory_fraction_and_restores_it() -> None:
    cuda = FakeCUDA()
    cuda.fraction = 0.9
    with Tracker("cpu", session=CUDASession(0, budget=GiB, api=cuda)) as t:
        assert cuda.fraction == 0.25
    assert cuda.fractions == [0.25, 0.9]
    assert t.report.capacity_bytes == GiB


def test_cuda_budget_above_the_device_is_capped_and_noted() -> None:
    cuda = FakeCUDA()
    with Tracker("cpu", session=CUDASession(0, budget=8 * GiB, api=cuda)) as t:
        pass
    assert cuda.fractions == [1.0, 1.0]
    assert any("the device is the limit" in n for n in t.report.notes)


# ---------------------------------------------------------------------------------------------
# MPS's counters, scripted


class FakeMPS:
    def __init__(self) -> None:
        self.allocated = 32 * MiB
        self.driver = 48 * MiB

    def current_allocated_memory(self) -> int:
        return self.allocated

    def driver_allocated_memory(self) -> int:
        return self.driver

    def recommended_max_memory(self) -> int:
        return 16 * GiB


def test_mps_session_samples_peaks_at_step_ends_and_says_it_is_a_lower_bound() -> None:
    mps = FakeMPS()
    model, opt = _model()
    with Tracker("cpu", session=MPSSession(api=mps)) as t:
        mps.allocated += 8 * MiB  # alive at the end of the first step
        mps.driver += 16 * MiB
        _step(model, opt)
        mps.allocated -= 8 * MiB
        _step(model, opt)
    r = t.report
    assert r.step_peaks == (40 * MiB, 40 * MiB)  # the second step starts where the first ended
    assert (r.backend, r.capacity_bytes, r.reserved_peak_bytes) == ("mps", 16 * GiB, 64 * MiB)
    assert any("lower bound" in n for n in r.notes)


def test_mps_session_refuses_a_budget_and_names_the_alternative() -> None:
    with pytest.raises(ValueError, match="PYTORCH_MPS_HIGH_WATERMARK_RATIO"):
        MPSSession(budget=GiB, api=FakeMPS())

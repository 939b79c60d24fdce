"""The live monitor's sampling core: a daemon thread, a bounded ring buffer, clean stops.

NVML cannot exist on this machine (no driver), so a fake NVML-like source stands in for it;
the CPU source and the no-driver fallback are the real ones.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from gpumagic import monitor
from gpumagic.monitor import CPUSource, DeviceSample, Monitor, Sample

MiB, GiB = 2**20, 2**30


class FakeNVML:
    """One 80 GiB GPU whose use grows by 1 GiB a sample; records the threads that call it."""

    name = "fake-nvml"

    def __init__(self, fail_on: set[int] | None = None) -> None:
        self.calls = 0
        self.threads: set[str] = set()
        self.fail_on = fail_on or set()

    def __call__(self) -> list[DeviceSample]:
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        if self.calls in self.fail_on:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
        used = (10 + self.calls) * GiB
        return [DeviceSample("cuda:0", "NVIDIA H100 80GB HBM3", used, 80 * GiB, 40.0, used - GiB, GiB)]


def monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(monitor.THREAD_PREFIX)]


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


@pytest.fixture(autouse=True)
def _no_monitor_left() -> Iterator[None]:
    yield
    monitor.stop_all()
    assert monitor_threads() == []


@pytest.mark.parametrize("interval", [0.05, 0, -1, 61, 1e9])
def test_interval_outside_limits_is_rejected_naming_the_value(interval: float) -> None:
    with pytest.raises(ValueError, match=rf"^interval must be between 0.1 and 60 seconds, got {interval!r}"):
        Monitor(interval=interval, source=FakeNVML())


@pytest.mark.parametrize("interval", ["1", True, None])
def test_interval_that_is_not_a_number_is_rejected(interval: object) -> None:
    with pytest.raises(ValueError, match=r"^interval must be between"):
        Monitor(interval=interval, source=FakeNVML())  # type: ignore[arg-type]


@pytest.mark.parametrize("interval", [0.1, 60])
def test_interval_limits_are_inclusive(interval: float) -> None:
    assert Monitor(interval=interval, source=FakeNVML()).interval == interval


def test_start_samples_in_a_named_daemon_thread() -> None:
    source = FakeNVML()
    mon = Monitor(interval=0.1, source=source).start()
    wait_until(lambda: len(mon.samples()) >= 3)
    (thread,) = monitor_threads()
    assert thread.daemon
    assert source.threads == {mon.thread_name}
    mon.stop()


def test_stop_joins_the_thread() -> None:
    mon = Monitor(interval=0.1, source=FakeNVML()).start()
    wait_until(lambda: len(mon.samples()) >= 1)
    assert mon.stop() is True
    assert not mon.is_running
    assert monitor_threads() == []


def test_stop_returns_promptly_during_a_long_interval() -> None:
    mon = Monitor(interval=60, source=FakeNVML()).start()
    wait_until(lambda: len(mon.samples()) >= 1)
    t0 = time.monotonic()
    mon.stop()
    assert time.monotonic() - t0 < 2


def test_stop_is_idempotent_and_safe_before_start() -> None:
    mon = Monitor(interval=0.1, source=FakeNVML())
    assert mon.stop() is True
    mon.start()
    assert mon.stop() is True
    assert mon.stop() is True
    assert monitor_threads() == []


def test_start_twice_keeps_one_thread() -> None:
    mon = Monitor(interval=0.1, source=FakeNVML())
    mon.start()
    mon.start()
    assert len(monitor_threads()) == 1
    mon.stop()


def test_a_stopped_monitor_can_start_again() -> None:
    mon = Monitor(interval=0.1, source=FakeNVML()).start()
    mon.stop()
    mon.start()
    assert mon.is_running
    mon.stop()
    assert monitor_threads() == []


def test_stop_all_stops_every_monitor_and_counts_them() -> None:
    monitors = [Monitor(interval=0.1, source=FakeNVML()).start() for _ in range(3)]
    stopped_early = Monitor(interval=0.1, source=FakeNVML()).start()
    stopped_early.stop()
    assert monitor.running_monitors() == tuple(monitors)
    assert monitor.stop_all() == 3
    assert monitor_threads() == []
    assert monitor.running_monitors() == ()
    assert monitor.stop_all() == 0


def test_ring_buffer_keeps_only_the_last_samples() -> None:
    mon = Monitor(interval=0.1, source=FakeNVML(), history_seconds=1.0)
    assert mon.capacity == 10
    for _ in range(25):
        mon.sample_now()
    kept = mon.samples()
    assert len(kept) == 10
    assert [s.devices[0].used_bytes for s in kept] == [(10 + i) * GiB for i in range(16, 26)]


def test_default_history_is_ten_minutes_of_samples() -> None:
    assert Monitor(interval=0.5, source=FakeNVML()).capacity == 1200


def test_samples_carry_time_and_source_name() -> None:
    before = time.time()
    sample = Monitor(interval=1.0, source=FakeNVML()).sample_now()
    assert isinstance(sample, Sample)
    assert sample.source == "fake-nvml"
    assert before <= sample.time <= time.time()


def test_callbacks_get_each_sample_then_none_when_stopped() -> None:
    seen: list[Sample | None] = []
    mon = Monitor(interval=0.1, source=FakeNVML())
    mon.add_callback(seen.append)
    mon.start()
    wait_until(lambda: len(seen) >= 2)
    mon.stop()
    assert seen[-1] is None
    assert all(isinstance(s, Sample) for s in seen[:-1])
    assert seen[:-1] == list(mon.samples())


def test_a_failing_callback_does_not_stop_sampling() -> None:
    def broken(_sample: Sample | None) -> None:
        raise KeyError("closed")

    mon = Monitor(interval=0.1, source=FakeNVML())
    mon.add_callback(broken)
    mon.start()
    wait_until(lambda: len(mon.samples()) >= 3)
    assert mon.is_running
    mon.stop()
    assert isinstance(mon.last_error, KeyError)


def test_a_failing_source_is_recorded_and_sampling_goes_on() -> None:
    mon = Monitor(interval=0.1, source=FakeNVML(fail_on={2}))
    mon.start()
    wait_until(lambda: len(mon.samples()) >= 3)
    mon.stop()
    assert isinstance(mon.last_error, RuntimeError)
    assert "GPU_IS_LOST" in str(mon.last_error)


def test_context_manager_stops_the_monitor() -> None:
    with Monitor(interval=0.1, source=FakeNVML()) as mon:
        assert mon.is_running
    assert monitor_threads() == []


def test_cpu_source_reports_this_process_against_the_machine() -> None:
    (d,) = CPUSource()()
    assert d.device == "cpu"
    assert d.total_bytes is not None
    assert d.used_bytes is not None
    assert d.process_bytes is not None
    assert 0 < d.process_bytes <= d.used_bytes <= d.total_bytes
    assert d.other_bytes == d.used_bytes - d.process_bytes


def test_cpu_source_measures_cpu_utilisation_from_the_second_sample() -> None:
    source = CPUSource()
    assert source()[0].utilization_percent is None
    sum(i * i for i in range(200_000))  # some CPU time between the samples
    util = source()[0].utilization_percent
    assert util is not None
    assert 0 < util <= 100


def test_cpu_source_includes_the_trackers_live_bytes_while_tracking() -> None:
    import torch

    import gpumagic

    source = CPUSource()
    assert source()[0].tracked_bytes is None
    with gpumagic.track(device="cpu"):
        x = torch.empty(8 * MiB, dtype=torch.uint8)
        inside = source()[0].tracked_bytes
        del x
    assert inside is not None
    assert inside >= 8 * MiB
    assert source()[0].tracked_bytes is None


def test_without_an_nvml_driver_the_default_source_is_not_nvml() -> None:
    if monitor.nvml_source() is not None:
        pytest.skip("an NVIDIA driver answers here")
    assert monitor.default_source().name in ("cpu", "torch.cuda", "mps")


def test_the_default_source_never_initialises_cuda() -> None:
    import torch

    if torch.cuda.is_initialized():
        pytest.skip("an earlier test in this process initialised CUDA")
    Monitor(interval=1.0).sample_now()
    assert not torch.cuda.is_initialized()



"""NVML through a stand-in module (no driver can exist here), and %gpumon in a real shell."""

import os
import threading
import types

import pytest
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output

from gpumagic import monitor
from gpumagic.backends import nvml

GiB = 2**30


class _Mem:
    total, used, free = 24 * GiB, 10 * GiB, 14 * GiB


class _Proc:
    def __init__(self, pid, used):
        self.pid, self.usedGpuMemory = pid, used


def _fake_pynvml(fail_init=False):
    """The few NVML calls gpumagic makes, answering like a one-GPU machine with two processes."""
    m = types.ModuleType("pynvml")

    def init():
        if fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    m.nvmlInit = init
    m.nvmlDeviceGetCount = lambda: 1
    m.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)
    m.nvmlDeviceGetMemoryInfo = lambda h: _Mem()
    m.nvmlDeviceGetName = lambda h: b"NVIDIA Test GPU"
    m.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=37)
    m.nvmlDeviceGetComputeRunningProcesses = lambda h: [_Proc(os.getpid(), 6 * GiB), _Proc(1, None)]
    return m


@pytest.fixture
def fake_nvml(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "pynvml", _fake_pynvml())
    monkeypatch.setattr(nvml, "_state", {"ok": None, "mod": None})
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_gpu_info_reads_totals_utilisation_and_processes(fake_nvml):
    info = nvml.gpu_info(0)
    assert info.name == "NVIDIA Test GPU"
    assert (info.total_bytes, info.used_bytes, info.free_bytes) == (24 * GiB, 10 * GiB, 14 * GiB)
    assert info.utilization_percent == 37
    assert [(p.pid, p.used_bytes) for p in info.processes] == [(os.getpid(), 6 * GiB), (1, None)]


def test_gpu_info_is_none_without_a_driver(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "pynvml", _fake_pynvml(fail_init=True))
    monkeypatch.setattr(nvml, "_state", {"ok": None, "mod": None})
    assert nvml.gpu_info(0) is None


def test_cuda_visible_devices_maps_to_the_physical_index(fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert nvml._physical_index(1) == 5
    assert nvml._physical_index(0) == 3


def test_monitor_nvml_source_splits_this_process_from_others(fake_nvml):
    src = monitor.nvml_source()
    assert src is not None
    (s,) = src()
    assert s.used_bytes == 10 * GiB
    assert s.total_bytes == 24 * GiB
    assert s.process_bytes == 6 * GiB
    assert s.other_bytes == 4 * GiB


def _monitor_threads():
    return [t for t in threading.enumerate() if t.name.startswith(monitor.THREAD_PREFIX)]


def test_gpumon_starts_a_panel_and_stop_ends_every_thread(ip):
    with capture_output() as cap:
        ip.run_line_magic("gpumon", "--interval 0.1")
    assert len(cap.outputs) == 1  # shown once
    assert _monitor_threads()
    with capture_output() as cap:
        ip.run_line_magic("gpumon", "--stop")
    assert "stopped 1 monitor" in cap.stdout
    assert not _monitor_threads()


def test_unload_stops_running_monitors(ip):
    with capture_output():
        ip.run_line_magic("gpumon", "--interval 0.1")
    assert _monitor_threads()
    ip.run_line_magic("unload_ext", "gpumagic")
    try:
        assert not _monitor_threads()
    finally:
        ip.run_line_magic("load_ext", "gpumagic")


def test_gpumon_rejects_a_bad_interval(ip):
    with pytest.raises(UsageError, match=r"between 0\.1 and 60 seconds, got 0\.01"):
        ip.run_line_magic("gpumon", "--interval 0.01")
    assert not _monitor_threads()


def test_gpumon_names_the_flag_in_the_error(ip):
    with pytest.raises(UsageError, match=r"^--interval must be between"):
        ip.run_line_magic("gpumon", "--interval 0.01")

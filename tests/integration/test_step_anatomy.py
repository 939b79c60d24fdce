"""Step anatomy (data wait against compute, loader advice that works when followed) and host memory
(the cell's and each step's peak resident memory, DataLoader workers' copies), in a real shell."""

from __future__ import annotations

import statistics

import pytest
import torch

from gpumagic import dataloading
from gpumagic.dataloading import LoaderStats, available_cores, host_advice, loader_advice
from gpumagic.report import StepRecord

MB = 10**6


@pytest.fixture(autouse=True)
def _forget_results(ip):
    yield
    presenter = ip.magics_manager.registry["GPUMagics"].presenter
    presenter.last_search = presenter.last_report = None


def setup(ip, src: str) -> None:
    r = ip.run_cell(src, store_history=True)
    assert r.error_in_exec is None, r.error_in_exec


def gpumem(ip, cell: str):
    r = ip.run_cell("%%gpumem -o -q -d cpu\n" + cell, store_history=True)
    assert r.error_in_exec is None, r.error_in_exec
    assert r.result.incomplete is None
    return r.result


SLOW = '''
import time
from torch.utils.data import DataLoader, Dataset
torch.manual_seed(0)

class SlowSamples(Dataset):
    """Each sample costs about 2 ms to load, as a decoded image or a parsed record may."""
    def __init__(self, n):
        self.x, self.y = torch.randn(n, 64), torch.randint(0, 10, (n,))
    def __len__(self):
        return len(self.x)
    def __getitem__(self, i):
        time.sleep(0.002)
        return self.x[i], self.y[i]

dataset = SlowSamples(512)
model = nn.Linear(64, 10)
opt = torch.optim.SGD(model.parameters(), lr=0.1)

def epoch(loader):
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
'''


def _mean_step(rep) -> float:
    later = rep.steps[1:]
    return sum(s.seconds for s in later) / sum(s.count for s in later)


@pytest.mark.slow
def test_a_loader_of_slow_samples_is_reported_as_the_data_wait_with_its_time_per_sample(ip, clean_ns):
    setup(ip, SLOW)
    rep = gpumem(ip, "epoch(DataLoader(dataset, batch_size=32))")
    assert rep.data_wait_fraction > 0.5  # about 0.99 on an idle machine; threads stall each other under load
    assert all(s.data_seconds is not None and s.compute_seconds is not None for s in rep.steps)
    assert all(abs(s.data_seconds + s.compute_seconds - s.seconds) < 1e-9 for s in rep.steps)
    adv = rep.loader_advice
    assert adv is not None
    assert adv.num_workers == min(available_cores(), adv.num_workers) >= 1
    assert 0.002 <= adv.seconds_per_sample < 0.02
    assert adv.cpu_bound is False  # it sleeps
    assert "data wait" in rep.to_text()
    assert "num_workers=" in rep.to_text()


@pytest.mark.slow
@pytest.mark.skipif(available_cores() < 2, reason="one core: workers cannot load while the step computes")
def test_following_the_loader_advice_makes_the_steps_at_least_one_and_a_half_times_faster(ip, clean_ns):
    setup(ip, SLOW)
    before, after = [], []
    for _ in range(3):  # a loaded machine stalls single runs now and then: medians of three
        rep = gpumem(ip, "epoch(DataLoader(dataset, batch_size=32))")
        kwargs = rep.loader_advice.loader_kwargs()
        ip.user_ns["advised"] = kwargs
        before.append(_mean_step(rep))
        after.append(_mean_step(gpumem(ip, "epoch(DataLoader(dataset, batch_size=32, **advised))")))
    assert kwargs == {"num_workers": min(available_cores(), kwargs["num_workers"])}
    assert statistics.median(before) / statistics.median(after) >= 1.5


def test_a_compute_bound_loop_with_its_data_in_memory_gets_no_loader_advice(ip, clean_ns):
    setup(ip, """
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0)
data = TensorDataset(torch.randn(512, 256), torch.randint(0, 10, (512,)))
model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
opt = torch.optim.Adam(model.parameters())
""")
    rep = gpumem(ip, """
for x, y in DataLoader(data, batch_size=64):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
""")
    assert rep.data_wait_fraction is not None
    assert rep.data_wait_fraction < dataloading.DATA_WAIT_THRESHOLD
    assert rep.loader_advice is None
    assert "loader advice" not in rep.to_text()


def test_a_tiny_step_on_an_in_memory_loader_gets_no_worker_advice():
    # measured on a quiet machine: 0.13 ms of data in a 0.22 ms step; a worker's hand-off of one batch
    # costs more than that (two workers made the step 6x slower), so the rule gives no advice
    ld = LoaderStats(num_workers=0, pin_memory=False, persistent_workers=False, dataset_id=1, batch_size=32,
                     iters=1, draws=64, samples=2048, wall_seconds=64 * 0.00013)
    assert loader_advice(_steps(0.00013, 0.00009), [ld], cores=2, pin_helps=True) is None


def test_without_a_dataloader_the_data_wait_is_the_time_before_the_first_module_call(ip, clean_ns):
    setup(ip, """
import time
model = nn.Linear(8, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
def get_batch():
    time.sleep(0.02)
    return torch.randn(4, 8), torch.randint(0, 2, (4,))
""")
    rep = gpumem(ip, """
for i in range(4):
    x, y = get_batch()
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
""")
    assert all(0.02 <= s.data_seconds < s.seconds for s in rep.steps)
    later = rep.steps[1:]
    assert rep.data_wait_fraction == pytest.approx(sum(s.data_seconds for s in later) / sum(s.seconds for s in later))


# --- the pure advice rules: what the measurements lead to ---------------------------------------------

def _steps(data: float, compute: float, n: int = 5) -> list[StepRecord]:
    return [StepRecord(i, None, None, data + compute, 32, data_seconds=data, compute_seconds=compute)
            for i in range(n)]


def test_workers_already_running_are_advised_as_many_as_hide_the_wait_within_the_cores():
    ld = LoaderStats(num_workers=1, pin_memory=False, persistent_workers=False, dataset_id=1, batch_size=32,
                     iters=1, draws=5, samples=160, wall_seconds=0.2)
    adv = loader_advice(_steps(0.03, 0.01), [ld], cores=8, pin_helps=False)
    assert adv is not None
    assert adv.num_workers == 4  # one worker takes 40 ms a batch; a step computes 10 ms
    assert not adv.getitem_bottleneck
    assert adv.loader_kwargs() == {"num_workers": 4}


def test_pinned_memory_is_advised_where_the_backend_says_it_helps():
    ld = LoaderStats(num_workers=0, pin_memory=False, persistent_workers=False, dataset_id=1, batch_size=32,
                     draws=5, samples=160, wall_seconds=0.2)
    assert loader_advice(_steps(0.03, 0.01), [ld], cores=4, pin_helps=True).loader_kwargs()["pin_memory"] is True
    assert "pin_memory" not in loader_advice(_steps(0.03, 0.01), [ld], cores=4, pin_helps=False).loader_kwargs()


def test_a_loader_iterated_per_epoch_is_advised_persistent_workers():
    ld = LoaderStats(num_workers=2, pin_memory=False, persistent_workers=False, dataset_id=1, batch_size=32,
                     iters=3, draws=15, samples=480, wall_seconds=0.5)
    adv = loader_advice(_steps(0.03, 0.01), [ld], cores=2, pin_helps=False)
    assert adv.loader_kwargs() == {"persistent_workers": True}


def test_a_loader_rebuilt_per_epoch_is_advised_to_be_built_once():
    made = [LoaderStats(num_workers=2, pin_memory=False, persistent_workers=False, dataset_id=7, batch_size=32,
                        iters=1, draws=5, samples=160, wall_seconds=0.2) for _ in range(3)]
    adv = loader_advice(_steps(0.03, 0.01), made, cores=2, pin_helps=False)
    assert adv.build_once
    assert adv.persistent_workers
    assert any("build it once" in line for line in adv.lines)


def test_no_workers_left_to_add_names_getitem_as_the_bottleneck_with_its_time_per_sample():
    ld = LoaderStats(num_workers=0, pin_memory=False, persistent_workers=False, dataset_id=1, batch_size=32,
                     draws=5, samples=160, wall_seconds=0.4, cpu_seconds=0.39)
    adv = loader_advice(_steps(0.08, 0.001), [ld], cores=2, pin_helps=False)
    assert adv.getitem_bottleneck
    assert adv.cpu_bound
    assert adv.seconds_per_sample == pytest.approx(0.4 / 160)
    assert any("2.5 ms" in line and "`__getitem__` is the bottleneck" in line for line in adv.lines)


def test_small_workers_get_no_host_advice():
    ld = LoaderStats(num_workers=2, pin_memory=False, persistent_workers=False, dataset_id=1, batch_size=32,
                     worker_pids={1, 2}, worker_peak_bytes=250 * MB, worker_private_bytes=10 * MB)
    assert host_advice([ld], 400 * MB, 16 * 10**9) == ()


# --- host memory ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_cell_that_allocates_and_frees_600_mb_reports_its_host_peak_within_ten_percent(ip, clean_ns):
    setup(ip, "import numpy as np")
    rep = gpumem(ip, "a = np.ones(600 * 10**6 // 8)\ndel a")
    assert rep.host_peak_bytes is not None
    assert not rep.host_peak_sampled
    assert abs(rep.host_delta_bytes - 600 * MB) <= 60 * MB


def test_the_per_step_host_peak_follows_an_allocation_made_in_step_3_only(ip, clean_ns):
    setup(ip, """
import numpy as np
model = nn.Linear(8, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
""")
    rep = gpumem(ip, """
for i in range(6):
    if i == 2:
        scratch = np.ones(200 * 10**6 // 8); del scratch
    loss = model(torch.randn(4, 8)).sum()
    opt.zero_grad(); loss.backward(); opt.step()
""")
    peaks = [s.host_peak_bytes for s in rep.steps]
    others = [p for i, p in enumerate(peaks) if i != 2]
    assert peaks[2] - max(others) >= 180 * MB
    assert max(others) - min(others) < 50 * MB


@pytest.mark.slow
def test_workers_copying_a_data_set_held_in_ram_are_shown_with_advice(ip, clean_ns):
    setup(ip, """
from torch.utils.data import DataLoader, Dataset

class Records(Dataset):
    def __init__(self):
        self.rows = [bytes(1000) for _ in range(400_000)]  # 400 MB of Python objects in RAM
    def __len__(self):
        return len(self.rows)
    def __getitem__(self, i):
        return len(self.rows[i])  # reading an object writes its reference count: the page is copied
""")
    rep = gpumem(ip, """
records = Records()
for batch in DataLoader(records, batch_size=1000, num_workers=2):
    pass
del records
""")
    assert rep.worker_count == 2
    assert rep.worker_private_bytes >= 150 * MB  # about half of the rows each, copied
    assert rep.host_advice
    assert "num_workers=1" in rep.host_advice[1]
    assert rep.host_matters
    text = rep.to_text()
    assert "2 DataLoader workers" in text
    assert "mmap_mode" in text


def test_a_throughput_pick_limited_by_the_loader_says_so(ip, clean_ns):
    import gpumagic

    setup(ip, SLOW.replace("time.sleep(0.002)", "time.sleep(0.0005)"))
    ns = ip.user_ns

    def trial(b):
        ns["epoch"](ns["DataLoader"](ns["dataset"], batch_size=b))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads stall each other on a loaded 2-core machine, hiding the wait
    try:
        res = gpumagic.find_batch(trial, device="cpu", budget="64MiB", max_size=64, pick="throughput",
                                  progress=False)
    finally:
        torch.set_num_threads(threads)
    picked = [t for t in res.trials if t.batch_size == res.recommended_batch_size]
    assert picked[0].data_wait_fraction > dataloading.DATA_WAIT_THRESHOLD
    assert "the loader limits this pick" in res.reason


def test_a_throughput_pick_of_a_compute_bound_loop_names_no_loader(ip, clean_ns):
    import gpumagic

    setup(ip, """
model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
X, Y = torch.randn(256, 256), torch.randint(0, 10, (256,))
def steps(b):
    for i in range(4):
        loss = F.cross_entropy(model(X[:b]), Y[:b])
        opt.zero_grad(); loss.backward(); opt.step()
""")
    res = gpumagic.find_batch(ip.user_ns["steps"], device="cpu", budget="64MiB", max_size=256, pick="throughput",
                              progress=False)
    assert "loader" not in res.reason


def _host_report(delta: int, **kw):
    from gpumagic.report import MemoryReport

    steps = tuple(StepRecord(i, None, 1000, 0.01, 32, host_peak_bytes=10**9 + i * delta // 4) for i in range(5))
    return MemoryReport("cpu", "cpu", 0, 1000, 1000, 0, None, None, 1.0, steps=steps, total_steps=5,
                        host_baseline_bytes=10**9, host_peak_bytes=10**9 + delta, host_total_bytes=16 * 10**9,
                        host_available_bytes=8 * 10**9, **kw)


def test_host_memory_is_shown_beside_the_device_when_the_cell_grew_it_by_a_tenth_of_the_ram():
    from gpumagic.render.text import memory_report_text

    grew = _host_report(2 * 10**9)
    assert grew.host_matters
    for text in (grew.to_text(), grew._repr_html_(), memory_report_text(grew, width=200)):
        assert "host memory" in text
        assert "14.90 GiB" in text  # the machine's RAM, beside its peak


def test_host_memory_that_barely_grew_is_not_shown():
    from gpumagic.render.text import memory_report_text

    small = _host_report(10**8)
    assert not small.host_matters
    for text in (small.to_text(), small._repr_html_(), memory_report_text(small, width=200)):
        assert "host memory" not in text


def test_the_widget_plot_draws_each_steps_host_peak_on_its_own_axis_when_host_memory_matters():
    pytest.importorskip("matplotlib")
    from gpumagic.render.widgets import memory_figure

    assert len(memory_figure(_host_report(2 * 10**9)).axes) == 2
    assert len(memory_figure(_host_report(10**8)).axes) == 1


def test_where_the_exact_peak_is_unavailable_host_peaks_are_sampled_and_marked(ip, clean_ns, monkeypatch):
    from gpumagic import tracking
    from gpumagic._hostmem import HostPeak

    monkeypatch.setattr(tracking, "HostPeak", lambda: HostPeak(exact=False))
    setup(ip, "model = nn.Linear(8, 2)\nopt = torch.optim.SGD(model.parameters(), lr=0.1)")
    rep = gpumem(ip, """
for i in range(3):
    loss = model(torch.randn(4, 8)).sum()
    opt.zero_grad(); loss.backward(); opt.step()
""")
    assert rep.host_peak_sampled
    assert all(s.host_peak_bytes for s in rep.steps)
    assert "sampled" in rep.host_text()


def test_the_host_peak_files_are_closed_when_the_block_ends_also_by_an_error():
    import os

    import gpumagic

    before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    if before is None:
        pytest.skip("no /proc here")
    with pytest.raises(ZeroDivisionError), gpumagic.track(device="cpu"):
        1 / 0  # noqa: B018
    assert len(os.listdir("/proc/self/fd")) == before

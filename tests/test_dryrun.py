"""Dry runs: plans on fake tensors agree with the exact CPU tracker, leave the namespace as it
was, stand in for cuda without CUDA, and say what they could not do."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING, Any

import pytest
import torch
from dryrun_loops import LOOPS
from IPython.core.error import UsageError

import gpumagic
from gpumagic._allocator import CachingAllocatorModel, round_size
from gpumagic.dryrun import DryRunError, attention_kernel
from gpumagic.gpus import GPUS, lookup
from gpumagic.tracking import StopTrial, Tracker

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

MiB = 2**20


def _exact(cell: str, ns: dict[str, Any]) -> Any:
    tr = Tracker("cpu", stop_after_steps=3)
    try:
        with tr:
            exec(cell, ns)
    except StopTrial:
        pass
    return tr.report


def _planned(cell: str, ns: dict[str, Any], **kw: Any) -> Any:
    with gpumagic.track(dry_run=True, namespace=ns, **kw) as t:
        exec(cell, ns)
    return t.report


# --- accuracy: dry run on cpu against the exact tracker -----------------------------------------


@pytest.mark.parametrize("name", sorted(LOOPS))
def test_dry_run_on_cpu_is_within_3_percent_of_the_exact_tracker(name: str) -> None:
    setup, cell = LOOPS[name]
    gc.collect()
    ns: dict[str, Any] = {}
    exec(setup, ns)
    plan = _planned(cell, ns, device="cpu")
    exact = _exact(cell, ns)
    assert plan.dry_run
    assert not exact.dry_run
    assert plan.total_steps == exact.total_steps == 3
    assert plan.peak_delta_bytes == pytest.approx(exact.peak_delta_bytes, rel=0.03)
    assert plan.peak_bytes == pytest.approx(exact.peak_bytes, rel=0.03)


def test_dry_run_breakdown_counts_parameters_gradients_and_adam_state() -> None:
    setup, cell = LOOPS["cnn_bn"]
    ns: dict[str, Any] = {}
    exec(setup, ns)
    params = sum(p.numel() * 4 for p in ns["model"].parameters())
    b = _planned(cell, ns, device="cpu").breakdown
    assert b is not None
    assert (b.parameters_bytes, b.gradients_bytes, b.optimizer_state_bytes) == (params, params, 2 * params + 4 * 10)


# --- the namespace and the user's objects --------------------------------------------------------


def test_dry_run_leaves_the_namespace_exactly_as_before() -> None:
    setup, cell = LOOPS["mlp"]
    ns: dict[str, Any] = {}
    exec(setup + "losses = [1.0]\n", ns)
    before = dict(ns)
    _planned(cell + "    losses.append(loss.item())\nnew_name = model\n", ns, device="cpu")
    assert set(ns) == set(before)
    assert all(ns[k] is v for k, v in before.items())
    assert ns["losses"] == [1.0]


def test_dry_run_does_not_touch_the_real_model_or_optimizer() -> None:
    setup, cell = LOOPS["transformer"]
    ns: dict[str, Any] = {}
    exec(setup, ns)
    weights = {k: v.clone() for k, v in ns["model"].state_dict().items()}
    _planned(cell, ns, device="cpu")
    assert all(torch.equal(v, weights[k]) for k, v in ns["model"].state_dict().items())
    assert not ns["opt"].state
    assert all(p.grad is None for p in ns["model"].parameters())


def test_dry_run_steps_a_scheduled_optimizers_copy_not_the_original() -> None:
    ns: dict[str, Any] = {}
    exec("import torch\nmodel = torch.nn.Linear(8, 8)\n"
         "opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)\n"
         "sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)\n", ns)
    plan = _planned("for _ in range(3):\n    model(torch.randn(4, 8)).sum().backward(); opt.step(); sched.step()\n",
                    ns, device="cpu")
    assert plan.breakdown is not None
    assert plan.breakdown.optimizer_state_bytes == (64 + 8) * 4
    assert ns["opt"].param_groups[0]["lr"] == 0.1
    assert not ns["opt"].state


def test_model_built_inside_a_dry_run_allocates_no_host_memory() -> None:
    ns: dict[str, Any] = {}
    plan = _planned("import torch\nbig = torch.nn.Linear(16384, 16384)\nopt = torch.optim.Adam(big.parameters())\n"
                    "big(torch.randn(2, 16384)).sum().backward(); opt.step()\n", ns, device="cpu")
    assert plan.breakdown is not None
    assert plan.breakdown.parameters_bytes > 1024 * MiB
    assert "big" not in ns


def test_track_dry_run_reads_the_callers_globals_by_default() -> None:
    g: dict[str, Any] = {"gpumagic": gpumagic}
    exec("import torch\nmodel = torch.nn.Linear(64, 64)\n"
         "with gpumagic.track(dry_run=True, device='cpu') as t:\n"
         "    model(torch.randn(8, 64)).sum().backward()\n", g)
    assert g["t"].report.baseline_bytes >= (64 * 64 + 64) * 4
    assert type(g["model"].weight) is torch.nn.Parameter
    assert g["model"].weight.grad is None


# --- what a plan says ------------------------------------------------------------------------------


def test_item_and_comparisons_read_placeholders_and_the_report_names_the_line(
    ip: InteractiveShell, clean_ns: None
) -> None:
    ip.run_cell("model = nn.Linear(8, 1); opt = torch.optim.SGD(model.parameters(), lr=0.1); best = 1e9")
    r = ip.run_cell("%%gpumem --dry-run -d cpu -o -q\nfor _ in range(5):\n"
                    "    loss = model(torch.randn(4, 8)).pow(2).mean()\n"
                    "    opt.zero_grad(); loss.backward(); opt.step()\n"
                    "    if loss < best:\n        best = loss.item()\n")
    rep = r.result
    assert rep.dry_run
    assert rep.losses == ()
    assert rep.total_steps == 3
    note = next(n for n in rep.notes if "placeholders" in n)
    assert "line 4 in the cell: if loss < best:" in note  # lines of the cell body
    assert "line 5 in the cell: best = loss.item()" in note
    assert ip.user_ns["best"] == 1e9


def test_report_says_it_is_a_plan(ip: InteractiveShell, clean_ns: None) -> None:
    ip.run_cell("model = nn.Linear(8, 2); opt = torch.optim.Adam(model.parameters())")
    rep = ip.run_cell("%%gpumem --dry-run -d cpu --budget 4GiB -o -q\n"
                      "for _ in range(4):\n    model(torch.randn(4, 8)).sum().backward(); opt.step()\n").result
    assert repr(rep).startswith("<MemoryReport PLAN (dry run)")
    assert "gpumagic memory plan (dry run)" in rep.to_text()
    assert any("fits in 4.00 GiB" in n for n in rep.notes)


def test_data_dependent_shape_stops_with_a_message_naming_the_line(ip: InteractiveShell, clean_ns: None) -> None:
    ip.run_cell("x0 = torch.randn(16)")
    before = dict(ip.user_ns)
    r = ip.run_cell("%%gpumem --dry-run -d cpu\ny = x0 * 2\npositive = y[y > 0]\n")
    assert isinstance(r.error_in_exec, DryRunError)
    assert "line 2 in the cell: positive = y[y > 0]" in str(r.error_in_exec)
    assert "depends on the data" in str(r.error_in_exec)
    assert set(ip.user_ns) - set(before) <= {"_"}
    assert ip.user_ns["x0"] is before["x0"]


def test_numpy_of_a_fake_tensor_stops_with_a_message_naming_the_line(ip: InteractiveShell, clean_ns: None) -> None:
    ip.run_cell("x0 = torch.randn(16)")
    r = ip.run_cell("%%gpumem --dry-run -d cpu\narr = (x0 + 1).numpy()\n")
    assert isinstance(r.error_in_exec, DryRunError)
    assert "line 1 in the cell: arr = (x0 + 1).numpy()" in str(r.error_in_exec)
    assert type(ip.user_ns["x0"]) is torch.Tensor
    assert "arr" not in ip.user_ns


def test_dry_run_with_gpu_and_budget_is_a_usage_error(ip: InteractiveShell) -> None:
    with pytest.raises(UsageError, match="not both"):
        ip.run_cell_magic("gpumem", "--dry-run --gpu T4 --budget 1GiB", "pass")


def test_unknown_gpu_lists_the_known_ones(ip: InteractiveShell) -> None:
    with pytest.raises(UsageError, match=r"unknown GPU 'K80'; known GPUs: T4, L4, A10G"):
        ip.run_cell_magic("gpumem", "--dry-run --gpu K80", "pass")


def test_steps_without_dry_run_is_a_usage_error(ip: InteractiveShell) -> None:
    with pytest.raises(UsageError, match="--steps applies to %%gpumem --dry-run"):
        ip.run_cell_magic("gpumem", "-d cpu --steps 2", "pass")


def test_gpu_without_dry_run_is_a_budget(ip: InteractiveShell, clean_ns: None) -> None:
    rep = ip.run_cell("%%gpumem -d cpu --gpu T4 -o -q\nx = torch.ones(10)\n").result
    assert not rep.dry_run
    assert rep.budget_bytes == lookup("T4").capacity_bytes


# --- the GPU catalog and the allocator model ---------------------------------------------------------


def test_catalog_has_the_common_gpus_case_insensitively() -> None:
    for name in ("T4", "L4", "A10G", "V100-16GB", "V100-32GB", "A100-40GB", "A100-80GB", "H100-80GB", "H200",
                 "RTX-3090", "RTX-4090"):
        assert lookup(name.lower()).name == name
    assert lookup("rtx 4090").name == "RTX-4090"
    assert all(0 < g.capacity_bytes < g.total_bytes and g.source for g in GPUS.values())


def test_attention_kernel_follows_compute_capability_and_dtype() -> None:
    assert attention_kernel(lookup("T4"), torch.float16) == "memory-efficient"
    assert attention_kernel(lookup("A100-80GB"), torch.bfloat16) == "flash"
    assert attention_kernel(lookup("A100-80GB"), torch.float32) == "memory-efficient"


def test_allocator_rounds_to_512_bytes_and_takes_2_mib_small_segments() -> None:
    a = CachingAllocatorModel()
    a.malloc(1000)
    a.malloc(1)
    assert (round_size(1000), a.allocated, a.reserved) == (1024, 1536, 2 * MiB)


def test_allocator_takes_20_mib_segments_below_10_mib_and_rounds_larger_to_2_mib() -> None:
    a = CachingAllocatorModel()
    a.malloc(3 * MiB)
    assert a.reserved == 20 * MiB
    a.malloc(11 * MiB)  # fits the 17 MiB left in that segment
    assert a.reserved == 20 * MiB
    a.malloc(21 * MiB + 1)
    assert a.reserved == 20 * MiB + 22 * MiB


def test_allocator_reuses_freed_blocks_without_reserving_more() -> None:
    a = CachingAllocatorModel()
    k = a.malloc(4 * MiB)
    a.free(k)
    a.malloc(5 * MiB)
    assert (a.allocated, a.reserved, a.peak_reserved) == (5 * MiB, 20 * MiB, 20 * MiB)


# --- cuda without CUDA: run in a subprocess, an abort would kill the test process ----------------------

STANDIN = r"""
import torch, gpumagic
from torch import nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
assert not torch.cuda.is_available()
model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
opt = torch.optim.AdamW(model.parameters())
loader = DataLoader(TensorDataset(torch.randn(64, 32), torch.randint(0, 4, (64,))), batch_size=16)
seen = []
with gpumagic.track(dry_run=True, gpu="T4") as t:
    props = torch.cuda.get_device_properties(0)
    print("SEEN", [torch.cuda.is_available(), torch.cuda.get_device_name(), props.total_memory])
    model.cuda()
    extra = nn.Linear(4, 4, device="cuda")
    bias = torch.zeros(4, device=torch.device("cuda", 0)) + torch.tensor([1.0], device="cuda")
    scaler = torch.amp.GradScaler("cuda")
    for x, y in loader:
        x, y = x.to("cuda", non_blocking=True), y.cuda()
        with torch.autocast("cuda", dtype=torch.float16):
            out = extra(model(x)) + bias.new_zeros(4, device="cuda")
            loss = F.cross_entropy(out, y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        print("ALLOCATED", torch.cuda.max_memory_allocated() > 0)
rep = t.report
print("REPORT", rep.dry_run, rep.device, rep.total_steps, rep.peak_bytes > 0, rep.reserved_peak_bytes)
print("REAL", torch.cuda.is_available(), type(model[0].weight).__name__, len(opt.state), model[0].weight.device)
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the stand-in is for machines without CUDA")
def test_cuda_plan_without_cuda_stands_in_for_every_way_a_cell_reaches_cuda() -> None:
    proc = _run(STANDIN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "SEEN [True, 'T4', 15837691904]" in out
    assert out.count("ALLOCATED True") == 2  # the third optimizer step ends the plan
    assert "REPORT True cuda:0 (T4) 3 True 2097152" in out
    assert "REAL False Parameter 0 cpu" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the stand-in is for machines without CUDA")
def test_a_fake_cuda_tensor_never_reaches_a_kernel_on_a_cpu_build() -> None:
    # at::linear on a fake CUDA tensor aborts a CPU build (FACTS.md): the guard must refuse first
    proc = _run(r"""
    import torch, gpumagic
    from gpumagic.dryrun import DryRunError
    from torch._subclasses.fake_tensor import FakeTensorMode
    w, elem = torch.randn(4, 4), torch.empty(4, 4, device="meta")
    with gpumagic.track(dry_run=True, gpu="T4", namespace={}) as t:
        mode = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE)
        bad = torch._subclasses.fake_tensor.FakeTensor(mode, elem, torch.device("cuda"))
        try:
            torch.nn.functional.linear(bad, w)
        except DryRunError as e:
            print("REFUSED", "CUDA tensor" in str(e))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REFUSED True" in proc.stdout


def test_deep_copies_inside_a_dry_run_are_fake_and_the_process_exits_cleanly() -> None:
    # torch's Tensor.__deepcopy__ under a fake mode fails half-way in set_ and corrupts the heap: the
    # process dies at exit (found through Lightning's self.log, whose torchmetrics state deep-copies
    # a tensor made in the cell). A subprocess, so that such a death shows as its exit status.
    proc = _run(r"""
    import copy, torch, gpumagic
    from torch import nn
    from torch._subclasses.fake_tensor import FakeTensor
    real = torch.ones(1000)
    model = nn.Linear(8, 8)
    with gpumagic.track(dry_run=True, device="cpu", budget="1GiB", namespace={"model": model}) as t:
        made = torch.tensor(0.0)  # a constant: its fake keeps the real value
        copies = [copy.deepcopy(made), copy.deepcopy(real), copy.deepcopy(torch.zeros(3, requires_grad=True))]
        print("FAKE", [isinstance(c, FakeTensor) for c in copies], copies[2].requires_grad)
        print("SHAPES", [tuple(c.shape) for c in copies])
    print("AFTER", type(copy.deepcopy(real)).__name__, t.report.dry_run)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FAKE [True, True, True] True" in proc.stdout
    assert "SHAPES [(), (1000,), (3,)]" in proc.stdout
    assert "AFTER Tensor True" in proc.stdout  # outside the dry run, copies are torch's own again
    assert "Attempted to set the storage" not in proc.stderr


# --- %find_batch --dry-run ----------------------------------------------------------------------------


def test_find_batch_dry_run_plans_every_trial(ip: InteractiveShell, clean_ns: None) -> None:
    ip.run_cell("from torch.utils.data import DataLoader, TensorDataset\n"
                "data = TensorDataset(torch.randn(4096, 64), torch.randint(0, 10, (4096,)))\n"
                "model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 10))\n"
                "opt = torch.optim.Adam(model.parameters())")
    before = dict(ip.user_ns)
    res = ip.run_cell("%%find_batch --dry-run -d cpu --budget 8MiB --var bs -o -q\n"
                      "for x, y in DataLoader(data, batch_size=bs):\n"
                      "    loss = F.cross_entropy(model(x), y)\n"
                      "    opt.zero_grad(); loss.backward(); opt.step()\n").result
    assert res.dry_run
    assert all(t.planned for t in res.trials)
    assert res.max_batch_size is not None
    assert 8 < res.max_batch_size < 4096
    assert res.predicted_peak_bytes <= 8 * MiB
    assert repr(res).startswith("<BatchSearchResult PLANNED")
    assert all(n.startswith("_") for n in set(ip.user_ns) - set(before))  # only IPython's output history
    assert not ip.user_ns["opt"].state


def test_find_batch_line_form_dry_run_with_loader(ip: InteractiveShell, clean_ns: None) -> None:
    ip.run_cell("from torch.utils.data import DataLoader, TensorDataset\n"
                "train_loader = DataLoader(TensorDataset(torch.randn(2048, 32), torch.randint(0, 4, (2048,))), "
                "batch_size=8)\nmodel = nn.Linear(32, 4); opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
                "def train(m, loader):\n    for x, y in loader:\n"
                "        F.cross_entropy(m(x), y).backward(); opt.step(); opt.zero_grad()\n")
    res = ip.run_line_magic("find_batch", "--dry-run -d cpu --budget 1MiB --loader train_loader -o -q "
                            "-- train(model, train_loader)")
    assert res.dry_run
    assert res.max_batch_size is not None
    assert res.max_batch_size > 8
    assert ip.user_ns["train_loader"].batch_size == 8


def test_find_batch_api_dry_run_for_a_gpu() -> None:
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.Adam(model.parameters())
    ns = {"model": model, "opt": opt, "torch": torch}

    def trial(b: int) -> None:
        for _ in range(3):
            ns["model"](torch.randn(b, 256).cuda()).sum().backward()
            ns["opt"].step()

    res = gpumagic.find_batch(trial, dry_run=True, gpu="T4", device="cuda", namespace=ns, max_size=4096,
                              progress=False)
    assert res.dry_run
    assert res.recommended_batch_size == 4096
    assert res.device == "T4 (cuda)"
    assert not opt.state


def test_widget_draws_planned_trials_distinctly(ip: InteractiveShell, clean_ns: None) -> None:
    pytest.importorskip("matplotlib")
    from gpumagic.render.widgets import search_readout

    ip.run_cell("model = nn.Linear(64, 64); opt = torch.optim.SGD(model.parameters(), lr=0.1)")
    res = ip.run_cell("%%find_batch --dry-run -d cpu --budget 2MiB --var bs -o -q\n"
                      "for _ in range(3):\n    model(torch.randn(bs, 64)).sum().backward(); opt.step()\n").result
    b = res.trials[-1].batch_size
    assert any("(planned " in line for line in search_readout(res, b))
    assert "batch-size plan (dry run)" in res.to_text()


# --- plan, then verify: a real search ------------------------------------------------------------------

SEARCH_SETUP = """
from torch.utils.data import DataLoader, TensorDataset
data = TensorDataset(torch.randn(4096, 64), torch.randint(0, 10, (4096,)))
model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 10))
opt = torch.optim.Adam(model.parameters())
"""
SEARCH_CELL = """
for x, y in DataLoader(data, batch_size=bs):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
"""


def test_real_search_plans_first_and_verifies_with_two_real_trials(ip: InteractiveShell, clean_ns: None) -> None:
    ip.run_cell(SEARCH_SETUP)
    res = ip.run_cell("%%find_batch -d cpu --budget 8MiB --var bs -o -q" + SEARCH_CELL).result
    real = [t for t in res.trials if not t.planned]
    assert [t.oom for t in real] == [False, False]
    assert res.max_batch_size == real[-1].batch_size
    assert res.reason.startswith("planned on fake tensors")
    assert not res.dry_run


def test_real_search_trusts_real_trials_when_the_plan_is_off(ip: InteractiveShell, clean_ns: None) -> None:
    ip.run_cell(SEARCH_SETUP)
    # a size read from data: the plan's placeholder (1) is far from the real value (bs)
    cell = SEARCH_CELL + "    extra = torch.zeros(int(torch.ones(bs).sum()) * 2048)\n"
    res = ip.run_cell("%%find_batch -d cpu --budget 8MiB --var bs -o -q" + cell).result
    assert any("the plan on fake tensors was off at batch" in n and "trusted real trials" in n for n in res.notes)
    assert res.max_batch_size is not None


def test_real_search_without_a_plan_says_why(ip: InteractiveShell, clean_ns: None) -> None:
    ip.run_cell(SEARCH_SETUP)
    cell = SEARCH_CELL + "    kept = x[x > 0]\n"
    res = ip.run_cell("%%find_batch -d cpu --budget 8MiB --var bs -o -q" + cell).result
    assert any(n.startswith("no plan on fake tensors") for n in res.notes)
    assert not any(t.planned for t in res.trials)


def test_the_python_api_plans_first_only_when_asked() -> None:
    from torch import nn
    from torch.nn import functional as F

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), 0.1)
    calls: list[int] = []

    def trial(b: int) -> None:
        calls.append(b)  # the planned trials call it too: a count here is why planning is opt-in
        for _ in range(3):
            loss = F.cross_entropy(model(torch.randn(b, 64)), torch.randint(0, 10, (b,)))
            opt.zero_grad()
            loss.backward()
            opt.step()

    plain = gpumagic.find_batch(trial, device="cpu", budget="8MiB", progress=False)
    assert not any(t.planned for t in plain.trials)
    assert len(calls) == len(plain.trials)
    planned = gpumagic.find_batch(trial, device="cpu", budget="8MiB", progress=False, plan_first=True)
    assert any(t.planned for t in planned.trials)

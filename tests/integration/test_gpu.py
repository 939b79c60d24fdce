"""Checks that need a real accelerator; skipped cleanly without one (see conftest.py)."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gpumagic

pytestmark = pytest.mark.gpu
MiB = 2**20


def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return torch.device("cuda", 0)


def test_cuda_peak_matches_the_allocator_for_known_allocations():
    dev = _cuda()
    with gpumagic.track(device=dev) as t:
        a = torch.empty(8 * MiB, dtype=torch.uint8, device=dev)
        b = torch.empty(4 * MiB, dtype=torch.uint8, device=dev)
        del a
    assert t.report.peak_delta_bytes == 12 * MiB
    assert t.report.backend == "cuda"
    assert t.report.reserved_peak_bytes >= 12 * MiB
    del b


def test_cuda_steps_and_losses_without_a_sync_per_step():
    dev = _cuda()
    torch.manual_seed(0)
    model = nn.Linear(64, 8).to(dev)
    opt = torch.optim.SGD(model.parameters(), 0.1)
    truth = []
    with gpumagic.track(device=dev) as t:
        for _ in range(600):  # more than one chunk of loss copies
            loss = F.cross_entropy(model(torch.randn(32, 64, device=dev)), torch.randint(0, 8, (32,), device=dev))
            opt.zero_grad()
            loss.backward()
            opt.step()
            truth.append(loss.detach())
    assert t.report.losses == pytest.approx([float(x) for x in truth], rel=1e-6)
    assert all(s.peak_bytes >= t.report.baseline_bytes for s in t.report.steps)


def test_cuda_budget_sets_and_restores_the_memory_fraction():
    dev = _cuda()
    total = torch.cuda.get_device_properties(dev).total_memory
    with pytest.raises(torch.OutOfMemoryError), gpumagic.track(device=dev, budget=256 * MiB):
        torch.empty(512 * MiB, dtype=torch.uint8, device=dev)
    x = torch.empty(min(total // 4, 2**30), dtype=torch.uint8, device=dev)  # the fraction is back
    del x


def test_cuda_oom_cell_frees_memory_back_to_baseline(ip, clean_ns):
    dev = _cuda()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(dev)
    ip.run_cell(
        "%%gpumem -d cuda --budget 512MiB\n"
        "xs = []\n"
        "for _ in range(64): xs.append(torch.empty(64 * 2**20, dtype=torch.uint8, device='cuda'))\n"
    )
    ip.user_ns.pop("xs", None)
    assert torch.cuda.memory_allocated(dev) <= base * 1.05 + MiB


def test_device_status_lists_totals_and_processes():
    _cuda()
    st = gpumagic.device_status("cuda")
    assert st.total_bytes
    assert st.free_bytes is not None
    assert st.name


def test_nccl_ranks_gather_their_reports_and_agree_on_a_batch_size(tmp_path):
    from test_distributed import _run

    n = torch.cuda.device_count()
    if n < 1:
        pytest.skip("needs CUDA for NCCL")
    (tmp_path / "track").mkdir()
    tracked = _run("track_mlp", ["2GiB"] * n, tmp_path / "track", device="cuda")
    assert [r["rank"] for r in tracked[0]["report"]["ranks"]] == list(range(n))
    assert all(r["device"] == f"cuda:{i}" for i, r in enumerate(tracked[0]["report"]["ranks"]))
    found = _run("find_mlp", ["256MiB"] * n, tmp_path, device="cuda")
    assert all("error" not in r for r in found), found
    assert len({json.dumps(r["result"]["trials"]) for r in found}) == 1
    assert all(r["restored"] and r["trained_after"] and r["grads_equal_across_ranks"] for r in found)


# --- dry runs against the CUDA allocator (issue 13): the same cells, planned and measured ----------

_DRY_CELLS = {
    "mlp": ("model = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),"
            " nn.Linear(4096, 10)).cuda()\nopt = torch.optim.AdamW(model.parameters())\n"
            "x = torch.randn(512, 1024, device='cuda'); y = torch.randint(0, 10, (512,), device='cuda')\n",
            "for _ in range(3):\n    loss = F.cross_entropy(model(x), y)\n"
            "    opt.zero_grad(); loss.backward(); opt.step()\n"),
    "cnn_bn": ("model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),"
               " nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.Flatten(),"
               " nn.Linear(64 * 32 * 32, 10)).cuda()\nopt = torch.optim.Adam(model.parameters())\n"
               "x = torch.randn(128, 3, 32, 32, device='cuda'); y = torch.randint(0, 10, (128,), device='cuda')\n",
               "for _ in range(3):\n    loss = F.cross_entropy(model(x), y)\n"
               "    opt.zero_grad(); loss.backward(); opt.step()\n"),
    "transformer": ("layer = nn.TransformerEncoderLayer(512, 8, 2048, batch_first=True)\n"
                    "model = nn.TransformerEncoder(layer, 6).cuda()\nopt = torch.optim.AdamW(model.parameters())\n"
                    "x = torch.randn(32, 256, 512, device='cuda')\n",
                    "for _ in range(3):\n    loss = model(x).pow(2).mean()\n"
                    "    opt.zero_grad(); loss.backward(); opt.step()\n"),
}


@pytest.mark.parametrize("name", sorted(_DRY_CELLS))
def test_dry_run_on_cuda_is_within_5_percent_of_the_allocator(name):
    _cuda()
    setup, cell = _DRY_CELLS[name]
    ns = {"torch": torch, "nn": nn, "F": F}
    torch.manual_seed(0)
    exec(setup, ns)
    # cuBLAS/cuDNN workspaces come with the first kernels: make them before either measurement
    with torch.no_grad():
        ns["model"](ns["x"])
    torch.cuda.synchronize()
    with gpumagic.track(device="cuda", dry_run=True, namespace=ns) as t:
        exec(cell, ns)
    plan = t.report
    assert plan.dry_run
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    exec(cell, ns)
    torch.cuda.synchronize()
    real = torch.cuda.max_memory_allocated() - base
    assert plan.peak_delta_bytes == pytest.approx(real, rel=0.05), (plan.peak_delta_bytes, real)

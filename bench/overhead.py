"""Wall-time cost of %%gpumem's tracking on a CPU training loop, measured side by side.

The same loop (an MLP and a small CNN, 200+ steps each) runs bare and under the tracker in
interleaved repeats, in one process; the median of the per-pair ratios is printed. On cuda no
dispatch mode is used (allocator counters only), so there the goal is <= 1.01x; on cpu the exact
tracker sees every op, and the goal is <= 1.25x (an empty TorchDispatchMode alone costs
1.14-1.34x on this small-op loop).

    python bench/overhead.py [--repeats 7] [--steps 200] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import gpumagic


def mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    m = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    return m, torch.randn(64, 512), torch.randint(0, 10, (64,))


def cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    m = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 10),
    )
    return m, torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))


def measure(name: str, make, steps: int, repeats: int, device: str, budget: str | None) -> float:
    torch.manual_seed(0)
    model, x, y = make()
    model, x, y = model.to(device), x.to(device), y.to(device)
    opt = torch.optim.Adam(model.parameters(), 1e-3)

    def loop() -> None:
        for _ in range(steps):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    loop()  # warm-up, both paths
    ratios = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loop()
        bare = time.perf_counter() - t0
        t0 = time.perf_counter()
        with gpumagic.track(device=device, budget=budget) as t:
            loop()
        ratios.append((time.perf_counter() - t0) / bare)
    assert t.report.total_steps == steps, t.report
    med = statistics.median(ratios)
    print(f"{name:5s} {device:6s} budget={budget or '-':6s} bare {bare * 1e3 / steps:7.2f} ms/step   "
          f"tracked/bare median {med:.3f}x (min {min(ratios):.3f}, max {max(ratios):.3f}, {repeats} pairs)")
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {a.device}")
    budgets = [None, "8GiB"] if a.device == "cpu" else [None]
    for budget in budgets:
        for name, make in (("mlp", mlp), ("cnn", cnn)):
            measure(name, make, a.steps, a.repeats, a.device, budget)


if __name__ == "__main__":
    main()

"""Wall-time cost of %%gpumem's tracking on a CPU training loop, read against its floor.

The same loop (the quickstart's 128-512-512-10 MLP, a 512-1024-1024-10 MLP and a small CNN,
200 steps each) runs bare, under an empty ``TorchDispatchMode`` (the least any per-op tracker
can cost: the floor) and under the tracker, interleaved with the order rotated, in one process.
The fixed cost of entering and leaving a tracked block (the baseline scan of live tensors) is
measured apart, on an empty block, and taken out of the per-op figures. Columns: the empty mode
over bare, the tracker over bare, the tracker over the empty mode, and entry+exit in ms.

On cuda no dispatch mode is used (allocator counters only): there the goal is <= 1.01x bare.
On cpu the goal is the floor: tracked / empty mode <= 1.05x.

    python bench/overhead.py [--repeats 9] [--steps 200] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gpumagic


def quickstart() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    m = nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    return m, torch.randn(64, 128), torch.randint(0, 10, (64,))


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


class EmptyMode(TorchDispatchMode):
    """The floor: a Python dispatch mode that only calls the op."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(name: str, make: Callable[[], Any], steps: int, repeats: int, device: str, budget: str | None) -> None:
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

    def bare() -> None:
        loop()

    def empty() -> None:
        with EmptyMode():
            loop()

    def tracked() -> None:
        with gpumagic.track(device=device, budget=budget):
            loop()

    def block() -> None:
        with gpumagic.track(device=device, budget=budget):
            pass

    loop()  # warm-up
    runs = [bare, empty, tracked]
    bare_s, floor, vs_bare, vs_floor, entry = [], [], [], [], []
    for rep in range(repeats):
        t = {fn.__name__: _timed(fn) for fn in runs[rep % 3:] + runs[:rep % 3]}  # order rotated
        e = _timed(block)
        entry.append(e)
        per_op = t["tracked"] - e
        bare_s.append(t["bare"])
        floor.append(t["empty"] / t["bare"])
        vs_bare.append(per_op / t["bare"])
        vs_floor.append(per_op / t["empty"])
    med = statistics.median
    print(f"{name:10s} {device:6s} {budget or '-':6s} {med(bare_s) / steps * 1e3:8.2f} "
          f"{med(floor):9.3f}x {med(vs_bare):9.3f}x {med(vs_floor):9.3f}x {med(entry) * 1e3:9.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {a.device}")
    budgets = [None, "8GiB"] if a.device == "cpu" else [None]
    print(f"medians of {a.repeats} interleaved runs; per-op figures exclude entry+exit")
    print(f"{'loop':10s} {'device':6s} {'budget':6s} {'ms/step':>8s} {'empty/bare':>10s} {'track/bare':>10s} "
          f"{'track/empty':>10s} {'entry+exit ms':>13s}")
    for budget in budgets:
        for name, make in (("quickstart", quickstart), ("mlp", mlp), ("cnn", cnn)):
            measure(name, make, a.steps, a.repeats, a.device, budget)


if __name__ == "__main__":
    main()

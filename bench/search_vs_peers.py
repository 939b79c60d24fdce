"""Batch-size finders side by side on the same simulated device, in one run.

Methods: gpumagic's search (``gpumagic.find_batch``), Lightning's ``Tuner.scale_batch_size`` in
``power`` and ``binsearch`` modes, and Accelerate's ``find_executable_batch_size`` (from its
default start 128 and from 1024). Each runs its own real code; the device is gpumagic's CPU
tracker with a budget, whose OOM is worded like CUDA's so that the peers recognise it.

Workloads: an analytic oracle (every trial allocates 100 MiB + 1 MiB per sample, capacity
800.5 MiB, so the true maximum is 700), and two real training loops (an MLP and a small CNN)
whose true maximum is found first by exhaustive bisection (not counted).

Printed per method: trials, OOMs, the size returned, the true maximum, whether the returned size
was ever run, and wall time. For gpumagic also the fit's predicted peak at ``max_batch_size``
against the measured one.

    pip install -e ".[bench]"   # lightning, accelerate
    python bench/search_vs_peers.py [--only oracle|mlp|cnn]
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gpumagic
from gpumagic.tracking import Tracker

MiB = 2**20
STEPS = 3


@dataclass
class Workload:
    name: str
    budget: int
    make_model: Callable[[], nn.Module]
    data: TensorDataset | None
    alloc_mib_per_sample: int = 0  # the oracle: a buffer of 100 + b MiB per step
    true_max: int | None = None


@dataclass
class Row:
    method: str
    sizes: list[int] = field(default_factory=list)
    ooms: int = 0
    returned: int | None = None
    seconds: float = 0.0
    extra: str = ""


def _oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e)


def train_steps(w: Workload, model: nn.Module, opt: torch.optim.Optimizer, b: int, steps: int = STEPS) -> None:
    """The user's loop at batch size b: `steps` optimizer steps."""
    if w.alloc_mib_per_sample:
        for _ in range(steps):
            buf = torch.empty((100 + b) * MiB, dtype=torch.uint8)
            loss = model(torch.ones(2, 8)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            del buf
        return
    assert w.data is not None
    loader = DataLoader(w.data, batch_size=b, shuffle=True)
    for i, (x, y) in enumerate(loader):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i + 1 >= steps:
            break


def runs(w: Workload, b: int) -> bool:
    model = w.make_model()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    try:
        with Tracker("cpu", w.budget):
            train_steps(w, model, opt, b)
    except Exception as e:
        if not _oom(e):
            raise
        return False
    return True


def true_max(w: Workload) -> int:
    lo, hi = 1, 2
    while runs(w, hi):
        lo, hi = hi, hi * 2
        if w.data is not None and hi >= len(w.data):
            hi = len(w.data)
            if runs(w, hi):
                return hi
            break
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if runs(w, mid) else (lo, mid)
    return lo


def run_gpumagic(w: Workload) -> Row:
    row = Row("gpumagic")
    model = w.make_model()
    opt = torch.optim.Adam(model.parameters(), 1e-3)

    def trial(b: int) -> None:
        row.sizes.append(b)
        train_steps(w, model, opt, b, steps=10**6)  # gpumagic stops the trial after its steps

    t0 = time.perf_counter()
    res = gpumagic.find_batch(trial, device="cpu", budget=w.budget, start=2, steps=STEPS, progress=False,
                              plan_first=True, dataset_size=len(w.data) if w.data is not None else None)
    row.seconds = time.perf_counter() - t0
    # planned trials (fake tensors) call the code too but use no device: only real trials count
    row.sizes = [t.batch_size for t in res.trials if not t.planned]
    row.ooms = sum(t.oom for t in res.trials if not t.planned)
    row.returned = res.max_batch_size
    planned = sum(t.planned for t in res.trials)
    measured = next((t.peak_bytes for t in res.trials if t.batch_size == res.max_batch_size and not t.oom), None)
    if res.fit is not None and measured and res.max_batch_size:
        err = (res.fit.predict(res.max_batch_size) - measured) / measured
        row.extra = f"recommended {res.recommended_batch_size}; fit error at max {err:+.2%}"
    if planned:
        row.extra += f"; {planned} planned trials first ({res.reason.split(':')[0]})"
    return row


def run_lightning(w: Workload, mode: str) -> Row:
    import lightning as L
    from lightning.pytorch.tuner import Tuner

    row = Row(f"lightning {mode}")
    wl = w

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.batch_size = 2
            self.net = wl.make_model()
            self._current: int | None = None

        def train_dataloader(self) -> DataLoader[Any]:
            row.sizes.append(self.batch_size)
            if wl.data is not None:
                return DataLoader(wl.data, batch_size=self.batch_size, shuffle=True)
            n = max(self.batch_size * (STEPS + 1), 64)
            return DataLoader(TensorDataset(torch.ones(n, 8), torch.zeros(n, dtype=torch.long)),
                              batch_size=self.batch_size)

        def training_step(self, batch: Any, i: int) -> torch.Tensor:
            x, y = batch
            if wl.alloc_mib_per_sample:
                buf = torch.empty((100 + self.batch_size) * MiB, dtype=torch.uint8)
                loss = self.net(x[:2]).sum()
                del buf
                return loss
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), 1e-3)

    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir="/tmp/gm-bench")
    t0 = time.perf_counter()
    with Tracker("cpu", w.budget):
        returned = Tuner(trainer).scale_batch_size(Module(), mode=mode, init_val=2, steps_per_trial=STEPS)
    row.seconds = time.perf_counter() - t0
    row.returned = returned
    # Lightning asks for the loader once per trial, and again for the same size when it resets:
    # count each consecutive size once
    row.sizes = [b for i, b in enumerate(row.sizes) if i == 0 or b != row.sizes[i - 1]]
    row.sizes = row.sizes[:-1]  # the last request builds the loader for the run after the search
    row.ooms = sum(1 for b in row.sizes if w.true_max is not None and b > w.true_max)
    return row


def run_accelerate(w: Workload, start: int) -> Row:
    from accelerate.utils import find_executable_batch_size

    row = Row(f"accelerate from {start}")
    model = w.make_model()
    opt = torch.optim.Adam(model.parameters(), 1e-3)

    @find_executable_batch_size(starting_batch_size=start)
    def loop(batch_size: int) -> int:
        row.sizes.append(batch_size)
        with Tracker("cpu", w.budget):
            train_steps(w, model, opt, batch_size)
        return batch_size

    t0 = time.perf_counter()
    row.returned = loop()
    row.seconds = time.perf_counter() - t0
    row.ooms = len(row.sizes) - 1
    return row


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 10),
    )


def workloads() -> list[tuple[str, Callable[[], Workload]]]:
    """Built one at a time: a workload's data set must not sit in the next one's baseline."""
    torch.manual_seed(0)
    return [
        ("oracle", lambda: Workload("oracle", int(800.5 * MiB), lambda: nn.Linear(8, 1), None, alloc_mib_per_sample=1)),
        ("mlp", lambda: Workload(
            "mlp", 64 * MiB, mlp, TensorDataset(torch.randn(16384, 256), torch.randint(0, 10, (16384,))))),
        ("cnn", lambda: Workload(
            "cnn", 96 * MiB, cnn, TensorDataset(torch.randn(4096, 3, 32, 32), torch.randint(0, 10, (4096,))))),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("oracle", "mlp", "cnn"), default=None)
    ap.add_argument("--verbose", action="store_true", help="print the sizes each method tried")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print("| workload | method | trials | OOMs | returned | true max | returned size was run | wall s | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, make in workloads():
        if a.only and name != a.only:
            continue
        w = make()
        w.true_max = true_max(w)
        rows = [run_gpumagic(w), run_lightning(w, "power"), run_lightning(w, "binsearch"),
                run_accelerate(w, 128), run_accelerate(w, 1024)]
        for r in rows:
            was_run = r.returned in r.sizes if r.returned is not None else False
            if a.verbose:
                print("sizes:", r.sizes)
            print(f"| {w.name} | {r.method} | {len(r.sizes)} | {r.ooms} | {r.returned} | {w.true_max} | "
                  f"{'yes' if was_run else 'no'} | {r.seconds:.2f} | {r.extra} |", flush=True)


if __name__ == "__main__":
    main()

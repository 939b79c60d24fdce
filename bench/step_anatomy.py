"""Step anatomy and host memory: the figures behind the loader-advice thresholds and the host peak.

1. Loader sweep: a Dataset whose ``__getitem__`` costs ``c`` ms a sample (sleeping, as a file
   read waits; or a CPU loop), batch 32, a 64-256-256-10 MLP, one torch thread. For each cost:
   the data-wait fraction gpumagic reports with ``num_workers=0``, the advice it gives, and the
   mean step time (after the first) when the loader is rebuilt as the advice says, against the
   original: the median of ``--repeats`` runs each. An in-memory ``TensorDataset`` is the c = 0 row.
   This table is where ``DATA_WAIT_THRESHOLD`` and ``MIN_DATA_SECONDS`` in
   ``gpumagic/dataloading.py`` come from.
2. Host peak: a block that allocates and frees an N MB numpy array, the reported host peak over
   the baseline against N; and the cost of one per-step host-peak reading (µs).

    python bench/step_anatomy.py [--repeats 3] [--steps 16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import gpumagic
from gpumagic._hostmem import HostPeak


class Costly(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self, n: int, ms: float, cpu: bool) -> None:
        self.x, self.y = torch.randn(n, 64), torch.randint(0, 10, (n,))
        self.ms, self.cpu = ms, cpu

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cpu:
            end = time.thread_time() + self.ms / 1000
            while time.thread_time() < end:
                pass
        elif self.ms:
            time.sleep(self.ms / 1000)
        return self.x[i], self.y[i]


def run(ds: Any, steps: int, **kw: Any) -> gpumagic.MemoryReport:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = DataLoader(ds, batch_size=32, **kw)
    with gpumagic.track(device="cpu") as t:
        for i, (x, y) in enumerate(loader):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i + 1 >= steps:
                break
    return t.report


def mean_step(rep: gpumagic.MemoryReport) -> float:
    later = rep.steps[1:]
    return sum(s.seconds for s in later) / max(1, sum(s.count for s in later))


def loader_sweep(repeats: int, steps: int) -> None:
    print("per-sample cost      wait at w=0  data/step  compute/step  advice                  speed-up followed")
    cases: list[tuple[str, Any]] = [("in memory (Tensor)", TensorDataset(torch.randn(2048, 64),
                                                                          torch.randint(0, 10, (2048,))))]
    for ms in (0.05, 0.1, 0.25, 0.5, 1.0, 2.0):
        cases.append((f"{ms:g} ms sleep", Costly(32 * (steps + 1), ms, cpu=False)))
    for ms in (0.25, 1.0):
        cases.append((f"{ms:g} ms CPU", Costly(32 * (steps + 1), ms, cpu=True)))
    for name, ds in cases:
        base, followed, fracs, datas, computes = [], [], [], [], []
        kwargs: dict[str, Any] = {}
        for _ in range(repeats):
            rep = run(ds, steps)
            base.append(mean_step(rep))
            fracs.append(rep.data_wait_fraction or 0.0)
            later = rep.steps[1:]
            datas.append(statistics.mean(s.data_seconds or 0.0 for s in later))
            computes.append(statistics.mean(s.compute_seconds or 0.0 for s in later))
            advice = rep.loader_advice
            kwargs = advice.loader_kwargs() if advice is not None else {"num_workers": 2}
            if "persistent_workers" in kwargs:
                del kwargs["persistent_workers"]
            followed.append(mean_step(run(ds, steps, **kwargs)))
        label = (str(kwargs) if rep.loader_advice is not None else f"none (tried {kwargs})")
        print(f"{name:<20} {statistics.median(fracs):>10.0%}  {statistics.median(datas) * 1e3:>7.2f} ms"
              f"  {statistics.median(computes) * 1e3:>9.2f} ms  {label:<24}"
              f"{statistics.median(base) / statistics.median(followed):>6.2f}x", flush=True)


def host_peak() -> None:
    for mb in (100, 300, 600):
        with gpumagic.track(device="cpu") as t:
            a = np.ones(mb * 10**6 // 8)
            del a
        r = t.report
        delta = r.host_delta_bytes or 0
        print(f"allocate and free {mb} MB: host peak +{delta / 1e6:.0f} MB over the baseline "
              f"({(delta / (mb * 1e6) - 1):+.1%})")
    peak = HostPeak()
    peak.start()
    n = 20_000
    t0 = time.perf_counter()
    for _ in range(n):
        peak.take()
    each = (time.perf_counter() - t0) / n * 1e6
    print(f"one per-step host peak reading (write clear_refs, read VmHWM): {each:.1f} µs"
          f"{' (sampled: no clear_refs here)' if peak.sampled else ''}")
    peak.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore", message="This DataLoader will create")
    loader_sweep(args.repeats, args.steps)
    host_peak()


if __name__ == "__main__":
    main()

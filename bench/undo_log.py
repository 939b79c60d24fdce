"""What the undo log behind %find_batch's restore costs: time per trial and host memory.

A trial here is what %find_batch runs: a few training steps of a model with Adam. Each model's
trial runs bare and inside ``Snapshot.recording()`` (the undo log: a dispatch mode that copies
each pre-existing storage once before its first write) followed by ``Snapshot.restore()``,
interleaved, median of ``--repeats``. Also measured: ``Snapshot.take`` (one scan of live tensors
and the walk of what the roots reach) and the host bytes the log holds against the bytes of the
model's parameters, gradients and optimizer state (what a trial writes).

Columns: bare ms per trial, logged ms per trial (restore included), their ratio, restore ms,
take ms, log copies / state bytes. Last line: microseconds per small op that writes nothing, bare,
under an empty dispatch mode (the floor of any per-op layer) and under the log.

    python bench/undo_log.py [--repeats 7] [--steps 3] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gpumagic.state import Snapshot


def small_mlp() -> tuple[nn.Module, Callable[[], torch.Tensor], int]:
    m = nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    return m, lambda: torch.randn(64, 128), 10


def mlp() -> tuple[nn.Module, Callable[[], torch.Tensor], int]:
    m = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    return m, lambda: torch.randn(64, 512), 10


def cnn() -> tuple[nn.Module, Callable[[], torch.Tensor], int]:
    m = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 10),
    )
    return m, lambda: torch.randn(32, 3, 32, 32), 10


def _trial(model: nn.Module, opt: torch.optim.Optimizer, x: Callable[[], torch.Tensor], classes: int,
           steps: int) -> None:
    for _ in range(steps):
        inp = x()
        loss = F.cross_entropy(model(inp), torch.randint(0, classes, (inp.shape[0],)))
        opt.zero_grad()
        loss.backward()
        opt.step()


def _state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    n = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    n += sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    n += sum(v.nbytes for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))
    return n


def measure(make: Callable[[], Any], repeats: int, steps: int) -> dict[str, float]:
    model, x, classes = make()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    _trial(model, opt, x, classes, 2)  # gradients and Adam state exist before the search, as in a notebook
    t0 = time.perf_counter()
    snap = Snapshot.take([model, opt])
    take_s = time.perf_counter() - t0
    bare: list[float] = []
    logged: list[float] = []
    restore: list[float] = []
    for i in range(repeats * 2):
        if (i % 2 == 0) == (i // 2 % 2 == 0):  # the order alternates between pairs
            t0 = time.perf_counter()
            _trial(model, opt, x, classes, steps)
            bare.append(time.perf_counter() - t0)
        else:
            t0 = time.perf_counter()
            with snap.recording():
                _trial(model, opt, x, classes, steps)
            t1 = time.perf_counter()
            problems = snap.restore()
            t2 = time.perf_counter()
            assert not problems, problems
            logged.append(t2 - t0)
            restore.append(t2 - t1)
    assert snap.log is not None
    return {
        "bare_ms": statistics.median(bare) * 1e3,
        "logged_ms": statistics.median(logged) * 1e3,
        "restore_ms": statistics.median(restore) * 1e3,
        "take_ms": take_s * 1e3,
        "copies": snap.log.copied_bytes,
        "state": _state_bytes(model, opt),
    }


class _Empty(TorchDispatchMode):
    """The floor of any per-op layer: a dispatch mode that only calls the op."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


def per_op_us(n: int = 20_000, repeats: int = 7) -> tuple[float, float, float]:
    """Microseconds per small op that writes nothing (``torch.add`` on 16 elements): bare, under an
    empty dispatch mode, under the log; interleaved, medians."""
    x = torch.ones(16)
    snap = Snapshot.take(roots=[x])
    times: dict[str, list[float]] = {"bare": [], "empty": [], "log": []}
    for _ in range(repeats):
        for name, ctx in (("bare", contextlib.nullcontext()), ("empty", _Empty()), ("log", snap.recording())):
            with ctx:
                t0 = time.perf_counter()
                for _ in range(n):
                    torch.add(x, 1)
                times[name].append(time.perf_counter() - t0)
        snap.restore()
    bare, empty, log = (statistics.median(times[k]) / n * 1e6 for k in ("bare", "empty", "log"))
    return bare, empty, log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps per trial, "
          f"median of {args.repeats}")
    print(f"{'model':<28}{'bare ms':>9}{'logged ms':>11}{'ratio':>8}{'restore ms':>12}{'take ms':>9}"
          f"{'copies/state':>14}")
    for name, make in (("MLP 128-512-512-10, b 64", small_mlp), ("MLP 512-1024-1024-10, b 64", mlp),
                       ("CNN + BatchNorm, b 32", cnn)):
        r = measure(make, args.repeats, args.steps)
        print(f"{name:<28}{r['bare_ms']:>9.1f}{r['logged_ms']:>11.1f}{r['logged_ms'] / r['bare_ms']:>7.2f}x"
              f"{r['restore_ms']:>12.2f}{r['take_ms']:>9.1f}{r['copies'] / r['state']:>13.2f}x"
              f"   ({r['copies'] / 2**20:.1f} MiB of {r['state'] / 2**20:.1f} MiB)")
    bare_us, empty_us, logged_us = per_op_us()
    print(f"a small op that writes nothing: {bare_us:.2f} us bare, {empty_us:.2f} us under an empty dispatch "
          f"mode, {logged_us:.2f} us under the log")


if __name__ == "__main__":
    main()

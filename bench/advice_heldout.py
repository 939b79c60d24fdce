"""Advice followed on held-out loops, in one session that never forgets what it measured.

    python bench/advice_heldout.py [LOOP_INDEX ...]

Five training loops that the tests do not hold (index-batched MLP, CNN and LSTM; DataLoader MLP
and CNN). The three index-batched loops run the very same cell text, and so do the two DataLoader
loops: only the model and data, defined in an earlier cell, change. Unlike bench/advice_followed.py
nothing gpumagic measured is forgotten between cases (the names each loop made are deleted
before the next, so each starts from an empty device), as in a notebook where a new model is
defined after an earlier one was measured: a measurement of the same cell text on another model must not be
reused (issue 19, section 4). Per loop: the true maximum batch size by bisection; then out of
memory at 1.3x and 4x of it, cold (no run of this model before) and warm (after a run at a third
of it); suggestion 1 is done literally (a batch size is used, a measuring command is run and its
recommendation used) and the cell runs again. Prints one line per case and the figure.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

_TORCH = "import torch, torch.nn as nn, torch.nn.functional as F\ntorch.manual_seed(0)\n"
_DL = "from torch.utils.data import DataLoader, TensorDataset\n"

INDEXED = (
    "for i in range(3):\n"
    "    idx = torch.randint(0, len(X), (batch_size,))\n"
    "    out = model(X[idx])\n"
    "    loss = F.cross_entropy(out, Y[idx])\n"
    "    opt.zero_grad(); loss.backward(); opt.step()\n"
)
LOADED = (
    "loader = DataLoader(data, batch_size=batch_size, shuffle=True)\n"
    "for step, (x, y) in enumerate(loader):\n"
    "    loss = F.cross_entropy(model(x), y)\n"
    "    opt.zero_grad(); loss.backward(); opt.step()\n"
    "    if step == 2:\n"
    "        break\n"
)
_LSTM = (
    "class Tagger(nn.Module):\n"
    "    def __init__(self):\n"
    "        super().__init__()\n"
    "        self.rnn = nn.LSTM(32, 128, batch_first=True)\n"
    "        self.head = nn.Linear(128, 10)\n"
    "    def forward(self, x):\n"
    "        return self.head(self.rnn(x)[0][:, -1])\n"
)
_CNN = (
    "model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, "
    "padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 8 * 8, 10))\n"
)


def loops() -> tuple[Any, ...]:
    from advice_loops import Loop

    return (
        Loop("index-batched MLP, SGD", _TORCH + "X = torch.randn(4096, 64); Y = torch.randint(0, 10, (4096,))\n"
             "model = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 10))\n"
             "opt = torch.optim.SGD(model.parameters(), 0.1)\n", INDEXED, "batch_size", "16MiB"),
        Loop("index-batched CNN, Adam", _TORCH + "X = torch.randn(2048, 3, 16, 16); Y = torch.randint(0, 10, (2048,))\n"
             + _CNN + "opt = torch.optim.Adam(model.parameters(), 1e-3)\n", INDEXED, "batch_size", "48MiB"),
        Loop("index-batched LSTM, AdamW", _TORCH + _LSTM + "X = torch.randn(2048, 16, 32); "
             "Y = torch.randint(0, 10, (2048,))\nmodel = Tagger()\n"
             "opt = torch.optim.AdamW(model.parameters(), 1e-3)\n", INDEXED, "batch_size", "32MiB"),
        Loop("DataLoader MLP, SGD momentum", _TORCH + _DL + "data = TensorDataset(torch.randn(4096, 128), "
             "torch.randint(0, 10, (4096,)))\nmodel = nn.Sequential(nn.Linear(128, 768), nn.ReLU(), "
             "nn.Linear(768, 10))\nopt = torch.optim.SGD(model.parameters(), 0.05, momentum=0.9)\n",
             LOADED, "batch_size", "12MiB"),
        Loop("DataLoader CNN, AdamW", _TORCH + _DL + "data = TensorDataset(torch.randn(2048, 3, 16, 16), "
             "torch.randint(0, 10, (2048,)))\n" + _CNN + "opt = torch.optim.AdamW(model.parameters(), 1e-3)\n",
             LOADED, "batch_size", "40MiB"),
    )


def follow(ip: Any, loop: Any, tmax: int, *, warm: bool, factor: float) -> Any:
    """As advice_loops.follow, but nothing measured before is forgotten."""
    from advice_loops import Case, run_at
    from IPython.utils.capture import capture_output

    import gpumagic.oom

    if warm:
        assert run_at(ip, loop, max(1, tmax // 3)).error_in_exec is None
    else:
        with capture_output():
            ip.run_cell(loop.setup)  # a new model and data: what was measured before was another model
    r = run_at(ip, loop, math.ceil(factor * tmax), fresh=False)
    assert r.error_in_exec is not None, f"{loop.name}: no OOM at {factor} x {tmax}"
    advice = gpumagic.oom.last_advice()
    first = advice.suggestions[0] if advice is not None and advice.suggestions else None
    b: int | None = None
    if first is not None and first.kind == "batch_size":
        b = first.batch_size
    elif first is not None and first.kind == "measure" and first.code:
        with capture_output():
            m = ip.run_cell(first.code, store_history=True)
        res = ip.magics_manager.registry["GPUMagics"].presenter.last_search
        if m.error_in_exec is None and res is not None:
            b = res.recommended_batch_size
    elif first is not None and first.code:  # free memory as it says, then the same size again
        with capture_output():
            done = ip.run_cell(first.code, store_history=True)
        b = ip.user_ns[loop.var] if done.error_in_exec is None else None
    fits = b is not None and run_at(ip, loop, b, fresh=False).error_in_exec is None
    return Case(loop.name, warm, factor, tmax, first.kind if first else None, b, fits)


def main() -> int:
    from advice_loops import summary, true_max
    from IPython.testing.globalipapp import start_ipython

    ip = start_ipython()
    ip.run_line_magic("load_ext", "gpumagic")
    t0 = time.perf_counter()
    chosen = [loops()[int(i)] for i in sys.argv[1:]] or list(loops())
    cases = []
    for loop in chosen:
        names = set(ip.user_ns)
        try:
            tmax = true_max(ip, loop)
            for warm in (False, True):
                for factor in (1.3, 4.0):
                    c = follow(ip, loop, tmax, warm=warm, factor=factor)
                    cases.append(c)
                    share = f"{c.followed / c.true_max:.0%}" if c.followed else "-"
                    print(f"{c.loop[:32]:32} {'warm' if c.warm else 'cold'} {c.factor:>3}x  max {c.true_max:>5}  "
                          f"suggestion 1: {c.kind!s:<10} -> {c.followed!s:>6} ({share:>5})  "
                          f"{'fits' if c.fits else 'OOM'}", flush=True)
        finally:
            # the next loop starts from an empty device (its true maximum holds for every case), but
            # what gpumagic measured is never forgotten: the same cell text comes back on another model
            for name in set(ip.user_ns) - names:
                del ip.user_ns[name]
    n, m, mean = summary(cases)
    print(f"held-out advice followed: {n}/{m} fit, mean {mean:.0%} of the true max "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

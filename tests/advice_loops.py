"""Training loops of different shapes, and the experiment "OOM, follow suggestion 1, run again".

Used by ``tests/test_advice_followed.py`` and ``bench/advice_followed.py`` (which prints the
figure quoted in the README). Each loop is a setup cell (data, model, optimizer: run fresh
before every run, so optimizer state and RNG are the same each time) and a training cell
that reads its batch size from a variable. The true maximum is found by bisection on the
cell itself; then, per case, the cell runs out of memory at a multiple of it (cold: nothing
measured before; warm: after a run that worked at a third of it), the first suggestion is
followed literally, and the cell runs again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from IPython.utils.capture import capture_output


@dataclass(frozen=True)
class Loop:
    name: str
    setup: str
    cell: str
    var: str
    budget: str


_TORCH = "import torch, torch.nn as nn, torch.nn.functional as F\ntorch.manual_seed(0)\n"
_DL = "from torch.utils.data import DataLoader, TensorDataset\n"

LOOPS: tuple[Loop, ...] = (
    Loop(
        "mlp, DataLoader built in the cell, SGD",
        _TORCH + _DL + "data = TensorDataset(torch.randn(4096, 64), torch.randint(0, 10, (4096,)))\n"
        "model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 10))\n"
        "opt = torch.optim.SGD(model.parameters(), 0.1)\n",
        "loader = DataLoader(data, batch_size=batch_size, shuffle=True)\n"
        "for step, (x, y) in enumerate(loader):\n"
        "    loss = F.cross_entropy(model(x), y)\n"
        "    opt.zero_grad(); loss.backward(); opt.step()\n"
        "    if step == 2:\n"
        "        break\n",
        "batch_size", "8MiB",
    ),
    Loop(
        "small CNN, top-level index batching, out/loss globals, Adam",
        _TORCH + "X = torch.randn(2048, 3, 16, 16); Y = torch.randint(0, 10, (2048,))\n"
        "model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),\n"
        "                      nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16 * 16, 10))\n"
        "opt = torch.optim.Adam(model.parameters(), 1e-3)\n",
        "for i in range(3):\n"
        "    idx = torch.randint(0, len(X), (batch_size,))\n"
        "    x, y = X[idx], Y[idx]\n"
        "    out = model(x)\n"
        "    loss = F.cross_entropy(out, y)\n"
        "    opt.zero_grad()\n"
        "    loss.backward()\n"
        "    opt.step()\n",
        "batch_size", "48MiB",
    ),
    Loop(
        "nanoGPT-style get_batch() from an earlier cell, tiny transformer, AdamW",
        _TORCH + "block_size = 32; vocab = 64\n"
        "data = torch.randint(0, vocab, (20000,))\n"
        "def get_batch():\n"
        "    ix = torch.randint(len(data) - block_size, (batch_size,))\n"
        "    x = torch.stack([data[i:i + block_size] for i in ix])\n"
        "    y = torch.stack([data[i + 1:i + 1 + block_size] for i in ix])\n"
        "    return x, y\n"
        "class Tiny(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.emb = nn.Embedding(vocab, 64)\n"
        "        self.block = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)\n"
        "        self.head = nn.Linear(64, vocab)\n"
        "    def forward(self, x):\n"
        "        return self.head(self.block(self.emb(x)))\n"
        "model = Tiny()\n"
        "optimizer = torch.optim.AdamW(model.parameters(), 3e-4)\n",
        "for it in range(3):\n"
        "    xb, yb = get_batch()\n"
        "    logits = model(xb)\n"
        "    loss = F.cross_entropy(logits.view(-1, vocab), yb.view(-1))\n"
        "    optimizer.zero_grad(set_to_none=True)\n"
        "    loss.backward()\n"
        "    optimizer.step()\n",
        "batch_size", "32MiB",
    ),
    Loop(
        "pre-built list of batches (split), variable `bs`",
        _TORCH + "X = torch.randn(8192, 32); Y = torch.randn(8192, 1)\n"
        "model = nn.Sequential(nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 1))\n"
        "opt = torch.optim.SGD(model.parameters(), 1e-2, momentum=0.9)\n",
        "batches = list(zip(X.split(bs), Y.split(bs)))[:3]\n"
        "for xb, yb in batches:\n"
        "    pred = model(xb)\n"
        "    loss = F.mse_loss(pred, yb)\n"
        "    opt.zero_grad(); loss.backward(); opt.step()\n",
        "bs", "6MiB",
    ),
    Loop(
        "train() defined in an earlier cell, called with the batch size",
        _TORCH + "X = torch.randn(4096, 128); Y = torch.randint(0, 5, (4096,))\n"
        "model = nn.Sequential(nn.Linear(128, 384), nn.GELU(), nn.Dropout(0.1), nn.Linear(384, 5))\n"
        "opt = torch.optim.Adam(model.parameters(), 1e-3)\n"
        "def train(model, opt, n, steps=3):\n"
        "    model.train()\n"
        "    for _ in range(steps):\n"
        "        idx = torch.randperm(len(X))[:n]\n"
        "        loss = F.cross_entropy(model(X[idx]), Y[idx])\n"
        "        opt.zero_grad(); loss.backward(); opt.step()\n"
        "    return loss.item()\n",
        "last = train(model, opt, BATCH_SIZE)\n",
        "BATCH_SIZE", "8MiB",
    ),
    Loop(
        "GRU over sequences with a DataLoader, hidden state from the model",
        _TORCH + _DL + "seqs = TensorDataset(torch.randn(3000, 20, 16), torch.randint(0, 4, (3000,)))\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.rnn = nn.GRU(16, 64, batch_first=True)\n"
        "        self.fc = nn.Linear(64, 4)\n"
        "    def forward(self, x):\n"
        "        out, h = self.rnn(x)\n"
        "        return self.fc(h[-1])\n"
        "net = Net()\n"
        "opt = torch.optim.RMSprop(net.parameters(), 1e-3)\n",
        "loader = DataLoader(seqs, batch_size=train_batch_size, shuffle=True, drop_last=True)\n"
        "for i, (xb, yb) in enumerate(loader):\n"
        "    logits = net(xb)\n"
        "    loss = F.cross_entropy(logits, yb)\n"
        "    opt.zero_grad(); loss.backward(); opt.step()\n"
        "    if i == 2:\n"
        "        break\n",
        "train_batch_size", "16MiB",
    ),
    Loop(
        "autoencoder, MSE, top-level out/loss, DataLoader in the cell",
        _TORCH + _DL + "imgs = TensorDataset(torch.rand(4096, 256))\n"
        "ae = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU(),\n"
        "                   nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 256), nn.Sigmoid())\n"
        "opt = torch.optim.Adam(ae.parameters(), 1e-3)\n",
        "for i, (x,) in enumerate(DataLoader(imgs, batch_size=batch_size)):\n"
        "    out = ae(x)\n"
        "    loss = F.mse_loss(out, x)\n"
        "    opt.zero_grad()\n"
        "    loss.backward()\n"
        "    opt.step()\n"
        "    if i == 2:\n"
        "        break\n",
        "batch_size", "10MiB",
    ),
    Loop(
        "CNN with BatchNorm, index batching by randperm, SGD with momentum",
        _TORCH + "X = torch.randn(1024, 1, 28, 28); Y = torch.randint(0, 10, (1024,))\n"
        "model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),\n"
        "                      nn.Flatten(), nn.Linear(8 * 13 * 13, 10))\n"
        "opt = torch.optim.SGD(model.parameters(), 0.05, momentum=0.9)\n",
        "perm = torch.randperm(len(X))\n"
        "for start in range(0, 3 * bs, bs):\n"
        "    sel = perm[start:start + bs] if start + bs <= len(X) else torch.randint(0, len(X), (bs,))\n"
        "    out = model(X[sel])\n"
        "    loss = F.cross_entropy(out, Y[sel])\n"
        "    opt.zero_grad(); loss.backward(); opt.step()\n",
        "bs", "12MiB",
    ),
)


def _magics(ip: Any) -> Any:
    return ip.magics_manager.registry["GPUMagics"]


def _forget(ip: Any) -> None:
    """A cold start: nothing measured before (no earlier report or search)."""
    p = _magics(ip).presenter
    p.last_report = p.last_search = p.last_search_code = p.last_oom_cell = None
    p.last_report_batch = None


def run_at(ip: Any, loop: Loop, b: int, *, fresh: bool = True) -> Any:
    """Run the loop's cell at batch size ``b`` under its budget; returns the ExecutionResult."""
    with capture_output():
        if fresh:
            ip.run_cell(loop.setup)
        ip.user_ns[loop.var] = b
        return ip.run_cell(f"%%gpumem -d cpu --budget {loop.budget} -q\n{loop.cell}", store_history=True)


def true_max(ip: Any, loop: Loop) -> int:
    """The largest batch size the cell runs at under its budget, by doubling then bisection."""
    lo, hi = 1, 2
    while run_at(ip, loop, hi).error_in_exec is None:
        lo, hi = hi, hi * 2
        if hi > 1 << 16:
            raise AssertionError(f"{loop.name}: no OOM up to {hi}")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if run_at(ip, loop, mid).error_in_exec is None:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class Case:
    loop: str
    warm: bool
    factor: float
    true_max: int
    kind: str | None
    followed: int | None
    fits: bool


def follow(ip: Any, loop: Loop, tmax: int, *, warm: bool, factor: float) -> Case:
    """OOM at ``factor`` × the true max, do what suggestion 1 says, run the cell again."""
    import gpumagic.oom

    _forget(ip)
    if warm:
        assert run_at(ip, loop, max(1, tmax // 3)).error_in_exec is None
    else:
        with capture_output():
            ip.run_cell(loop.setup)
    r = run_at(ip, loop, math.ceil(factor * tmax), fresh=False)
    assert r.error_in_exec is not None, f"{loop.name}: no OOM at {factor} x {tmax}"
    advice = gpumagic.oom.last_advice()
    assert advice is not None
    assert getattr(r.error_in_exec, "advice", None) is advice
    first = advice.suggestions[0] if advice.suggestions else None
    b: int | None = None
    if first is not None and first.kind == "batch_size":
        b = first.batch_size
    elif first is not None and first.kind == "measure" and first.code:
        with capture_output():
            m = ip.run_cell(first.code, store_history=True)
        res = _magics(ip).presenter.last_search
        if m.error_in_exec is None and res is not None:
            b = res.recommended_batch_size
    fits = b is not None and run_at(ip, loop, b, fresh=False).error_in_exec is None
    return Case(loop.name, warm, factor, tmax, first.kind if first else None, b, fits)


def experiment_at(ip: Any, loops: list[tuple[Loop, int]], report: Any = None) -> list[Case]:
    """The cases for loops whose true maximum is known; each is checked first (it runs, one more does not)."""
    cases = []
    for loop, tmax in loops:
        names = set(ip.user_ns)
        try:
            assert run_at(ip, loop, tmax).error_in_exec is None, f"{loop.name}: {tmax} no longer fits"
            assert run_at(ip, loop, tmax + 1).error_in_exec is not None, f"{loop.name}: {tmax + 1} fits now"
            for warm in (False, True):
                for factor in (1.3, 4.0):
                    cases.append(follow(ip, loop, tmax, warm=warm, factor=factor))
                    if report is not None:
                        report(cases[-1])
        finally:
            for name in set(ip.user_ns) - names:
                del ip.user_ns[name]
    return cases


def experiment(ip: Any, loops: tuple[Loop, ...] = LOOPS, report: Any = None) -> list[Case]:
    cases = []
    for loop in loops:
        names = set(ip.user_ns)
        try:
            tmax = true_max(ip, loop)
            for warm in (False, True):
                for factor in (1.3, 4.0):
                    cases.append(follow(ip, loop, tmax, warm=warm, factor=factor))
                    if report is not None:
                        report(cases[-1])
        finally:  # the next loop starts from an empty device
            for name in set(ip.user_ns) - names:
                del ip.user_ns[name]
    return cases


def summary(cases: list[Case]) -> tuple[int, int, float]:
    """(cases that fit, cases, mean share of the true max among those that fit)."""
    fit = [c for c in cases if c.fits and c.followed is not None]
    mean = sum(c.followed / c.true_max for c in fit if c.followed) / len(fit) if fit else 0.0
    return len(fit), len(cases), mean

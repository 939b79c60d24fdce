"""Does the picked batch size survive a whole epoch of variable-length data?

Batch-size finders run a few steps on the batches they happen to draw; with variable-length
data the heaviest batch of an epoch is rarely among them. Here each method picks a size on the
same simulated device (gpumagic's CPU tracker with a budget, whose OOM is worded like CUDA's so
that Lightning and Accelerate recognise it), and then one full shuffled epoch runs at that size
on a fresh model and optimizer, on the same device.

Methods: gpumagic with heaviest batches (``find_batch(..., loader=...)``, ``%find_batch
--loader``); gpumagic on the batches a shuffled loader draws (``--var``: the pick from those
batches alone, as before heaviest batches existed, and the pick after fitting peak memory against
the input size); Lightning's ``Tuner.scale_batch_size`` (power and binsearch modes); Accelerate's
``find_executable_batch_size`` from its default start, 128.

Workloads (our own, seeded):
* ``text``: padded text classification, 1,500 samples of 8–99 tokens and 1% of 300–512, an
  embedding + per-token MLP + mean-pool classifier, padded per batch by the collate_fn; 48 MiB.
* ``boxes``: detection-style, 1,200 16×16 images with a heavy-tailed number of boxes (median 5,
  99th percentile about 50, up to 300), a small CNN and a per-box head over all boxes of the batch
  (collated by concatenation, no padding); 40 MiB.

The true worst-case maximum is found by bisection on the heaviest batch (the b samples with the
most elements, every step). Printed per method: the size picked, whether the epoch ran out of
memory (and at which step), the pick as a fraction of the true worst-case maximum, trials, wall s.

    pip install -e ".[bench]"   # lightning, accelerate
    python bench/worst_case.py [--only text|boxes]
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import gpumagic
from gpumagic.heaviest import measure
from gpumagic.tracking import Tracker

MiB = 2**20
STEPS = 3
SEEDS = (0, 1, 2)


# ---------------------------------------------------------------------------------------------
# workloads


class Texts(Dataset[tuple[torch.Tensor, int]]):
    def __init__(self, n: int = 1500, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        lens = torch.randint(8, 100, (n,), generator=g)
        long = torch.randperm(n, generator=g)[: n // 100]
        lens[long] = torch.randint(300, 513, (len(long),), generator=g)
        self.items = [(torch.randint(1, 1000, (int(k),), generator=g), int(k) % 2) for k in lens]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.items[i]


def pad(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*batch, strict=True)
    return nn.utils.rnn.pad_sequence(list(xs), batch_first=True), torch.tensor(ys)


class TextClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(1000, 64)
        self.ff = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
        self.out = nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ff(self.emb(x)).mean(1))


class Boxes(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    def __init__(self, n: int = 1200, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        # heavy-tailed like crowd scenes: median 5 boxes, 99th percentile about 50, a few up to 300
        counts = torch.exp(1.6 + 1.0 * torch.randn(n, generator=g)).ceil().clamp(1, 300)
        self.items = [(torch.randn(3, 16, 16, generator=g), torch.rand(int(k), 4, generator=g),
                       torch.randint(0, 8, (int(k),), generator=g)) for k in counts]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.items[i]


def concat_boxes(batch: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    images, boxes, labels = zip(*batch, strict=True)
    owner = torch.cat([torch.full((len(b),), i) for i, b in enumerate(boxes)])
    return torch.stack(images), torch.cat(boxes), torch.cat(labels), owner


class BoxHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(36, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 8))

    def forward(self, images: torch.Tensor, boxes: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(images)[owner]
        return self.head(torch.cat([feats, boxes], 1))


@dataclass
class Workload:
    name: str
    budget: int
    dataset: Dataset[Any]
    collate: Callable[[Any], Any]
    make_model: Callable[[], nn.Module]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    true_max: int = 0


def text_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def box_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    images, boxes, labels, owner = batch
    return F.cross_entropy(model(images, boxes, owner), labels)


def workloads() -> dict[str, Callable[[], Workload]]:
    return {
        "text": lambda: Workload("text", 48 * MiB, Texts(), pad, TextClassifier, text_loss),
        "boxes": lambda: Workload("boxes", 40 * MiB, Boxes(), concat_boxes, BoxHead, box_loss),
    }


# ---------------------------------------------------------------------------------------------
# training, the epoch after the pick, and the truth


def _oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e)


def fresh(w: Workload) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = w.make_model()
    return model, torch.optim.Adam(model.parameters(), 1e-3)


def train(w: Workload, model: nn.Module, opt: torch.optim.Optimizer, loader: Any, steps: int | None) -> int:
    done = 0
    for batch in loader:
        loss = w.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        done += 1
        if steps is not None and done >= steps:
            break
    return done


def shuffled(w: Workload, b: int, seed: int = 0) -> DataLoader[Any]:
    return DataLoader(w.dataset, batch_size=b, shuffle=True, collate_fn=w.collate,
                      generator=torch.Generator().manual_seed(seed))


def epoch(w: Workload, b: int) -> str:
    """One shuffled epoch at ``b`` on a fresh model: 'ok' or 'OOM at step i of n'."""
    gc.collect()  # what earlier methods left behind must not count against the device
    model, opt = fresh(w)
    loader = shuffled(w, b, seed=1234)
    done = [0]
    try:
        with Tracker("cpu", w.budget):
            for batch in loader:
                loss = w.loss(model, batch)
                opt.zero_grad()
                loss.backward()
                opt.step()
                done[0] += 1
    except Exception as e:
        if not _oom(e):
            raise
        return f"OOM at step {done[0] + 1} of {len(loader)}"
    return "ok"


def true_worst_case_max(w: Workload) -> int:
    """Bisection on the heaviest batch: the b samples with the most elements, every step."""
    table = measure(DataLoader(w.dataset, collate_fn=w.collate))
    assert not isinstance(table, str)

    def runs(b: int) -> bool:
        gc.collect()
        model, opt = fresh(w)
        loader = DataLoader(w.dataset, batch_size=b, sampler=table.heaviest(b) * STEPS, collate_fn=w.collate)
        try:
            with Tracker("cpu", w.budget):
                train(w, model, opt, loader, STEPS)
        except Exception as e:
            if not _oom(e):
                raise
            return False
        return True

    lo, hi = 1, 2
    while runs(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if runs(mid) else (lo, mid)
    return lo


# ---------------------------------------------------------------------------------------------
# the methods


@dataclass
class Row:
    method: str
    picked: int | None
    trials: int
    seconds: float
    note: str = ""


def run_gpumagic(w: Workload) -> list[Row]:
    model, opt = fresh(w)
    t0 = time.perf_counter()
    loader = DataLoader(w.dataset, batch_size=8, shuffle=True, collate_fn=w.collate)
    res = gpumagic.find_batch(lambda dl: train(w, model, opt, dl, None), loader=loader, device="cpu",
                              budget=w.budget, steps=STEPS, progress=False, restore=[model, opt])
    heavy = Row("gpumagic heaviest batches", res.recommended_batch_size, len(res.trials), time.perf_counter() - t0)
    ss = res.sample_sizes
    if ss is not None:
        heavy.note = ss.summary()

    rows = [heavy]
    for seed in SEEDS:
        model, opt = fresh(w)
        t0 = time.perf_counter()
        drawn = gpumagic.find_batch(lambda b: train(w, model, opt, shuffled(w, b, seed), None),  # noqa: B023
                                    device="cpu", budget=w.budget, steps=STEPS, progress=False, restore=[model, opt])
        secs = time.perf_counter() - t0
        vi = drawn.variable_inputs
        before = vi.drawn_batch_size if vi is not None and vi.drawn_batch_size else drawn.recommended_batch_size
        rows.append(Row(f"gpumagic drawn batches (shuffle seed {seed}), before: pick from the batches drawn",
                        before, len(drawn.trials), secs))
        if vi is None:
            rows.append(Row(f"gpumagic drawn batches (shuffle seed {seed}), --var: inputs did not vary by 10%",
                            drawn.recommended_batch_size, len(drawn.trials), secs))
        else:
            rows.append(Row(f"gpumagic drawn batches (shuffle seed {seed}), --var: fit on input size",
                            drawn.recommended_batch_size, len(drawn.trials), secs,
                            f"steps drew {vi.smallest_elements:,}–{vi.largest_elements:,} elements"))
    return rows


def run_lightning(w: Workload, mode: str) -> Row:
    import lightning as L
    from lightning.pytorch.tuner import Tuner

    wl = w
    sizes: list[int] = []

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.batch_size = 2
            torch.manual_seed(0)
            self.net = wl.make_model()

        def train_dataloader(self) -> DataLoader[Any]:
            sizes.append(self.batch_size)
            return DataLoader(wl.dataset, batch_size=self.batch_size, shuffle=True, collate_fn=wl.collate)

        def training_step(self, batch: Any, i: int) -> torch.Tensor:
            return wl.loss(self.net, batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), 1e-3)

    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir="/tmp/gm-bench")
    t0 = time.perf_counter()
    with Tracker("cpu", w.budget):
        picked = Tuner(trainer).scale_batch_size(Module(), mode=mode, init_val=2, steps_per_trial=STEPS)
    trials = len([b for i, b in enumerate(sizes) if i == 0 or b != sizes[i - 1]]) - 1
    return Row(f"lightning {mode}", picked, trials, time.perf_counter() - t0)


def run_accelerate(w: Workload, start: int = 128) -> Row:
    from accelerate.utils import find_executable_batch_size

    model, opt = fresh(w)
    tried: list[int] = []

    @find_executable_batch_size(starting_batch_size=start)
    def loop(batch_size: int) -> int:
        tried.append(batch_size)
        with Tracker("cpu", w.budget):
            train(w, model, opt, shuffled(w, batch_size), STEPS)
        return batch_size

    t0 = time.perf_counter()
    picked = loop()
    return Row(f"accelerate from {start}", picked, len(tried), time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=tuple(workloads()), default=None)
    ap.add_argument("--no-peers", action="store_true", help="gpumagic only (no Lightning, no Accelerate)")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    print("| workload | method | picked | epoch at the pick | of true worst-case max | trials | wall s |")
    print("|---|---|---|---|---|---|---|")
    for name, make in workloads().items():
        if a.only and name != a.only:
            continue
        w = make()
        w.true_max = true_worst_case_max(w)
        rows = run_gpumagic(w)
        if not a.no_peers:
            rows += [run_lightning(w, "power"), run_lightning(w, "binsearch"), run_accelerate(w)]
        for r in rows:
            outcome = epoch(w, r.picked) if r.picked else "nothing picked"
            frac = f"{r.picked / w.true_max:.0%} ({r.picked}/{w.true_max})" if r.picked else "-"
            print(f"| {w.name} | {r.method} | {r.picked} | {outcome} | {frac} | {r.trials} | {r.seconds:.1f} |",
                  flush=True)
            if r.note:
                print(f"|   | ↳ {r.note} | | | | | |", flush=True)


if __name__ == "__main__":
    main()

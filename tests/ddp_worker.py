"""One rank of a small data-parallel job, started by tests/test_distributed.py (not a test itself).

``python tests/ddp_worker.py SCENARIO OUT_DIR`` with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
and GPUMAGIC_TEST_BUDGETS (one budget per rank, comma separated) in the environment. The
training loops follow PyTorch's DDP tutorial (``ddp_tutorial.rst``: ToyModel, SGD, MSELoss) and
the CIFAR-10 tutorial's CNN (with a BatchNorm, whose buffers DDP broadcasts), on random data.
Each rank writes what it saw to OUT_DIR/rankN.json.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gpumagic


class ToyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net1 = nn.Linear(64, 256)
        self.relu = nn.ReLU()
        self.net2 = nn.Linear(256, 256)
        self.net3 = nn.Linear(256, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net3(self.relu(self.net2(self.relu(self.net1(x)))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.bn = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.bn(self.conv1(x))))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


DEVICE = torch.device(os.environ.get("GPUMAGIC_TEST_DEVICE", "cpu"))


def _mlp_batch(b: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(b, 64, device=DEVICE), torch.randn(b, 8, device=DEVICE)


def _cnn_batch(b: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(b, 3, 32, 32, device=DEVICE), torch.randint(0, 10, (b,), device=DEVICE)


TRIALS = [0]
"""Trials run so far: a module global, since a search puts back every list its trial function reaches."""


def main() -> None:
    global DEVICE
    scenario, out_dir = sys.argv[1], sys.argv[2]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    budgets = os.environ["GPUMAGIC_TEST_BUDGETS"].split(",")
    if scenario.endswith("alone"):
        rank, budget = 0, budgets[0]
    else:
        if DEVICE.type == "cuda":
            DEVICE = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(DEVICE)
        dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo")
        rank = dist.get_rank()
        budget = budgets[rank]
    torch.manual_seed(0)
    cnn = "cnn" in scenario
    if scenario.endswith("alone"):
        model: nn.Module = ToyModel().to(DEVICE)
    elif "fsdp" in scenario:
        from torch.distributed.fsdp import fully_shard

        model = ToyModel().to(DEVICE)
        for layer in (model.net1, model.net2, model.net3):
            fully_shard(layer)
        fully_shard(model)
    else:
        model = DDP((Net() if cnn else ToyModel()).to(DEVICE), device_ids=[DEVICE] if DEVICE.type == "cuda" else None)
    loss_fn: Any = nn.CrossEntropyLoss() if cnn else nn.MSELoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
    batch = _cnn_batch if cnn else _mlp_batch
    out: dict[str, Any] = {"rank": rank}

    def train(b: int, steps: int = 1000) -> None:
        TRIALS[0] += 1
        if scenario == "interrupt" and rank == 1 and TRIALS[0] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in this rank, in its third trial
            time.sleep(5)
        for _ in range(steps):
            x, y = batch(b)
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()

    if scenario.startswith("track") or scenario == "fsdp_track":
        with gpumagic.track(device=DEVICE, budget=budget) as t:
            train(8 * (rank + 1), steps=3)
        out["report"] = t.report.to_dict()
        out["text"] = t.report.to_text()
    else:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            res = gpumagic.find_batch(train, device=DEVICE, budget=budget, steps=2, progress=False, timeout_s=60)
        except BaseException as e:
            out["error"] = f"{type(e).__name__}: {e}"
        else:
            out["result"] = res.to_dict()
            out["global_batch_size"] = res.global_batch_size
            out["text"] = res.to_text()
        after = model.state_dict()
        out["restored"] = all(torch.equal(before[k], after[k]) for k in before)
        if "error" not in out:
            # the user's training goes on with DDP's own gradient all-reduce
            train(4, steps=2)
            grads = [p.grad.clone() for p in model.parameters()]
            if not scenario.endswith("alone") and "fsdp" not in scenario:
                gathered = [torch.zeros_like(grads[0]) for _ in range(world)]
                dist.all_gather(gathered, grads[0])
                out["grads_equal_across_ranks"] = all(torch.equal(gathered[0], g) for g in gathered)
            out["trained_after"] = True
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()


def spawned(index: int, steps: int, batch: int = 16) -> None:
    """A function for ``torch.multiprocessing.start_processes``: process ``index`` trains an MLP
    at batch ``batch * (index + 1)`` for ``steps`` steps, no process group."""
    # a forked child must not use the OpenMP pool its parent started (GNU libgomp hangs); one
    # thread runs torch's ops inline, as DataLoader workers do
    torch.set_num_threads(1)
    torch.manual_seed(index)
    model = ToyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        x, y = torch.randn(batch * (index + 1), 64), torch.randn(batch * (index + 1), 8)
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

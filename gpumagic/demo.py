"""The main job: train a small model on CPU under gpumagic's magics and show the reports.

    python -m gpumagic.demo

Runs in a real IPython shell (no Jupyter needed): ``%%gpumem`` on a training cell, an
out-of-memory error on a simulated 24 MiB device translated into advice, and ``%%find_batch``
picking the batch size that fits it. Nothing here needs a GPU.
"""

from __future__ import annotations

import sys
import textwrap
from typing import Any

SETUP = """
import torch, torch.nn as nn, torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0)
data = TensorDataset(torch.randn(4096, 64), torch.randint(0, 10, (4096,)))
model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
opt = torch.optim.Adam(model.parameters(), 1e-3)
batch_size = 64
"""

TRAIN = """
loader = DataLoader(data, batch_size=batch_size, shuffle=True)
for x, y in loader:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
"""


def _cell(ip: Any, title: str, src: str) -> Any:
    print(f"\n\033[1m{title}\033[0m")
    print(textwrap.indent(src.strip("\n"), "  │ "))
    print()
    return ip.run_cell(src, store_history=True)


def main() -> int:
    from IPython.testing.globalipapp import start_ipython

    ip = start_ipython()
    ip.run_line_magic("load_ext", "gpumagic")
    ip.run_cell(SETUP)
    r = _cell(ip, "1. Measure a training cell (one epoch, batch 64)", "%%gpumem -d cpu" + TRAIN)
    if r.error_in_exec is not None:
        return 1
    _cell(ip, "2. The same epoch with batch 4096 on a simulated 24 MiB device",
          "%%gpumem -d cpu --budget 24MiB\nbatch_size = 4096" + TRAIN)
    r = _cell(ip, "3. Find the batch size that fits 24 MiB (model and optimizer restored after)",
              "%%find_batch --var batch_size -d cpu --budget 24MiB -o" + TRAIN)
    if r.error_in_exec is not None or r.result is None:
        return 1
    res = r.result
    print(f"\nrecommended batch size: {res.recommended_batch_size} (largest that ran: {res.max_batch_size}, "
          f"{len(res.trials)} trials, {res.oom_count} OOM)")
    r = _cell(ip, "4. Train with the recommendation under the same budget",
              f"%%gpumem -d cpu --budget 24MiB\nbatch_size = {res.recommended_batch_size}" + TRAIN)
    return 0 if r.error_in_exec is None else 1


if __name__ == "__main__":
    sys.exit(main())

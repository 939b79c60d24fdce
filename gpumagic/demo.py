"""The main job: train a small model on CPU under gpumagic's magics and show the reports.

    python -m gpumagic.demo

Runs in a real IPython shell (no Jupyter needed): ``%%gpumem`` on a training cell, an
out-of-memory error on a simulated 16 MiB device turned into advice, ``%%find_batch`` picking
the batch size that fits that device, and the epoch again with the pick. No GPU needed.
Exits non-zero if any step does not behave as described.
"""

from __future__ import annotations

import sys
import textwrap
from typing import Any

SETUP = """
import torch, torch.nn as nn, torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0)
data = TensorDataset(torch.randn(16384, 64), torch.randint(0, 10, (16384,)))
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
    from gpumagic._text import bold

    print(f"\n{bold(title)}")  # escape codes only on a terminal that takes them
    print(textwrap.indent(src.strip("\n"), "  │ "))
    print()
    return ip.run_cell(src, store_history=True)


def main() -> int:
    import torch
    from IPython.testing.globalipapp import start_ipython

    ip = start_ipython()
    ip.run_line_magic("load_ext", "gpumagic")
    ip.run_cell(SETUP)
    ok = True

    r = _cell(ip, "1. Measure a training cell: one epoch at batch 64", "%%gpumem -d cpu -q -o" + TRAIN)
    ok &= r.error_in_exec is None  # the report shows as the cell's result, as in terminal IPython

    ip.user_ns["batch_size"] = 4096
    r = _cell(ip, "2. batch_size = 4096 on a simulated 16 MiB device: out of memory, explained",
              "%%gpumem -d cpu --budget 16MiB" + TRAIN)
    ok &= isinstance(r.error_in_exec, torch.OutOfMemoryError)

    r = _cell(ip, "3. Find the batch size that fits 16 MiB (model, optimizer and RNG restored after)",
              "%%find_batch --var batch_size -d cpu --budget 16MiB -o -q" + TRAIN)
    res = r.result
    ok &= r.error_in_exec is None and res is not None and res.recommended_batch_size is not None
    if res is None or res.recommended_batch_size is None:
        return 1

    ip.user_ns["batch_size"] = res.recommended_batch_size
    r = _cell(ip, f"4. The epoch again at the recommended batch size ({res.recommended_batch_size}), same device",
              "%%gpumem -d cpu --budget 16MiB -q -o" + TRAIN)
    ok &= r.error_in_exec is None
    print("\ndemo " + ("finished: every step behaved as described" if ok else "FAILED: see above"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

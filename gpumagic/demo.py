"""The main job: train a small model on CPU under gpumagic's magics and show the reports.

    python -m gpumagic.demo

Runs in a real IPython shell (no Jupyter needed): ``%%gpumem`` on a training cell, an
out-of-memory error on a simulated 16 MiB device turned into advice, the advice's first
suggestion done literally (it measures the batch size that fits that device), and the epoch
again with that size. No GPU needed. Exits non-zero if any step does not behave as described.

The README's "Out of memory, before and after" block is :func:`oom_example`'s text (a test
checks that they agree).
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
    from gpumagic.render.text import bold

    print(f"\n{bold(title)}")  # escape codes only on a terminal that takes them
    print(textwrap.indent(src.strip("\n"), "  │ "))
    print()
    return ip.run_cell(src, store_history=True)


def oom_text(exc: BaseException) -> str:
    """What the shell shows for an out-of-memory error: the advice, then the short traceback."""
    advice = getattr(exc, "advice", None)
    lines = [advice.text()] if advice is not None else []
    view = getattr(exc, "_render_traceback_", None)  # the magics' TracebackView: its short form
    return "\n".join(lines + list(getattr(view, "short", [])))


def measure_and_fail(ip: Any, title: bool = True) -> BaseException | None:
    """Steps 1 and 2: an epoch at batch 64 that works, then batch 4096 on a 16 MiB device."""
    run = _cell if title else (lambda ip, _t, src: ip.run_cell(src, store_history=True))
    ip.run_cell(SETUP)
    r = run(ip, "1. Measure a training cell: one epoch at batch 64", "%%gpumem -d cpu -q -o" + TRAIN)
    if r.error_in_exec is not None:
        return None
    ip.user_ns["batch_size"] = 4096
    r = run(ip, "2. batch_size = 4096 on a simulated 16 MiB device: out of memory, explained",
            "%%gpumem -d cpu --budget 16MiB" + TRAIN)
    exc: BaseException | None = r.error_in_exec
    return exc


def main() -> int:
    import torch
    from IPython.testing.globalipapp import start_ipython

    from gpumagic import oom

    ip = start_ipython()
    ip.run_line_magic("load_ext", "gpumagic")
    exc = measure_and_fail(ip)
    ok = isinstance(exc, torch.OutOfMemoryError)
    advice = oom.last_advice()
    first = advice.suggestions[0] if advice is not None and advice.suggestions else None
    if first is None or first.kind not in ("measure", "batch_size"):
        print("demo FAILED: the advice has no batch size or measuring command first")
        return 1
    if first.kind == "measure" and first.code:
        r = _cell(ip, "3. Do what suggestion 1 says: measure (model, optimizer and RNG are put back after)",
                  first.code)
        res = ip.magics_manager.registry["GPUMagics"].presenter.last_search
        ok &= r.error_in_exec is None and res is not None and res.recommended_batch_size is not None
        if res is None or res.recommended_batch_size is None:
            return 1
        size = res.recommended_batch_size
    else:
        size = first.batch_size

    ip.user_ns["batch_size"] = size
    r = _cell(ip, f"4. The epoch again at the recommended batch size ({size}), same device",
              "%%gpumem -d cpu --budget 16MiB -q -o" + TRAIN)
    ok &= r.error_in_exec is None
    print("\ndemo " + ("finished: every step behaved as described" if ok else "FAILED: see above"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""What-if plans against measurements: for four models, each remedy's planned peak beside the
exact CPU tracker's peak of the same cell with the remedy applied by hand, and whether the batch
the plan says then fits runs under the same budget.

The models and their by-hand variants are those of ``tests/what_if_loops.py`` (an MLP, a CNN with
BatchNorm, a transformer encoder, a GPT-style decoder). Each model runs in a real IPython shell:
``%%gpumem --what-if -d cpu --budget B`` plans, then each variant is measured with
``%%gpumem -d cpu`` on freshly built objects, and its "batch that then fits" with
``%%gpumem -d cpu --budget B``.

    python bench/what_if.py [--only mlp|cnn_bn|encoder|gpt] [--no-fits]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from what_if_loops import MODELS

MiB = 2**20
BUDGETS = {"mlp": 8 * MiB, "cnn_bn": 24 * MiB, "encoder": 24 * MiB, "gpt": 48 * MiB}


def _shell() -> Any:
    import torch
    import torch.nn.functional as F
    from IPython.testing import globalipapp
    from torch import nn

    ip = globalipapp.start_ipython() or globalipapp.get_ipython()
    ip.run_line_magic("load_ext", "gpumagic")
    ip.push({"torch": torch, "nn": nn, "F": F})
    return ip


def _run(ip: Any, src: str) -> Any:
    with contextlib.redirect_stdout(io.StringIO()):  # the shell echoes -o's report as Out[...]
        res = ip.run_cell(src)
    if res.error_in_exec is not None:
        raise res.error_in_exec
    return res.result


def _knob(name: str, b: int) -> str:
    return f"loader = DataLoader(data, batch_size={b})" if name == "cnn_bn" else f"bs = {b}"


def _by_hand(name: str, remedy: Any, batch: int | None = None) -> tuple[str, str]:
    setup, cell, hand = MODELS[name]
    key = next((k for k in hand if k and remedy.name.startswith(k)), None)
    before, body = (remedy.code, cell) if key is None else ("", hand[key])
    if remedy.accumulation_steps is not None:
        before = _knob(name, remedy.micro_batch_size) + f"\nK = {remedy.accumulation_steps}"
    if batch is not None:
        before = _knob(name, batch) + "\n" + before
    return setup + "\n" + before, body


def _fresh(ip: Any, keep: set[str]) -> None:
    """Every measurement from what its own setup builds: earlier runs' names dropped, garbage collected."""
    for name in [n for n in ip.user_ns if n not in keep]:
        del ip.user_ns[name]
    gc.collect()


KEEP: set[str] = set()


def _measure(ip: Any, before: str, cell: str, budget: int | None = None) -> Any:
    _fresh(ip, KEEP)
    _run(ip, before)
    gc.collect()
    with contextlib.redirect_stdout(io.StringIO()):
        res = ip.run_cell(f"%%gpumem -d cpu -q -o{f' --budget {budget}' if budget else ''}\n{cell}")
    return None if res.error_in_exec is not None else res.result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=sorted(MODELS))
    ap.add_argument("--no-fits", action="store_true", help="skip running the batches that then fit")
    args = ap.parse_args()
    from gpumagic.units import format_bytes

    ip = _shell()
    KEEP.update(ip.user_ns)
    for name in [args.only] if args.only else sorted(MODELS):
        setup, cell, _ = MODELS[name]
        budget = BUDGETS[name]
        _fresh(ip, KEEP)
        _run(ip, setup)
        gc.collect()
        t = time.perf_counter()
        rep = _run(ip, f"%%gpumem --what-if -d cpu -q -o --budget {budget}\n{cell}")
        seconds = time.perf_counter() - t
        print(f"\n## {name}: budget {format_bytes(budget)}, what-if planned in {seconds:.1f} s "
              f"({len(rep.what_if)} remedies)\n")
        print("| remedy | planned peak | measured peak | error | saved (planned) | batch that then fits | "
              "runs under the budget | cost |")
        print("|---|---|---|---|---|---|---|---|")
        rows = [(None, setup, cell)] + [(r, *_by_hand(name, r)) for r in rep.what_if]
        for remedy, before, body in rows:
            planned = rep.peak_bytes if remedy is None else remedy.peak_bytes
            exact = _measure(ip, before, body)
            fits = rep.batch_size_that_fits if remedy is None else remedy.batch_size_that_fits
            runs = ""
            if fits is not None and not args.no_fits:
                pre, body2 = ((setup + "\n" + _knob(name, fits), cell) if remedy is None
                              else _by_hand(name, remedy, fits))
                runs = "yes" if _measure(ip, pre, body2, budget) is not None else "NO (out of memory)"
            err = f"{100 * (planned / exact.peak_bytes - 1):+.2f}%" if exact is not None else "?"
            saved = "" if remedy is None else format_bytes(remedy.saved_bytes, signed=True)
            label = "as written" if remedy is None else remedy.name + (" (trade-off)" if remedy.trade_off else "")
            measured = format_bytes(exact.peak_bytes) if exact else "?"
            cost = "" if remedy is None else remedy.cost or ""
            print(f"| {label} | {format_bytes(planned)} | {measured} | {err} | {saved} | "
                  f"{'' if fits is None else fits} | {runs} | {cost} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()

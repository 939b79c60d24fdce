"""Advice is judged by following it: OOM, do what suggestion 1 says literally, run the cell again.

The whole experiment (eight loops of ``tests/advice_loops.py``, cold and warm, out of memory at
1.3x and 4x the true maximum: 32 cases, about ten minutes) is a benchmark,
``bench/advice_followed.py``, which prints the figure the README quotes. Here a few of its cases
run as tests of their own, each a few runs of one loop, chosen to cover both starts (cold:
nothing measured; warm: after a run at a third of the maximum), both overshoots, a DataLoader
loop, index batching with ``out``/``loss`` globals, nanoGPT's ``get_batch()``, a GRU, BatchNorm,
and the benchmark's weakest case (the autoencoder after a cold 4x OOM, 34% of the maximum).
"""

from __future__ import annotations

import pytest
from advice_loops import LOOPS, follow, run_at

# the largest batch size each loop's cell runs at under its budget (bench/advice_followed.py)
TRUE_MAX = dict(zip((loop.name for loop in LOOPS), (1113, 631, 264, 1124, 811, 215, 813, 102), strict=True))

# (loop index, warm, factor): six of the benchmark's 32 cases
CASES = [(0, False, 1.3), (1, True, 4.0), (2, False, 1.3), (5, False, 4.0), (6, False, 4.0), (7, True, 1.3)]


@pytest.fixture
def forget_names(ip):
    names = set(ip.user_ns)
    yield
    for name in set(ip.user_ns) - names:
        del ip.user_ns[name]


@pytest.mark.slow
@pytest.mark.parametrize(("index", "warm", "factor"), CASES,
                         ids=[f"{LOOPS[i].name.split(',')[0]}-{'warm' if w else 'cold'}-{f}x" for i, w, f in CASES])
def test_following_suggestion_one_fits(ip, forget_names, index, warm, factor):
    loop = LOOPS[index]
    tmax = TRUE_MAX[loop.name]
    # the loop's true maximum is still what the benchmark found: it runs, one more does not
    assert run_at(ip, loop, tmax).error_in_exec is None, f"{loop.name}: {tmax} no longer fits"
    assert run_at(ip, loop, tmax + 1).error_in_exec is not None, f"{loop.name}: {tmax + 1} fits now"
    case = follow(ip, loop, tmax, warm=warm, factor=factor)
    assert case.followed is not None, f"suggestion 1 ({case.kind}) named no batch size to follow"
    assert case.fits, case
    assert case.followed >= tmax // 3, case  # never below what a third of the maximum gives

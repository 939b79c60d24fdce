"""Advice followed: a cell runs out of memory, the first suggestion is done literally, the cell runs again.

    python bench/advice_followed.py

Eight training loops of different shapes (tests/advice_loops.py), cold and warm, out of memory
at 1.3x and 4x the true maximum batch size. Prints one line per case and the README's figure.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> int:
    from advice_loops import LOOPS, Case, experiment, summary
    from IPython.testing.globalipapp import start_ipython

    ip = start_ipython()
    ip.run_line_magic("load_ext", "gpumagic")
    t0 = time.perf_counter()
    def show(c: Case) -> None:
        share = f"{c.followed / c.true_max:.0%}" if c.followed else "-"
        print(f"{c.loop[:48]:48} {'warm' if c.warm else 'cold'} {c.factor:>3}x  max {c.true_max:>5}  "
              f"suggestion 1: {c.kind!s:<10} -> {c.followed!s:>5} ({share})  {'fits' if c.fits else 'OOM'}",
              flush=True)

    loops = tuple(LOOPS[int(i)] for i in sys.argv[1:]) or LOOPS
    cases = experiment(ip, loops, report=show)
    n, m, mean = summary(cases)
    print(f"advice followed: {n}/{m} fit, mean {mean:.0%} of the true max ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

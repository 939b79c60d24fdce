"""Cost of ``%load_ext gpumagic`` on top of already-imported torch and IPython (goal <= 50 ms).

Each repeat is a fresh interpreter: torch and an IPython shell are set up first, then only the
extension load is timed. Prints the median over the repeats.

    python bench/load_time.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

CHILD = r"""
import time, torch
from IPython.testing.globalipapp import start_ipython
ip = start_ipython()
before = set(__import__("sys").modules)
t0 = time.perf_counter()
ip.run_line_magic("load_ext", "gpumagic")
dt = time.perf_counter() - t0
assert ip.find_cell_magic("gpumem") is not None
new = set(__import__("sys").modules) - before
mods = [m for m in ("matplotlib", "matplotlib.pyplot", "ipywidgets") if m in new]
print(dt, torch.cuda.is_initialized(), ",".join(mods) or "-")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    times = []
    for _ in range(a.repeats):
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout
        dt, cuda_init, heavy = out.split()
        times.append(float(dt))
    print(f"%load_ext gpumagic: median {statistics.median(times) * 1e3:.1f} ms over {a.repeats} fresh interpreters "
          f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}); CUDA initialised: {cuda_init}; "
          f"matplotlib/ipywidgets imported by the load: {heavy}")


if __name__ == "__main__":
    main()

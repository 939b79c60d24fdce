"""Cost of ``%load_ext gpumagic`` on top of already-imported torch and IPython (goal < 30 ms).

Each repeat is a fresh interpreter: torch and an IPython shell are set up first, then only the
extension load is timed. Prints the median over the repeats, and apart from it the time Python's
cyclic garbage collector ran inside the load: importing torch and IPython leaves a full (oldest
generation) collection due, about 60 ms over their millions of objects, and whichever code
allocates next pays it (here the load, with %load_ext first in the cell; otherwise the user's
next cell). The load's own work is the total less that collection.

    python bench/load_time.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

CHILD = r"""
import gc, time, torch
from IPython.testing.globalipapp import start_ipython
ip = start_ipython()
before = set(__import__("sys").modules)
gc_time = [0.0, 0.0]
def on_gc(phase, info):
    if phase == "start":
        gc_time[1] = time.perf_counter()
    else:
        gc_time[0] += time.perf_counter() - gc_time[1]
gc.callbacks.append(on_gc)
t0 = time.perf_counter()
ip.run_line_magic("load_ext", "gpumagic")
dt = time.perf_counter() - t0
gc.callbacks.remove(on_gc)
assert ip.find_cell_magic("gpumem") is not None
new = set(__import__("sys").modules) - before
mods = [m for m in ("matplotlib", "matplotlib.pyplot", "ipywidgets") if m in new]
print(dt, gc_time[0], torch.cuda.is_initialized(), ",".join(mods) or "-")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    times, collections, own = [], [], []
    for _ in range(a.repeats):
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout
        dt, gc_s, cuda_init, heavy = out.split()
        times.append(float(dt))
        collections.append(float(gc_s))
        own.append(float(dt) - float(gc_s))
    med = statistics.median
    print(f"%load_ext gpumagic over {a.repeats} fresh interpreters: the load's own work median {med(own) * 1e3:.1f} ms "
          f"(min {min(own) * 1e3:.1f}, max {max(own) * 1e3:.1f}); with the garbage collections that fell in it "
          f"median {med(times) * 1e3:.1f} ms (collections {med(collections) * 1e3:.1f} ms); "
          f"CUDA initialised: {cuda_init}; matplotlib/ipywidgets imported by the load: {heavy}")


if __name__ == "__main__":
    main()

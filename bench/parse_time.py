"""Time of ``gpumagic.oom.parse`` on 1 MB of a repeated fragment with an OOM message at its end (goal <= 0.5 s).

The shell parses every ``RuntimeError`` when OOM translation is on, and an error's text can be
anything: a repeated fragment of a message is what makes a backtracking pattern quadratic. Each
fragment (every format's opening cut at several lengths, units, "Process ", brackets, digit
runs, blank lines, log columns) is repeated to 1 MB and to 100 KB, alone (a bracket that never
closes) and with a real message appended, and each is parsed; the time is CPU time of this
process (other processes on a shared machine do not count), the minimum over the repeats.
Prints the slowest fragments, the 1 MB / 100 KB ratio (10 for linear time), and checks that the
message at the end is still read.

    python bench/parse_time.py [--repeats 3] [--size 1000000]

``tests/unit/test_oom_parse.py`` uses ``cases()`` and ``MESSAGES`` to assert the scaling.
"""

from __future__ import annotations

import argparse
import time

from gpumagic.oom import OOMInfo, parse

# One real message per format family (from tests/oom_corpus), appended after the repetition.
MESSAGES = {
    "cuda_old": "RuntimeError: CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 7.79 GiB total capacity; "
    "6.64 GiB already allocated; 21.00 MiB free; 150.86 MiB cached)",
    "cuda_sentence": "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 226.00 MiB. GPU 0 has a total "
    "capacity of 15.70 GiB of which 210.38 MiB is free. Process 4242 has 2.00 GiB memory in use. Including "
    "non-PyTorch memory, this process has 15.48 GiB memory in use. Of the allocated memory 14.81 GiB is allocated "
    "by PyTorch, and 336.73 MiB is reserved by PyTorch but unallocated.",
    "cuda_async": "Allocation on device 0 would exceed allowed memory. (out of memory)\nCurrently allocated     : "
    "12.20 GiB\nRequested               : 1.88 GiB\nDevice limit            : 16.00 GiB\nFree (according to CUDA): "
    "0 bytes",
    "mps": "MPS backend out of memory (MPS allocated: 18.09 GB, other allocations: 7.57 MB, max allowed: 18.13 GB). "
    "Tried to allocate 256 bytes on private pool.",
    "cpu": "RuntimeError: [enforce fail at alloc_cpu.cpp:75] err == 0. DefaultCPUAllocator: can't allocate memory: "
    "you tried to allocate 34359738368 bytes. Error code 12 (Cannot allocate memory)",
    "numpy": "numpy.core._exceptions.MemoryError: Unable to allocate 3.81 GiB for an array with shape (32, 4000, "
    "4000) and data type float64",
    "xla": "jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: Failed to allocate request for 2.99GiB "
    "(3206250496B) on device ordinal 0",
    "xla_tpu": "Ran out of memory in memory space hbm. Used 19.42G of 15.48G hbm. Exceeded hbm capacity by 3.94G.",
    "tensorflow": "ResourceExhaustedError: OOM when allocating tensor with shape[64,256,56,56] and type float on "
    "/job:localhost/replica:0/task:0/device:GPU:0 by allocator GPU_0_bfc",
    "cuda_error": "RuntimeError: CUDA error: out of memory",
    "cublas": "RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "oom_killer": "[ 518.078584] Out of memory: Killed process 15934 ((resolved)) total-vm:168424kB, "
    "anon-rss:4064kB, file-rss:3584kB, shmem-rss:0kB",
    "colab": "Your session crashed after using all available RAM.",
    "errno": "OSError: [Errno 12] Cannot allocate memory",
    "windows": "OSError: [WinError 1455] The paging file is too small for this operation to complete.",
    "npu": "RuntimeError: NPU out of memory. Tried to allocate 30.00 MiB (NPU 3; 60.96 GiB total capacity; 60.34 GiB "
    "already allocated; 60.34 GiB current active; 14.24 MiB free; 60.60 GiB reserved in total by PyTorch)",
    "tpu_runtime": "RESOURCE_EXHAUSTED: Attempting to reserve 6.48G at the bottom of memory. That was not possible. "
    "There are 6.78G free, 0B reserved, and 3.33G reservable.",
    "pinned_host": "failed to alloc 1073741824 bytes on host: CUDA_ERROR_OUT_OF_MEMORY: out of memory",
    "nccl": "c11e:1346195:1346232 [0] include/alloc.h:105 NCCL WARN Failed to CUDA calloc 1048576 bytes",
    "vllm_startup": "ValueError: Free memory on device cuda:1 (19.77/22.05 GiB) on startup is less than desired GPU "
    "memory utilization (0.9, 19.84 GiB).",
    "vllm_kv_cache": "ValueError: To serve at least one request with the models's max seq len (131072), (16.00 GiB "
    "KV cache is needed, which is larger than the available KV cache memory (0.71 GiB).",
    "vllm_kv_tokens": "ValueError: The model's max seq len (4096) is larger than the maximum number of tokens that "
    "can be stored in KV cache (3664).",
    "tgi": "RuntimeError: Not enough memory to handle 4096 prefill tokens.",
    "model_server": "Error: model requires more system memory (164.8 GiB) than is available (13.4 GiB)",
}

# Text that is no particular format but that patterns step on.
_GENERIC = (
    " GiB",
    " bytes",
    "Process ",
    "(",
    ")",
    "[",
    "`",
    "1",
    "9.",
    "12.5 ",
    "a.",
    "x",
    "\n",
    " \n",
    "   ",
    "> ",
    "\u2502 ",
    "  train.py:42\n",
    "\x1b[0",
    "MemoryError\n",
    "torch.OutOfMemoryError: x\n",
    "Error: ",
    "Unable to allocate array with shape (",
    "7.79 GiB total capacity; ",
    "1.00 GiB already allocated; 2.00 GiB total capacity; ",
    "Tried to allocate 2.00 MiB (GPU 0; ",
    "Killed process 1 (",
    "Killed process 1 (a) total-vm:1kB, ",
    "[Errno 1",
    "Attempting to allocate 1.0G. ",
    "Free memory on device cuda:0 (1.0/",
    "1.00 GiB KV cache is needed, ",
    "[0] include/alloc.h:48 ",
)


def _fragments() -> dict[str, tuple[str, ...]]:
    """Each family's message cut at several lengths (its opening, then into the figures)."""
    out: dict[str, tuple[str, ...]] = {}
    for family, message in MESSAGES.items():
        body = message.split(": ", 1)[1] if message.split(": ", 1)[0].endswith("Error") else message
        # Openings of several lengths, into the figures, and up to each opening bracket: a pattern
        # that scans from a bracket to its partner is what goes quadratic when the partner never comes.
        brackets = {i + 1 for i, c in enumerate(body) if c in "([`"}
        cuts = sorted(({8, 20, 40, len(body) // 2, len(body) - 1} | brackets) & set(range(1, len(body))))
        out[family] = tuple(body[:n] for n in cuts)
    out["generic"] = _GENERIC
    return out


FRAGMENTS = _fragments()


def repeated(fragment: str, size: int, message: str = "") -> str:
    """``fragment`` repeated to ``size`` characters, then a newline and ``message`` if one is given."""
    text = fragment * (size // len(fragment))
    return f"{text}\n{message}" if message else text


def parse_seconds(text: str, repeats: int) -> tuple[float, OOMInfo | None]:
    """The minimum over ``repeats`` parses of ``text``, and what the parse read."""
    best, info = float("inf"), None
    for _ in range(repeats):
        t0 = time.process_time()
        info = parse(text)
        best = min(best, time.process_time() - t0)
    return best, info


def cases() -> list[tuple[str, str, str]]:
    """(family, fragment, message family): each family's fragments before its own message, the
    generic fragments before the messages in turn."""
    out = [
        (family, fragment, family)
        for family, fragments in FRAGMENTS.items()
        if family != "generic"
        for fragment in fragments
    ]
    names = list(MESSAGES)
    out += [("generic", fragment, names[i % len(names)]) for i, fragment in enumerate(FRAGMENTS["generic"])]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=1_000_000, help="characters of repetition (default 1 MB)")
    ap.add_argument("--show", type=int, default=8, help="how many of the slowest fragments to list")
    a = ap.parse_args()
    rows = []
    for family, fragment, name in cases():
        message = MESSAGES[name]
        expected = parse(message)
        for tail in ("", message):
            big, info = parse_seconds(repeated(fragment, a.size, tail), a.repeats)
            small, _ = parse_seconds(repeated(fragment, a.size // 10, tail), a.repeats)
            found = not tail or (info is not None and expected is not None and info.figures() == expected.figures())
            rows.append((big, big / max(small, 1e-9), family, name if tail else "(none)", fragment, found))
    rows.sort(key=lambda r: r[0], reverse=True)
    print(
        f"{len(rows)} inputs of {a.size / 1e6:g} MB (a fragment repeated, alone or + a message), "
        f"CPU time, min of {a.repeats} parses"
    )
    for big, ratio, family, name, fragment, _found in rows[: a.show]:
        print(f"  {big:6.3f} s  x{ratio:5.1f} vs 1/10 the size  {family:>13} -> {name:<13} {fragment[:40]!r}")
    worst = rows[0][0]
    ratios = [r[1] for r in rows]
    lost = [r for r in rows if not r[5]]
    print(
        f"slowest {worst:.3f} s per {a.size / 1e6:g} MB (goal <= 0.5 s); size ratio 10x gives time ratio "
        f"{min(ratios):.1f}x to {max(ratios):.1f}x (median {sorted(ratios)[len(ratios) // 2]:.1f}x); "
        f"message at the end read exactly in {len(rows) // 2 - len(lost)}/{len(rows) // 2}"
    )
    for r in lost:
        print(f"  message lost after {r[4][:40]!r} ({r[2]} -> {r[3]})")


if __name__ == "__main__":
    main()

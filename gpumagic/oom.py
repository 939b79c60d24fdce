"""Out-of-memory errors: read every figure the message states, then advise with numbers.

``parse`` turns an error (an exception, or text: a message, a traceback, a log) into an
:class:`OOMInfo` with the figures as ``int`` bytes, or ``None`` when it is not an out-of-memory
error. It reads the wordings of PyTorch 1.0 to 2.x (CUDA, ROCm/HIP, XPU, MPS, CPU; the caching
allocator and the cudaMallocAsync backend), plus JAX/XLA, TensorFlow and numpy allocation
failures, also when wrapped by a terminal, quoted in an issue, or cut short.

``advise`` turns an ``OOMInfo`` and what the notebook knows (:class:`AdviceContext`) into an
:class:`Advice`: ranked suggestions whose numbers are derived from those figures, and a list of
what could not be derived.

    >>> info = parse("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 7.79 GiB total "
    ...              "capacity; 6.64 GiB already allocated; 21.00 MiB free; 150.86 MiB cached)")
    >>> info.tried_to_allocate, info.free
    (20971520, 22020096)

Only the standard library and gpumagic's private modules are imported: no torch needed.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from html import escape
from typing import Any, Final

from gpumagic._batchmath import accumulation_plan, lr_note, round_like
from gpumagic._units import format_bytes

__all__ = ["Advice", "AdviceContext", "OOMInfo", "Suggestion", "advise", "parse"]

GiB: Final = 2**30
MiB: Final = 2**20
# Printed values this large stand for "no limit"/"unknown": PyTorch prints SIZE_MAX (2**64) as
# "17179869184.00 GiB" when no memory fraction is set. No device holds 8 EiB.
_UNKNOWN_FROM: Final = 2**63
# The margin kept free when a batch size is computed from a fit or a proportion.
_MARGIN: Final = 0.95

# ---------------------------------------------------------------------------------------------
# OOMInfo
# ---------------------------------------------------------------------------------------------

# The numeric fields, in bytes. Listed once so tests, scoring and rendering agree.
FIGURES: Final = (
    "tried_to_allocate",
    "total_capacity",
    "free",
    "allocated_by_pytorch",
    "reserved_unallocated",
    "reserved_total",
    "process_in_use",
    "max_allowed",
    "mps_allocated",
    "other_allocations",
    "private_pools",
    "required_total",
)


@dataclass(frozen=True)
class OOMInfo:
    """What an out-of-memory message states. Sizes are ``int`` bytes; ``None`` where not stated.

    ``kind`` names the wording: ``cuda_caching_allocator`` (the parenthesised message of PyTorch
    1.x, also for HIP and XPU), ``cuda_sentence`` (2.1+), ``cuda_malloc_async``, ``cuda_error``,
    ``cublas``, ``cudnn``, ``cuda_library``, ``xpu_allocation_limit``, ``mps``,
    ``cpu_allocator``, ``numpy``, ``python_memory_error``, ``xla_resource_exhausted``,
    ``xla_tpu_compile``, ``tensorflow``, or ``out_of_memory_error`` (only the class is known).
    ``device_type`` is "cuda", "hip", "xpu", "mps", "cpu", "gpu" (TensorFlow), "xla", "tpu", or
    ``None``; ``simulated`` marks gpumagic's own budget on cpu.

    ``reserved_unallocated`` is memory PyTorch reserved but has not handed out ("cached" in old
    messages); ``reserved_total`` is all it reserved. When a message gives two of
    *allocated*, *reserved but unallocated* and *reserved in total*, the third is derived.
    ``max_allowed`` is a memory-fraction limit or the MPS high watermark. ``processes`` are the
    other processes the message names, as ``(pid, bytes)``. ``required_total`` is what a
    compiled XLA program needs ("Used X of Y hbm"). ``message`` is the error as found.
    """

    kind: str
    device_type: str | None = None
    device_index: int | None = None
    tried_to_allocate: int | None = None
    total_capacity: int | None = None
    free: int | None = None
    allocated_by_pytorch: int | None = None
    reserved_unallocated: int | None = None
    reserved_total: int | None = None
    process_in_use: int | None = None
    max_allowed: int | None = None
    mps_allocated: int | None = None
    other_allocations: int | None = None
    private_pools: int | None = None
    required_total: int | None = None
    processes: tuple[tuple[int, int], ...] = ()
    simulated: bool = False
    exception_type: str | None = None
    message: str = ""

    @property
    def device(self) -> str | None:
        """``"cuda:0"``, ``"mps"``, ... or ``None`` when the message names no device."""
        if self.device_type is None:
            return None
        return self.device_type if self.device_index is None else f"{self.device_type}:{self.device_index}"

    def figures(self) -> dict[str, int]:
        """The sizes the message states (or that follow from two stated ones), by field name."""
        out: dict[str, int] = {}
        for name in FIGURES:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def summary(self) -> str:
        """One line for people.

        >>> parse("MPS backend out of memory (MPS allocated: 1.00 GB, other allocations: 0 bytes, "
        ...       "max allowed: 1.00 GB). Tried to allocate 256 bytes on private pool.").summary()
        'Out of memory on mps: tried to allocate 256 B with 1.00 GiB in use of the 1.00 GiB limit.'
        """
        return _headline(self)


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------

# A printed size: "20.00 MiB", "512 bytes", "2.00GiB" (TensorFlow), "139. MiB" (numpy),
# "21.95G" (XLA), "18.09 GB" (MPS, binary despite the name).
_SZ: Final = r"\d+(?:\.\d*)?\s?(?:bytes?|[KMGTPE]i?B|B|[KMGTPE](?![A-Za-z]))"
_NUM_UNIT: Final = re.compile(r"(\d+(?:\.\d*)?)\s?([A-Za-z]*)")
_UNIT: Final = {
    "": 1,
    "b": 1,
    "byte": 1,
    "bytes": 1,
    **{f"{p}{s}": 1024 ** (i + 1) for i, p in enumerate("kmgtpe") for s in ("", "b", "ib")},
}


def _bytes(text: str | None) -> int | None:
    """``"1.50 GiB"`` -> 1610612736: printed value times its (binary) unit, rounded half up.

    Every allocator message that prints "GB"/"MB"/"G" means powers of 1024 (MPS, XLA). A value
    of 2**63 or more means "unknown" (PyTorch prints SIZE_MAX when no limit is set).
    """
    if text is None:
        return None
    m = _NUM_UNIT.fullmatch(text.strip())
    if m is None or m.group(2).lower() not in _UNIT:
        return None
    try:
        value = Decimal(m.group(1)) * _UNIT[m.group(2).lower()]
    except InvalidOperation:
        return None
    n = int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))
    return None if n >= _UNKNOWN_FROM else n


# ---------------------------------------------------------------------------------------------
# Text normalisation
# ---------------------------------------------------------------------------------------------

_ANSI: Final = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Leading whitespace and quote/comment markers ("> " in issues, "# " in code comments).
_LEAD: Final = re.compile(r"^[ \t]*(?:[#>][ \t]?)*[ \t]*")
_SPACE: Final = re.compile(r"\s+")


def _variants(raw: str) -> list[str]:
    """The text as one line, plus a version that undoes a terminal's hard wrap if it has one.

    A terminal wraps at a fixed width, mid-word or mid-number ("20.0" / "0 MiB"): lines of
    exactly that width are joined to the next without a space. Both versions are parsed and
    the one that yields more figures wins.
    """
    raw = _ANSI.sub("", raw).replace("\r\n", "\n").replace("\r", "\n")
    lines = raw.split("\n")
    soft = _SPACE.sub(" ", " ".join(_LEAD.sub("", line) for line in lines)).strip()
    out = [soft]
    widths = Counter(len(line) for line in lines if len(line) >= 20)
    if widths:
        width, count = widths.most_common(1)[0]
        if count >= 2:
            parts: list[str] = []
            wrapped = False
            for line in lines:
                parts.append(line if wrapped else " " + _LEAD.sub("", line))
                wrapped = len(line) == width
            hard = _SPACE.sub(" ", "".join(parts)).strip()
            if hard != soft:
                out.append(hard)
    return out


# ---------------------------------------------------------------------------------------------
# Anchors: where a message starts, and which reader reads it
# ---------------------------------------------------------------------------------------------

_DEV_WORD: Final = {"CUDA": "cuda", "HIP": "hip", "XPU": "xpu", "MTIA": "mtia", "NPU": "npu"}

# "CUDA" may be glued to the word before it (an issue title "whyCUDA out of memory."); the
# shorter names need a boundary. The period keeps prose ("If you encounter CUDA out of memory,") out.
_A_ALLOCATOR: Final = re.compile(r"(?P<dev>CUDA|(?<![A-Za-z])(?:HIP|XPU|MTIA|NPU)) out of memory(?:\.|\s*$)")
_A_BLOCK_LIMIT: Final = re.compile(r"Current platform can NOT allocate memory block with size larger than \d+\s?GB!")
_A_ASYNC: Final = re.compile(r"Allocation on device\s*(?P<idx>\d+)?\s*would exceed allowed memory")
_A_MPS: Final = re.compile(r"MPS backend out of memory")
_A_CPU: Final = re.compile(
    r"DefaultCPUAllocator: (?:can't allocate memory|not enough memory): you tried to allocate "
    r"(?:(?P<n>\d+) bytes|\d+\s?GB)"
)
_A_NUMPY: Final = re.compile(
    rf"Unable to allocate (?:(?P<size>{_SZ}) for an )?array with shape \((?P<shape>[^)]*)\)"
    r"(?: and data type (?P<dtype>[\w<>|]+))?"
)
_A_XLA: Final = re.compile(
    r"(?:RESOURCE_EXHAUSTED|Resource exhausted):\s*Out of memory (?:while trying to allocate|allocating)\s*"
    r"(?P<n>\d+)\s*bytes",
    re.IGNORECASE,
)
_A_XLA_COMPILE: Final = re.compile(
    rf"Ran out of memory in memory space (?P<space>\w+)\."
    rf"(?:\s*Used (?P<used>{_SZ}) of (?P<cap>{_SZ}) (?P=space)\.)?"
    rf"(?:\s*Exceeded (?P=space) capacity by (?P<over>{_SZ}))?"
)
_A_TF_TENSOR: Final = re.compile(
    r"OOM when allocating tensor (?:with|of) shape\s*\[(?P<shape>[^\]]*)\]"
    r"(?: and type (?P<dtype>\w+))?(?: on (?P<on>\S+?))?(?: by allocator (?P<alloc>\w+))?(?=[\s\[]|$)"
)
_A_TF_BFC: Final = re.compile(rf"Allocator \((?P<alloc>\w+)\) ran out of memory trying to allocate (?P<size>{_SZ})")
_A_TF_DEVICE: Final = re.compile(
    rf"failed to allocate (?P<size>{_SZ}) \((?P<n>\d+) bytes\) from device: "
    r"CUDA_ERROR_OUT_OF_MEMORY(?:: out of memory)?"
)
_A_CUDA_ERROR: Final = re.compile(
    r"(?P<dev>CUDA|HIP) error:\s*out of memory|cuda runtime error \(2\) ?: out of memory|"
    r"error=2 : out of memory|CUDA_ERROR_OUT_OF_MEMORY|cudaErrorMemoryAllocation|hipErrorOutOfMemory",
    re.IGNORECASE,
)
_A_CUBLAS: Final = re.compile(
    r"(?:CUDA error: )?CUBLAS_STATUS_ALLOC_FAILED(?: when calling `[^`]*`)?|failed to create cublas handle: "
    r"CUBLAS_STATUS_ALLOC_FAILED",
    re.IGNORECASE,
)
_A_CUDNN: Final = re.compile(r"(?:cuDNN error: )?CUDNN_STATUS_ALLOC_FAILED", re.IGNORECASE)
_A_CULIB: Final = re.compile(r"CU(?:SOLVER|SPARSE)_STATUS_ALLOC_FAILED|CUFFT_ALLOC_FAILED")

# Only when nothing above matched: a traceback line naming an out-of-memory exception class.
_A_OOM_CLASS: Final = re.compile(r"^\s*(?:[\w.]+\.)?OutOfMemoryError: \S.*$", re.MULTILINE)
_A_MEMORY_ERROR: Final = re.compile(r"^\s*(?:[\w.]*\.)?MemoryError(?:: .*)?\s*$", re.MULTILINE)

_ANCHORS: Final = (
    ("allocator", _A_ALLOCATOR),
    ("block_limit", _A_BLOCK_LIMIT),
    ("async", _A_ASYNC),
    ("mps", _A_MPS),
    ("cpu", _A_CPU),
    ("numpy", _A_NUMPY),
    ("xla", _A_XLA),
    ("xla_compile", _A_XLA_COMPILE),
    ("tf_tensor", _A_TF_TENSOR),
    ("tf_bfc", _A_TF_BFC),
    ("tf_device", _A_TF_DEVICE),
    ("cuda_error", _A_CUDA_ERROR),
    ("cublas", _A_CUBLAS),
    ("cudnn", _A_CUDNN),
    ("cuda_library", _A_CULIB),
)

# Wordings that state no figure; each is also the kind it reads as.
_NO_FIGURES: Final = frozenset({"cuda_error", "cublas", "cudnn", "cuda_library"})
# A message's own fields never lie further than this from where it starts.
_WINDOW: Final = 2500


def _anchors(text: str) -> list[tuple[str, re.Match[str]]]:
    """Every message start in ``text``, in order, overlaps resolved in favour of the earlier one."""
    found = [(name, m) for name, rx in _ANCHORS for m in rx.finditer(text)]
    found.sort(key=lambda item: (item[1].start(), -item[1].end()))
    kept: list[tuple[str, re.Match[str]]] = []
    for name, m in found:
        if kept and m.start() < kept[-1][1].end():
            continue
        kept.append((name, m))
    return kept


# ---------------------------------------------------------------------------------------------
# Readers, one per wording
# ---------------------------------------------------------------------------------------------


class _Fields:
    """Collects figures and remembers where the last one ended (the end of the message)."""

    def __init__(self, window: str, start: int) -> None:
        self.window = window
        self.end = start
        self.values: dict[str, Any] = {}

    def find(
        self, pattern: str, name: str | None = None, *, pos: int = 0, end: int | None = None
    ) -> re.Match[str] | None:
        m = re.compile(pattern).search(self.window, pos, len(self.window) if end is None else end)
        if m is not None:
            self.end = max(self.end, m.end())
            if name is not None:
                self.values[name] = _bytes(m.group(1))
        return m


def _read_allocator(window: str, m: re.Match[str], *, kind: str | None = None) -> tuple[dict[str, Any], int]:
    """The caching allocator's messages (CUDA, HIP, XPU), old parenthesised or 2.1+ sentences."""
    dev = m.groupdict().get("dev")
    f = _Fields(window, m.end())
    f.values["device_type"] = _DEV_WORD.get(dev, "cuda") if dev else "xpu"
    tried = f.find(rf"Tried to allocate ({_SZ})", "tried_to_allocate", pos=m.start())
    after = tried.end() if tried else m.end()
    old = re.compile(r"\s*\(\s*(?:GPU|XPU)\s*(\d+)\s*;").match(window, after)
    if old is not None:
        f.values["kind"] = kind or "cuda_caching_allocator"
        f.values["device_index"] = int(old.group(1))
        f.end = max(f.end, old.end())
        block = old.end()
        close = window.find(")", block)  # the figures are inside the parentheses (or up to a cut)
        close = len(window) if close == -1 else close
        f.find(rf"({_SZ}) total capacity", "total_capacity", pos=block, end=close)
        f.find(rf"({_SZ}) already allocated", "allocated_by_pytorch", pos=block, end=close)
        f.find(rf"({_SZ}) free\b", "free", pos=block, end=close)
        f.find(rf"({_SZ}) allowed;", "max_allowed", pos=block, end=close)
        f.find(rf"({_SZ}) cached\b", "reserved_unallocated", pos=block, end=close)
        f.find(rf"({_SZ}) reserved in total by PyTorch", "reserved_total", pos=block, end=close)
        return f.values, f.end
    # The figures end where the advice about fragmentation or empty_cache begins.
    tail = re.compile(r"If reserved but unallocated memory|Please use `empty_cache`").search(window, after)
    f.window = window[: tail.start()] if tail is not None else window
    sentence = f.find(r"(?:GPU|XPU|device)\s*(\d+) has a total capac\w* of", pos=after)
    f.values["kind"] = kind or ("cuda_sentence" if sentence else "cuda_caching_allocator")
    if sentence is not None:
        f.values["device_index"] = int(sentence.group(1))
        f.find(rf"has a total capac\w* of ({_SZ})", "total_capacity", pos=after)
    f.find(rf"of which ({_SZ}) is free", "free", pos=after)
    processes = []
    for p in re.finditer(rf"Process (\d+) has ({_SZ}) memory", f.window[after:]):
        size = _bytes(p.group(2))
        if size is not None:
            processes.append((int(p.group(1)), size))
        f.end = max(f.end, after + p.end())
    f.values["processes"] = tuple(processes)
    f.find(rf"this process has ({_SZ}) memory", "process_in_use", pos=after)
    f.find(rf"({_SZ}) allowed;", "max_allowed", pos=after)
    f.find(rf"Of the allocated memory ({_SZ}) is allocated by PyTorch", "allocated_by_pytorch", pos=after)
    f.find(rf"with ({_SZ}) allocated in private pools", "private_pools", pos=after)
    f.find(rf"({_SZ}) is reserved by PyTorch but unallocated", "reserved_unallocated", pos=after)
    sim = f.find(rf"\(simulated by gpumagic: (\w+) with a ({_SZ}) budget\)", pos=after)
    if sim is not None:
        f.values.update(simulated=True, device_type=sim.group(1), device_index=None)
    return f.values, f.end


def _read_async(window: str, m: re.Match[str]) -> tuple[dict[str, Any], int]:
    """The cudaMallocAsync backend: "Allocation on device 0 would exceed allowed memory." + a table."""
    f = _Fields(window, m.end())
    f.values.update(kind="cuda_malloc_async", device_type="cuda")
    if m.group("idx") is not None:
        f.values["device_index"] = int(m.group("idx"))
    f.find(r"\s*\(out of memory\)", pos=m.end())
    f.find(rf"Currently allocated\s*:\s*({_SZ})", "allocated_by_pytorch", pos=m.end())
    f.find(rf"Requested\s*:\s*({_SZ})", "tried_to_allocate", pos=m.end())
    f.find(rf"Device limit\s*:\s*({_SZ})", "total_capacity", pos=m.end())
    f.find(rf"Free \(according to CUDA\)\s*:\s*({_SZ})", "free", pos=m.end())
    f.find(rf"PyTorch limit \(set by user-supplied memory fraction\)\s*:\s*({_SZ})", "max_allowed", pos=m.end())
    return f.values, f.end


def _read_mps(window: str, m: re.Match[str]) -> tuple[dict[str, Any], int]:
    """The MPS allocator: "(MPS allocated: X, other allocations: Y, max allowed: Z). Tried to allocate W"."""
    f = _Fields(window, m.end())
    f.values.update(kind="mps", device_type="mps")
    f.find(rf"MPS allocated:\s*({_SZ})", "mps_allocated", pos=m.end())
    f.find(rf"other allocations:\s*({_SZ})", "other_allocations", pos=m.end())
    f.find(rf"max allowed:\s*({_SZ})", "max_allowed", pos=m.end())
    f.find(rf"Tried to allocate ({_SZ})(?: on (?:private|shared) pool)?", "tried_to_allocate", pos=m.end())
    return f.values, f.end


# Element sizes by the dtype names numpy and TensorFlow print.
_ITEMSIZE: Final = {
    "bool": 1, "int8": 1, "uint8": 1, "qint8": 1, "quint8": 1,
    "int16": 2, "uint16": 2, "float16": 2, "half": 2, "bfloat16": 2, "qint16": 2, "quint16": 2,
    "int32": 4, "uint32": 4, "float32": 4, "float": 4, "qint32": 4,
    "int64": 8, "uint64": 8, "float64": 8, "double": 8, "complex64": 8,
    "complex128": 16,
}  # fmt: skip


def _shape_bytes(shape: str, dtype: str | None) -> int | None:
    """Bytes of a tensor from its printed shape and dtype, or None if either cannot be read."""
    if dtype is None or dtype.lower() not in _ITEMSIZE:
        return None
    dims = [d for d in re.split(r"[,\s]+", shape.strip()) if d]
    if not all(d.isdigit() for d in dims):
        return None
    n = _ITEMSIZE[dtype.lower()]
    for d in dims:
        n *= int(d)
    return n


def _read_simple(name: str, window: str, m: re.Match[str]) -> tuple[dict[str, Any], int]:
    """The one-figure wordings: CPU allocator, numpy, XLA, TensorFlow, CUDA/cuBLAS/cuDNN errors."""
    v: dict[str, Any] = {}
    end = m.end()
    if name == "cpu":
        v.update(kind="cpu_allocator", device_type="cpu", tried_to_allocate=_int(m.group("n")))
    elif name == "numpy":
        size = _shape_bytes(m.group("shape"), m.group("dtype"))
        v.update(
            kind="numpy", device_type="cpu", tried_to_allocate=size if size is not None else _bytes(m.group("size"))
        )
    elif name == "xla":
        v.update(kind="xla_resource_exhausted", device_type="xla", tried_to_allocate=_int(m.group("n")))
    elif name == "xla_compile":
        v.update(kind="xla_tpu_compile", device_type="tpu")
        if m.group("space").lower() == "hbm":
            v.update(total_capacity=_bytes(m.group("cap")), required_total=_bytes(m.group("used")))
    elif name == "tf_tensor":
        v.update(kind="tensorflow", tried_to_allocate=_shape_bytes(m.group("shape"), m.group("dtype")))
        v.update(_tf_device(m.group("on"), m.group("alloc")))
    elif name == "tf_bfc":
        v.update(kind="tensorflow", tried_to_allocate=_bytes(m.group("size")), **_tf_device(None, m.group("alloc")))
    elif name == "tf_device":
        v.update(kind="tensorflow", device_type="gpu", tried_to_allocate=_int(m.group("n")))
    elif name == "cuda_error":
        hip = "hip" in m.group(0).lower()
        v.update(kind="cuda_error", device_type="hip" if hip else "cuda")
    elif name in ("cublas", "cudnn"):
        v.update(kind=name, device_type="cuda")
    else:
        v.update(kind="cuda_library", device_type="cuda")
    return v, end


def _tf_device(on: str | None, allocator: str | None) -> dict[str, Any]:
    """TensorFlow names devices "/job:localhost/replica:0/task:0/device:GPU:0" and allocators "GPU_0_bfc"."""
    if on is not None:
        d = re.search(r"device:([A-Za-z]+):(\d+)", on)
        if d is not None:
            return {"device_type": d.group(1).lower(), "device_index": int(d.group(2))}
    if allocator is not None:
        a = re.fullmatch(r"([A-Za-z]+)_(\d+)_bfc", allocator)
        if a is not None:
            return {"device_type": a.group(1).lower(), "device_index": int(a.group(2))}
        if allocator.lower() == "cpu":
            return {"device_type": "cpu"}
    return {}


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    n = int(text)
    return None if n >= _UNKNOWN_FROM else n


# ---------------------------------------------------------------------------------------------
# parse
# ---------------------------------------------------------------------------------------------

_EXC_PREFIX: Final = re.compile(r"(?:[\w.]*(?:Error|Exception)|!!! Exception during processing !!!):\s*$")


def _parse_text(text: str) -> OOMInfo | None:
    anchors = _anchors(text)
    if not anchors:
        return None
    # The last message is the one that was raised: a traceback or a log ends with it. Wordings
    # without figures often name the error twice ("CUDA error: out of memory ... Search for
    # `cudaErrorMemoryAllocation'"): those start at the first naming.
    name, m = anchors[-1]
    i = len(anchors) - 1
    while i > 0 and name in _NO_FIGURES and anchors[i - 1][0] == name and m.start() - anchors[i - 1][1].end() < 300:
        i -= 1
    first = anchors[i][1]
    window = text[: m.start() + _WINDOW]
    if name == "allocator":
        values, end = _read_allocator(window, m)
    elif name == "block_limit":
        values, end = _read_allocator(window, m, kind="xpu_allocation_limit")
    elif name == "async":
        values, end = _read_async(window, m)
    elif name == "mps":
        values, end = _read_mps(window, m)
    else:
        values, end = _read_simple(name, window, m)
    tail = re.compile(r"\s*[.)]").match(text, end)
    if tail is not None:
        end = tail.end()
    start = first.start()
    prefix = _EXC_PREFIX.search(text, max(0, start - 120), start)
    if prefix is not None:
        start = prefix.start()
    values["message"] = text[start:end].strip()
    return _complete(OOMInfo(**values))


def _complete(info: OOMInfo) -> OOMInfo:
    """Derive the third of allocated / reserved-but-unallocated / reserved-in-total from the other two."""
    a, u, t = info.allocated_by_pytorch, info.reserved_unallocated, info.reserved_total
    if u is None and a is not None and t is not None:
        return replace(info, reserved_unallocated=max(t - a, 0))
    if t is None and a is not None and u is not None:
        return replace(info, reserved_total=a + u)
    return info


def _score(info: OOMInfo) -> int:
    return len(info.figures()) + len(info.processes) + (info.device_index is not None)


def _class_name(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    return cls.__qualname__ if module in ("builtins", "__main__") else f"{module}.{cls.__qualname__}"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, then its ``__cause__`` and ``__context__`` chains, each once."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)


def _parse_exception(exc: BaseException) -> OOMInfo | None:
    name = _class_name(exc)
    text = str(exc)
    info = _parse_any_text(f"{name}: {text}" if text else name)
    if info is not None:
        return replace(info, exception_type=name)
    if type(exc).__name__ == "OutOfMemoryError":
        return OOMInfo(kind="out_of_memory_error", exception_type=name, message=f"{name}: {text}".strip(": "))
    if isinstance(exc, MemoryError):
        return OOMInfo(
            kind="python_memory_error", device_type="cpu", exception_type=name, message=f"{name}: {text}".strip(": ")
        )
    return None


def _parse_any_text(raw: str) -> OOMInfo | None:
    best: OOMInfo | None = None
    for text in _variants(raw):
        info = _parse_text(text)
        if info is not None and (best is None or _score(info) > _score(best)):
            best = info
    if best is not None:
        return best
    # No wording we know: a traceback line that names an out-of-memory exception class still says OOM.
    raw = _ANSI.sub("", raw)
    lines = list(_A_OOM_CLASS.finditer(raw))
    if lines:
        return OOMInfo(kind="out_of_memory_error", message=lines[-1].group(0).strip())
    lines = list(_A_MEMORY_ERROR.finditer(raw))
    if lines:
        return OOMInfo(kind="python_memory_error", device_type="cpu", message=lines[-1].group(0).strip())
    return None


def parse(text_or_exception: str | BaseException) -> OOMInfo | None:
    """Read an out-of-memory error; ``None`` if it is not one.

    Accepts the exception itself (its class, message and ``__cause__``/``__context__`` chain are
    read) or any text holding the message: the message alone, a traceback, a log, an issue.

    >>> parse(RuntimeError("CUDA error: device-side assert triggered")) is None
    True
    >>> parse("RuntimeError: CUDA error: out of memory").kind
    'cuda_error'
    """
    if isinstance(text_or_exception, BaseException):
        best: OOMInfo | None = None
        for exc in _chain(text_or_exception):
            info = _parse_exception(exc)
            if info is not None and (best is None or _score(info) > _score(best)):
                best = info
        return best
    if not isinstance(text_or_exception, str):
        raise TypeError(f"parse() takes an exception or a str, got {type(text_or_exception).__name__}")
    return _parse_any_text(text_or_exception)


# ---------------------------------------------------------------------------------------------
# Advice
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdviceContext:
    """What the notebook knows beyond the message; every field is optional.

    ``peak_bytes``: the last measured peak (it stands for the failing step's need only when the
    message has no figures and it exceeds what is usable). ``baseline_bytes``: memory held
    before the cell (models, data from earlier cells), kept fixed when the batch is scaled.
    ``bytes_per_sample``/``intercept_bytes``: a batch-size fit, peak(b) ≈ intercept + slope·b.
    ``holders``: names in the user namespace holding the most device memory. ``processes``: other
    processes on the GPU (pid, bytes, name).
    """

    batch_size: int | None = None
    effective_batch_size: int | None = None
    accumulation_steps: int | None = None
    optimizer: str | None = None
    peak_bytes: int | None = None
    baseline_bytes: int | None = None
    capacity_bytes: int | None = None
    bytes_per_sample: float | None = None
    intercept_bytes: float | None = None
    holders: tuple[tuple[str, int], ...] = ()
    processes: tuple[tuple[int, int, str | None], ...] = ()
    mixed_precision: bool | None = None
    activation_bytes: int | None = None


@dataclass(frozen=True)
class Suggestion:
    """One thing to try. ``kind`` names it for code ("batch_size", "fragmentation", ...)."""

    title: str
    detail: str
    kind: str
    batch_size: int | None = None
    accumulation_steps: int | None = None
    code: str | None = None


@dataclass(frozen=True)
class Advice:
    """Ranked suggestions for an out-of-memory error, with what could not be derived.

    ``fits_batch_size`` is the batch size the figures say should fit: exact up to the fit when a
    batch-size fit is known; from a failed step alone it is an upper bound (the step needed more
    than it had reached). In Jupyter it renders as a small HTML block; ``str()`` is plain text.
    """

    headline: str
    suggestions: tuple[Suggestion, ...] = ()
    unknown: tuple[str, ...] = ()
    fits_batch_size: int | None = None
    info: OOMInfo | None = field(default=None, repr=False, compare=False)

    def text(self) -> str:
        """Plain text: the headline, one line per suggestion (code for the first two), what is unknown."""
        lines = [self.headline]
        shown = 0
        for i, s in enumerate(self.suggestions, 1):
            lines.append(f"{i}. {s.title}: {s.detail}")
            if s.code and shown < 2:
                shown += 1
                lines.extend(f"     {c}" for c in s.code.splitlines())
        if self.unknown:
            lines.append("Unknown: " + "; ".join(self.unknown) + ".")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()

    def __repr__(self) -> str:
        return f"<Advice: {self.headline} ({len(self.suggestions)} suggestions)>"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.text())

    def _repr_html_(self) -> str:
        items = []
        for s in self.suggestions:
            code = f'<pre style="margin:2px 0 4px 0">{escape(s.code)}</pre>' if s.code else ""
            items.append(f"<li><b>{escape(s.title)}</b>: {escape(s.detail)}{code}</li>")
        unknown = f'<div style="opacity:0.7">Unknown: {escape("; ".join(self.unknown))}.</div>' if self.unknown else ""
        return (
            '<div class="gpumagic-oom" style="font-size:13px">'
            f"<div><b>{escape(self.headline)}</b></div>"
            f'<ol style="margin:4px 0;padding-left:22px">{"".join(items)}</ol>{unknown}</div>'
        )


_HOST_KINDS: Final = frozenset({"cpu_allocator", "numpy", "python_memory_error"})
# Wordings raised by PyTorch, where torch code snippets apply.
_TORCH_KINDS: Final = frozenset(
    {
        "cuda_caching_allocator", "cuda_sentence", "cuda_malloc_async", "cuda_error", "cublas", "cudnn",
        "cuda_library", "mps", "cpu_allocator", "out_of_memory_error", "xpu_allocation_limit",
    }
)  # fmt: skip


def _is_host(info: OOMInfo | None) -> bool:
    return info is not None and (info.kind in _HOST_KINDS or (info.device_type == "cpu" and not info.simulated))


def _headline(info: OOMInfo | None) -> str:
    if info is None:
        return "Out of memory (the error states no figures)."
    fb = format_bytes
    tried = f"tried to allocate {fb(info.tried_to_allocate)}" if info.tried_to_allocate is not None else None
    if _is_host(info):
        return "Out of host memory (RAM)" + (f": {tried}." if tried else ".")
    if info.simulated:
        where = f"the simulated {info.device_type} device"
        if info.total_capacity is not None:
            where += f" (budget {fb(info.total_capacity)})"
    else:
        where = info.device or "the device"
    state = None
    if info.kind == "mps" and info.max_allowed is not None and info.mps_allocated is not None:
        used = info.mps_allocated + (info.other_allocations or 0)
        state = f"{fb(used)} in use of the {fb(info.max_allowed)} limit"
    elif info.required_total is not None and info.total_capacity is not None:
        state = f"the program needs {fb(info.required_total)} of {fb(info.total_capacity)}"
    elif info.free is not None:
        of = f" of {fb(info.total_capacity)}" if info.total_capacity is not None and not info.simulated else ""
        state = f"{fb(info.free)} free{of}"
    elif info.total_capacity is not None:
        state = f"{fb(info.total_capacity)} in total"
    if info.max_allowed is not None and info.kind != "mps" and state is not None:
        state += f", limit {fb(info.max_allowed)}"
    body: str | None = tried or state
    if tried and state:
        body = f"{tried} with {state}" if not state.startswith("the program") else f"{tried}; {state}"
    return f"Out of memory on {where}: {body}." if body else f"Out of memory on {where} (the error states no figures)."


@dataclass
class _Facts:
    """The numbers advice is computed from, each with how it was obtained (for the details)."""

    usable: int | None = None
    usable_how: str = ""
    needed: int | None = None
    needed_how: str = ""
    needed_is_lower_bound: bool = True
    fixed: float | None = None
    fixed_how: str = ""


def _facts(info: OOMInfo | None, ctx: AdviceContext) -> _Facts:
    """Usable memory, what the failing step needed, and the part that does not grow with the batch."""
    f = _Facts()
    fb = format_bytes
    if info is not None and info.kind == "mps":
        if info.max_allowed is not None:
            other = info.other_allocations or 0
            f.usable = info.max_allowed - other
            f.usable_how = f"the {fb(info.max_allowed)} limit" + (
                f" less {fb(other)} of other allocations" if other else ""
            )
        if info.mps_allocated is not None and info.tried_to_allocate is not None:
            f.needed = info.mps_allocated + info.tried_to_allocate
            f.needed_how = f"{fb(info.mps_allocated)} allocated + {fb(info.tried_to_allocate)} requested"
    elif info is not None and info.required_total is not None and info.total_capacity is not None:
        f.usable, f.usable_how = info.total_capacity, f"{fb(info.total_capacity)} of device memory"
        f.needed, f.needed_how = info.required_total, "the compiled program's need"
        f.needed_is_lower_bound = False
    elif info is not None:
        a, free = info.allocated_by_pytorch, info.free
        if a is not None and free is not None:
            f.usable, f.usable_how = a + free, f"{fb(a)} allocated + {fb(free)} free"
        elif info.total_capacity is not None:
            f.usable, f.usable_how = info.total_capacity, f"the {fb(info.total_capacity)} total"
        if info.max_allowed is not None and (f.usable is None or info.max_allowed < f.usable):
            f.usable, f.usable_how = info.max_allowed, f"the {fb(info.max_allowed)} limit"
        if a is not None and info.tried_to_allocate is not None:
            f.needed = a + info.tried_to_allocate
            f.needed_how = f"{fb(a)} allocated + {fb(info.tried_to_allocate)} requested"
    if ctx.capacity_bytes is not None and (f.usable is None or ctx.capacity_bytes < f.usable):
        f.usable, f.usable_how = ctx.capacity_bytes, f"the {fb(ctx.capacity_bytes)} capacity"
    # A peak above what is usable can only be the failing run's: use it when the message has no figures.
    if f.needed is None and ctx.peak_bytes is not None and f.usable is not None and ctx.peak_bytes > f.usable:
        f.needed, f.needed_how = ctx.peak_bytes, "the last measured peak"
    if ctx.intercept_bytes is not None and ctx.bytes_per_sample is not None:
        f.fixed, f.fixed_how = ctx.intercept_bytes, "the fit's fixed part"
    elif ctx.baseline_bytes is not None:
        f.fixed, f.fixed_how = float(ctx.baseline_bytes), "the memory held before the cell"
    return f


def _form_note(b: int | None, exact: int, pick: int) -> str:
    if b is None or pick == exact:
        return ""
    if b & (b - 1) == 0:
        return f"; {pick} is the power of two below"
    return f"; {pick} keeps the form of {b}"


def _batch_suggestion(ctx: AdviceContext, f: _Facts, unknown: list[str]) -> Suggestion | None:
    """The batch size that should fit: from the batch-size fit when there is one, else in proportion."""
    fb = format_bytes
    b = ctx.batch_size
    now = f" (now {b})" if b is not None else ""
    slope, intercept = ctx.bytes_per_sample, ctx.intercept_bytes
    if slope is not None and intercept is not None and slope > 0:
        if f.usable is None:
            unknown.append("the capacity to fit the batch into (no figure in the error; pass capacity_bytes)")
            return None
        room = f.usable * _MARGIN
        if room - intercept < slope:
            return Suggestion(
                "Even batch 1 does not fit",
                f"the fit's fixed part, {fb(round(intercept))}, plus {fb(round(slope))} per sample exceeds "
                f"{fb(round(room))} (95% of {f.usable_how}): free memory first",
                "batch_size",
            )
        exact = int((room - intercept) // slope)
        pick = round_like(exact, b)
        return Suggestion(
            f"Use batch size {pick}{now}",
            f"peak ≈ {fb(round(intercept))} + {fb(round(slope))} per sample, so up to {exact} samples fit in "
            f"{fb(round(room))} (95% of {f.usable_how}){_form_note(b, exact, pick)}",
            "batch_size",
            batch_size=pick,
        )
    if b is None:
        unknown.append("the batch size in use (pass batch_size, or name it `batch_size` in the notebook)")
        return None
    if f.needed is None:
        unknown.append("how much the failing step needed (the error gives no allocated or requested figure)")
    if f.usable is None:
        unknown.append("how much memory is usable (the error gives no capacity or free figure)")
    if f.needed is None or f.usable is None:
        return None
    fixed = f.fixed if f.fixed is not None else 0.0
    room = f.usable * _MARGIN
    if room <= fixed:
        return Suggestion(
            "Free memory first: no batch size fits",
            f"{f.fixed_how} ({fb(round(fixed))}) already fills 95% of {f.usable_how} ({fb(round(room))})",
            "batch_size",
        )
    if f.needed <= room:
        return None  # the figures say this batch fits: the cause is elsewhere (fragmentation, others)
    exact = max(1, math.floor(b * (room - fixed) / (f.needed - fixed)))
    pick = round_like(exact, b)
    more = "more than " if f.needed_is_lower_bound else ""
    if f.fixed is None:
        unknown.append("how much memory does not grow with the batch (no baseline or fit)")
        assume = " if all memory grows with the batch"
    else:
        assume = f", keeping {f.fixed_how} ({fb(round(fixed))}) fixed"
    bound = "at most " if f.needed_is_lower_bound else ""
    detail = (
        f"batch {b} needed {more}{fb(f.needed)} ({f.needed_how}) of {fb(f.usable)} usable ({f.usable_how}); "
        f"scaled to 95% of that: {bound}{exact} samples{assume}{_form_note(b, exact, pick)}"
    )
    title = f"Use batch size {pick}{now}"
    if f.needed_is_lower_bound:
        # The step failed part-way: what it needed in all is more than the figures show.
        title = f"Use batch size {pick} or less{now}"
        detail += "; `%find_batch` measures the exact size"
    return Suggestion(title, detail, "batch_size", batch_size=pick)


_ACCUMULATION_CODE: Final = """\
for i, (x, y) in enumerate(loader):  # DataLoader(..., batch_size={micro})
    loss = loss_fn(model(x), y) / {k}
    loss.backward()
    if (i + 1) % {k} == 0:
        optimizer.step()
        optimizer.zero_grad()"""


def _accumulation_suggestion(ctx: AdviceContext, fits: int, torch_code: bool) -> Suggestion | None:
    """Keep the effective batch: micro-batches that fit, gradients accumulated over k steps."""
    effective = ctx.effective_batch_size
    if effective is None and ctx.batch_size is not None:
        effective = ctx.batch_size * (ctx.accumulation_steps or 1)
    if effective is None or fits < 1 or fits >= effective:
        return None
    micro, k = accumulation_plan(effective, fits)
    return Suggestion(
        f"Keep the effective batch {effective} with micro-batch {micro} × {k} accumulation steps",
        lr_note(effective, micro * k, ctx.optimizer),
        "accumulation",
        batch_size=micro,
        accumulation_steps=k,
        code=_ACCUMULATION_CODE.format(micro=micro, k=k) if torch_code else None,
    )


_Proc = tuple[int | None, int, str | None]


def _others(info: OOMInfo | None, ctx: AdviceContext) -> tuple[list[_Proc], str]:
    """Memory other processes hold: the ones named (NVML, else the message), else the gap the figures leave."""
    if ctx.processes:
        return list(ctx.processes), ""
    if info is None:
        return [], ""
    procs: list[_Proc] = [(pid, n, None) for pid, n in info.processes]
    note = ""
    if procs and info.process_in_use is None and info.allocated_by_pytorch is not None:
        # Inside a container NVML lists this process under its host pid, and the message has no
        # "this process" line: a process holding at least what PyTorch allocated is most likely it.
        mine = [p for p in procs if p[1] >= info.allocated_by_pytorch]
        if len(mine) == 1:
            procs.remove(mine[0])
            note = (
                f"process {mine[0][0]} ({format_bytes(mine[0][1])}) holds at least what PyTorch allocated, "
                "so it is most likely this process seen from outside a container"
            )
    if procs:
        return procs, note
    total, free = info.total_capacity, info.free
    if total is None or free is None:
        return [], note
    # Nothing named: the figures still show memory held outside this process, or outside PyTorch.
    if info.process_in_use is not None:
        gap = total - free - info.process_in_use
        if gap > max(512 * MiB, total // 20):
            why = "outside this process (total − free − this process): other programs, other notebooks' kernels"
            return [(None, gap, why)], note
    elif info.allocated_by_pytorch is not None:
        gap = total - free - info.allocated_by_pytorch - (info.reserved_unallocated or 0)
        if gap > max(GiB, total // 10):
            pool = ", memory the cudaMallocAsync pool keeps cached" if info.kind == "cuda_malloc_async" else ""
            why = (
                "outside PyTorch's memory (total − free − what PyTorch holds): other processes, this process's "
                f"CUDA context and libraries{pool}"
            )
            return [(None, gap, why)], note
    return [], note


_NVIDIA_SMI: Final = "!nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv"


def _process_suggestion(
    info: OOMInfo | None, ctx: AdviceContext, shortfall: int | None
) -> tuple[Suggestion | None, int]:
    procs, note = _others(info, ctx)
    if not procs:
        return None, 0
    fb = format_bytes
    total = sum(n for _, n, _ in procs)
    if procs[0][0] is None:
        title = f"{fb(total)} is in use elsewhere"
        detail = f"held {procs[0][2]}"
    else:
        ranked = sorted(procs, key=lambda p: -p[1])
        named = ", ".join(f"{pid}" + (f" ({name})" if name else "") + f": {fb(n)}" for pid, n, name in ranked[:5])
        more = f", and {len(ranked) - 5} more" if len(ranked) > 5 else ""
        title = f"Other processes hold {fb(total)}"
        detail = f"process {named}{more}; stop the ones you do not need (another notebook: shut its kernel down)"
    if note:
        detail += f"; {note}"
    helps = shortfall is not None and 0 < shortfall <= total
    if helps and shortfall is not None:
        detail += f"; the allocation was short by {fb(shortfall)}"
    return Suggestion(title, detail, "other_processes", code=_NVIDIA_SMI), 85 if helps else 45


def _limit_suggestion(info: OOMInfo | None, f: _Facts) -> tuple[Suggestion | None, int]:
    """A memory fraction (CUDA, HIP, XPU) or the MPS high watermark that stopped the allocation."""
    if info is None or info.max_allowed is None:
        return None, 0
    fb = format_bytes
    limit = info.max_allowed
    if info.kind == "mps":
        used = (info.mps_allocated or 0) + (info.other_allocations or 0) + (info.tried_to_allocate or 0)
        factor = ", at the limit" if used >= 0.99 * limit else ""  # printed figures are rounded
        if used > limit > 0:
            factor = ", just over it" if used < 1.01 * limit else f", {used / limit:.2f}× it: raise the ratio by that"
        detail = (
            f"MPS refuses allocations past its high watermark, {fb(limit)}; this one needed {fb(used)}{factor}. "
            "Set PYTORCH_MPS_HIGH_WATERMARK_RATIO before torch first uses mps (restart the kernel); "
            "0.0 removes the limit, and macOS may then swap or freeze"
        )
        code = "%env PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0"
        return Suggestion("Raise the MPS memory limit", detail, "limit", code=code), 65
    total = info.total_capacity
    if total is None or limit >= total:
        return None, 0
    fraction = limit / total
    mod = "xpu" if info.device_type == "xpu" else "cuda"
    detail = f"a memory fraction of {fraction:.2f} caps PyTorch at {fb(limit)} of {fb(total)}"
    code = f"torch.{mod}.set_per_process_memory_fraction(1.0)"
    if f.needed is not None and f.needed / total > fraction:
        target = min(1.0, f.needed / total + 0.005)
        detail += f"; {fb(f.needed)} needs at least {target:.2f}"
        code = f"torch.{mod}.set_per_process_memory_fraction({target:.2f})"
    binding = info.allocated_by_pytorch is None or info.free is None or limit < info.allocated_by_pytorch + info.free
    return Suggestion(f"Raise the memory fraction ({fraction:.2f} now)", detail, "limit", code=code), (
        100 if binding else 40
    )


def _fragmentation_suggestion(info: OOMInfo | None) -> tuple[Suggestion | None, int]:
    """Reserved-but-unallocated memory the caching allocator could not hand out as one block."""
    if info is None or info.device_type not in ("cuda", "hip") or info.kind == "cuda_malloc_async":
        return None, 0
    unalloc, reserved = info.reserved_unallocated, info.reserved_total
    if unalloc is None or reserved is None or not (unalloc > 0.2 * reserved or unalloc > GiB):
        return None, 0
    fb = format_bytes
    var = "PYTORCH_HIP_ALLOC_CONF" if info.device_type == "hip" else "PYTORCH_CUDA_ALLOC_CONF"
    strong = info.tried_to_allocate is not None and unalloc >= info.tried_to_allocate
    than = f", more than the {fb(info.tried_to_allocate)} requested" if strong and info.tried_to_allocate else ""
    detail = (
        f"{fb(unalloc)} of the {fb(reserved)} PyTorch reserved is cached but unallocated{than}; expandable "
        f"segments grow blocks instead of splitting them. {var} must be set before CUDA starts: restart the kernel"
    )
    code = f'import os\nos.environ["{var}"] = "expandable_segments:True"  # first cell, before importing torch'
    return Suggestion("Avoid fragmentation with expandable segments", detail, "fragmentation", code=code), (
        90 if strong else 40
    )


def _holders_suggestion(
    info: OOMInfo | None, ctx: AdviceContext, shortfall: int | None
) -> tuple[Suggestion | None, int]:
    """Memory held by names from earlier cells (or before the cell, when no names are known)."""
    fb = format_bytes
    held = sorted(ctx.holders, key=lambda h: -h[1])
    if not held and not ctx.baseline_bytes:
        return None, 0
    if held:
        top = held[:5]
        total = sum(n for _, n in held)
        more = f", and {len(held) - 5} more" if len(held) > 5 else ""
        title = f"Free memory held by notebook variables ({fb(total)})"
        detail = ", ".join(f"{name}: {fb(n)}" for name, n in top) + more + "; delete the ones you no longer need"
        lines = [f"del {', '.join(name for name, _ in top)}  # keep what you still need", "import gc; gc.collect()"]
        device_type = None if info is None or info.simulated else info.device_type
        if device_type in ("cuda", "hip"):
            lines.append("torch.cuda.empty_cache()")
        elif device_type in ("mps", "xpu"):
            lines.append(f"torch.{device_type}.empty_cache()")
        code = "\n".join(lines)
    else:
        total = ctx.baseline_bytes or 0
        title = f"Free memory held before this cell ({fb(total)})"
        detail = "models and data from earlier cells; `%gpumem --free` collects garbage and shows which names hold it"
        code = "%gpumem --free"
    helps = shortfall is not None and 0 < shortfall <= total
    if helps and shortfall is not None:
        detail += f"; the allocation was short by {fb(shortfall)}"
    return Suggestion(title, detail, "holders", code=code), 80 if helps else 50


def _precision_suggestions(
    info: OOMInfo | None, ctx: AdviceContext, unknown: list[str], torch_code: bool
) -> list[Suggestion]:
    """Autocast and activation checkpointing, with the saving when the activation size is known."""
    fb = format_bytes
    device_type = "cuda" if info is None or info.device_type in (None, "hip") else info.device_type
    act = ctx.activation_bytes
    if not act:
        unknown.append("the size of the activations (so the saving from autocast or checkpointing)")
    out = []
    if ctx.mixed_precision is not True:
        saving = f"about {fb(act // 2)}" if act else "about half of the activations (their size is unknown)"
        out.append(
            Suggestion(
                "Use mixed precision (autocast)" if torch_code else "Use mixed precision",
                f"16-bit activations save {saving}; bfloat16 where the hardware has it, float16 with a GradScaler",
                "mixed_precision",
                code=(
                    f'with torch.autocast(device_type="{device_type}", dtype=torch.bfloat16):\n'
                    "    loss = loss_fn(model(x), y)\nloss.backward()"
                    if torch_code
                    else None
                ),
            )
        )
    saving = f"most of the {fb(act)} of activations" if act else "an unknown part of the activations"
    out.append(
        Suggestion(
            "Checkpoint activations",
            f"recompute them in backward instead of keeping them: saves {saving}, for about 30% more compute",
            "checkpointing",
            code=(
                "from torch.utils.checkpoint import checkpoint\nh = checkpoint(block, h, use_reentrant=False)"
                if torch_code
                else None
            ),
        )
    )
    return out


def _generic_batch_suggestion(ctx: AdviceContext) -> Suggestion:
    now = f" (now {ctx.batch_size})" if ctx.batch_size is not None else ""
    return Suggestion(
        f"Use a smaller batch size{now}",
        "the figures to compute one are missing; `%find_batch` measures the largest that fits",
        "batch_size",
    )


def _cuda_error_suggestion(info: OOMInfo | None) -> Suggestion | None:
    """Errors from CUDA or its libraries, not from PyTorch's allocator, state no figures."""
    if info is None or info.kind not in _NO_FIGURES:
        return None
    who = {"cublas": "cuBLAS could not allocate its workspace", "cudnn": "cuDNN could not allocate its workspace"}
    detail = who.get(info.kind, "CUDA itself could not allocate (context, library or kernel memory)")
    detail += ", outside PyTorch's caching allocator: the GPU was already full, often because of another process"
    code = _NVIDIA_SMI
    if info.kind == "cudnn":
        detail += "; cudnn.benchmark tries workspace-hungry algorithms"
        code += "\ntorch.backends.cudnn.benchmark = False"
    return Suggestion("See what fills the GPU", detail, "cuda_error", code=code)


def _host_suggestion(info: OOMInfo | None) -> Suggestion:
    tried = info.tried_to_allocate if info is not None else None
    what = f"{format_bytes(tried)} could not be allocated in RAM" if tried else "RAM ran out"
    return Suggestion(
        "Use less host memory",
        f"{what}: load data lazily or memory-mapped, use fewer DataLoader workers (each holds a copy of the "
        "dataset object and its prefetched batches) and pin_memory=False",
        "host_memory",
        code="DataLoader(dataset, batch_size=..., num_workers=2, pin_memory=False)",
    )


def advise(info: OOMInfo | None, context: AdviceContext | None = None) -> Advice:
    """Ranked suggestions for an out-of-memory error, each with numbers derived from what is known.

    >>> info = parse("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 8.00 GiB "
    ...              "of which 1.00 GiB is free. Of the allocated memory 6.00 GiB is allocated by PyTorch, "
    ...              "and 0 bytes is reserved by PyTorch but unallocated.")
    >>> advise(info, AdviceContext(batch_size=64)).fits_batch_size
    32
    """
    ctx = context or AdviceContext()
    unknown: list[str] = []
    f = _facts(info, ctx)
    shortfall = None
    if info is not None and info.tried_to_allocate is not None and info.free is not None:
        shortfall = info.tried_to_allocate - info.free
    elif f.needed is not None and f.usable is not None:
        shortfall = f.needed - f.usable

    # (score, suggestion): a suggestion that alone covers the shortfall ranks first.
    ranked: list[tuple[int, Suggestion]] = []
    torch_code = info is None or info.kind in _TORCH_KINDS
    batch = _batch_suggestion(ctx, f, unknown)
    fits = batch.batch_size if batch is not None else None
    if batch is not None:
        ranked.append((70, batch))
    elif not (f.needed is not None and f.usable is not None and f.needed <= f.usable * _MARGIN):
        ranked.append((55, _generic_batch_suggestion(ctx)))
    if fits is not None:
        acc = _accumulation_suggestion(ctx, fits, torch_code)
        if acc is not None:
            ranked.append((69, acc))
    cuda_error = _cuda_error_suggestion(info)
    if cuda_error is not None:
        ranked.append((60, cuda_error))
    for s, score in (
        _limit_suggestion(info, f),
        _fragmentation_suggestion(info),
        _process_suggestion(info, ctx, shortfall),
        _holders_suggestion(info, ctx, shortfall),
    ):
        if s is not None:
            ranked.append((score, s))
    if _is_host(info):
        ranked.append((60, _host_suggestion(info)))
    else:
        ranked.extend(zip((30, 20), _precision_suggestions(info, ctx, unknown, torch_code), strict=False))
    ranked.sort(key=lambda item: -item[0])  # stable: equal scores keep the order above
    return Advice(
        headline=_headline(info),
        suggestions=tuple(s for _, s in ranked),
        unknown=tuple(dict.fromkeys(unknown)),
        fits_batch_size=fits,
        info=info,
    )

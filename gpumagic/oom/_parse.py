"""Reading out-of-memory messages: every figure the message states, as int bytes.

Only the standard library and gpumagic's private modules are imported: no torch needed.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any, Final

from gpumagic._units import format_bytes

__all__ = ["FIGURES", "OOMInfo", "parse"]

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


_HOST_KINDS: Final = frozenset({"cpu_allocator", "numpy", "python_memory_error"})


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

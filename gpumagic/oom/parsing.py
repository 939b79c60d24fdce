"""Reading out-of-memory messages: every figure the message states, as int bytes.

A message is found by its anchor and read by its reader: ``_FORMATS`` lists one ``_Format``
(name, anchor pattern, reader) per wording, and supporting a new wording is one entry there (plus
its reader when none fits). Every anchor does bounded work wherever it is tried, so parsing time
is linear in the length of the text (``bench/parse_time.py``). Only the standard library and
:mod:`gpumagic.units` are imported: no torch needed.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any, Final, Literal

from gpumagic.units import format_bytes, unit_bytes

__all__ = ["FIGURES", "OOMInfo", "OOMKind", "parse"]

GiB: Final = 2**30
MiB: Final = 2**20
# A limit printed this large means "no limit": PyTorch prints SIZE_MAX (2**64) as
# "17179869184.00 GiB" or "16.00 EiB" when no memory fraction is set. No device holds 8 EiB.
_UNKNOWN_FROM: Final = 2**63

# ---------------------------------------------------------------------------------------------
# OOMInfo
# ---------------------------------------------------------------------------------------------

# The wordings a message can have; ``OOMInfo.kind`` is one of them.
OOMKind = Literal[
    "cuda_caching_allocator",  # PyTorch 1.x's parenthesised message (also HIP and XPU)
    "cuda_sentence",  # PyTorch 2.1+: "GPU 0 has a total capacity of ... of which ... is free."
    "cuda_malloc_async",  # the cudaMallocAsync backend's table
    "cuda_error",  # CUDA's own error 2, from any runtime: no figures
    "cublas",  # CUBLAS_STATUS_ALLOC_FAILED: no figures
    "cudnn",  # CUDNN_STATUS_ALLOC_FAILED: no figures
    "cuda_library",  # cuSOLVER, cuSPARSE, cuFFT allocation failures: no figures
    "xpu_allocation_limit",  # Intel XPU's refusal of one block over 4 GB
    "mps",  # Apple's MPS allocator
    "cpu_allocator",  # PyTorch's CPU allocator
    "numpy",  # numpy's "Unable to allocate ... array with shape"
    "python_memory_error",  # a bare MemoryError
    "xla_resource_exhausted",  # XLA (JAX, TensorFlow, torch_xla) at run time
    "xla_tpu_compile",  # a TPU program that does not fit, found when compiling
    "tensorflow",  # TensorFlow's own allocators
    "onnxruntime_arena",  # ONNX Runtime's BFC arena, on the session's device
    "ggml_backend",  # ggml (llama.cpp, ollama): a backend buffer it could not allocate
    "out_of_memory_error",  # only the exception class says it
    "linux_oom_killer",  # the Linux kernel killed a process for memory (dmesg, syslog)
    "colab_session_ram",  # Colab: "Your session crashed after using all available RAM"
    "kaggle_notebook_ram",  # Kaggle: "Your notebook tried to allocate more memory than is available"
    "errno_enomem",  # errno 12 (ENOMEM) in any locale: "[Errno 12] Cannot allocate memory"
    "windows_paging_file",  # Windows error 1455: "The paging file is too small ..."
    "pinned_host",  # CUDA's page-locked host allocation (TensorFlow, JAX): host memory
    "nccl",  # NCCL's own device allocations
    "vllm_startup_memory",  # vLLM: free device memory below gpu_memory_utilization at start-up
    "vllm_kv_cache",  # vLLM: the KV cache cannot hold one sequence of max_model_len
    "tgi_warmup",  # text-generation-inference: warm-up prefill does not fit
    "model_system_memory",  # a model server (ollama): the model needs more RAM than is available
]

# Who reported the failure: the framework's allocator, the operating system or platform, a
# library under the framework, or a serving engine's capacity check.
Family = Literal["framework", "system", "library", "serving"]
_FAMILY: Final[dict[str, Family]] = {
    "linux_oom_killer": "system", "colab_session_ram": "system", "kaggle_notebook_ram": "system",
    "errno_enomem": "system",
    "windows_paging_file": "system", "python_memory_error": "system",
    "cuda_error": "library", "cublas": "library", "cudnn": "library", "cuda_library": "library",
    "pinned_host": "library", "nccl": "library",
    "vllm_startup_memory": "serving", "vllm_kv_cache": "serving", "tgi_warmup": "serving",
    "model_system_memory": "serving",
}  # fmt: skip
# Kinds that always mean host memory (RAM), whatever device the program uses.
_HOST_KINDS: Final = frozenset(
    {
        "cpu_allocator", "numpy", "python_memory_error", "linux_oom_killer", "colab_session_ram",
        "kaggle_notebook_ram", "errno_enomem", "windows_paging_file", "pinned_host", "model_system_memory",
    }
)  # fmt: skip

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

    ``kind`` names the wording (:data:`OOMKind`).
    ``device_type`` is "cuda", "hip", "xpu", "mps", "cpu", "gpu" (TensorFlow), "xla", "tpu", or
    ``None``; ``simulated`` marks gpumagic's own budget on cpu.

    ``reserved_unallocated`` is memory PyTorch reserved but has not handed out ("cached" in old
    messages); ``reserved_total`` is all it reserved. When a message gives two of
    *allocated*, *reserved but unallocated* and *reserved in total*, the third is derived.
    ``max_allowed`` is a memory-fraction limit or the MPS high watermark. ``processes`` are the
    other processes the message names, as ``(pid, bytes)``. ``required_total`` is what a
    compiled XLA program needs ("Used X of Y hbm"), or what a model server says a model needs.
    ``message`` is the error as found.

    ``pid`` and ``process_name`` name the process the message is about (the one the Linux OOM
    killer killed; ``process_in_use`` is then its resident memory, anon + file + shmem).
    Serving engines state token counts, not bytes: ``max_model_len`` (the sequence length the
    engine was asked to hold), ``model_len_fits`` (the length its memory holds) and
    ``prefill_tokens`` (the warm-up prefill that did not fit).
    """

    kind: OOMKind
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
    pid: int | None = None
    process_name: str | None = None
    max_model_len: int | None = None
    model_len_fits: int | None = None
    prefill_tokens: int | None = None

    @property
    def memory(self) -> Literal["host", "device"]:
        """Which memory ran out: ``"host"`` (RAM) or ``"device"`` (an accelerator's, or a simulated one)."""
        return "host" if _is_host(self) else "device"

    @property
    def family(self) -> Family:
        """Who reported it: ``"framework"``, ``"system"`` (OS, platform), ``"library"`` or ``"serving"``."""
        return _FAMILY.get(self.kind, "framework")

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
# "21.95G" (XLA), "18.09 GB" (MPS, binary despite the name). Digit runs are bounded and must
# start a number, so a pattern tried at every position of a long run of digits fails at once:
# every search below stays linear in the length of the text.
_SZ: Final = r"(?<![\d.])\d{1,24}(?:\.\d{0,24})?\s?(?:bytes?|[KMGTPE]i?B|B|[KMGTPE](?![A-Za-z]))"
_NUM_UNIT: Final = re.compile(r"(\d+(?:\.\d*)?)\s?([A-Za-z]*)")


def _bytes(text: str | None) -> int | None:
    """``"1.50 GiB"`` -> 1610612736: printed value times its (binary) unit, rounded half up.

    Every allocator message that prints "GB"/"MB"/"G" means powers of 1024 (MPS, XLA). Values
    are kept as printed, also absurd ones: "16.00 EiB" is an unsigned underflow in PyTorch's
    report and says so; only a limit printed as SIZE_MAX means "no limit" (see ``_limit``).
    """
    if text is None:
        return None
    m = _NUM_UNIT.fullmatch(text.strip())
    scale = None if m is None else unit_bytes(m.group(2), si_decimal=False)
    if m is None or scale is None:
        return None
    try:
        value = Decimal(m.group(1)) * scale
    except InvalidOperation:
        return None
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _limit(text: str | None) -> int | None:
    """A memory limit: PyTorch prints SIZE_MAX ("17179869184.00 GiB", "16.00 EiB") when none is set."""
    n = _bytes(text)
    return None if n is None or n >= _UNKNOWN_FROM else n


# ---------------------------------------------------------------------------------------------
# Text normalisation
# ---------------------------------------------------------------------------------------------

_ANSI: Final = re.compile(r"\x1b\[[0-9;?]{0,32}[A-Za-z]")
# Leading whitespace, quote/comment markers ("> " in issues, "# " in code comments) and the
# left border of a rich traceback box, on every line.
_LEAD: Final = re.compile(r"^[ \t#>\u2502\u2503]+", re.MULTILINE)
# What log frameworks put at the right of a line: rich's "file.py:123" column (after as little as
# one blank: "... GPU 0 has train.py:21") and a traceback box's border. Matched in the reversed
# text, where they open a line: a pattern anchored at a line start is tried once per line, not at
# every position.
_TRAIL_REVERSED: Final = re.compile(
    r"^[ \t]*(?:[\u2502\u2503]|\d{1,6}:yp\.[\w.<>-]{1,80}(?=[ \t]))[ \t]*", re.MULTILINE
)
# A terminal's wrap matters for the message a log ends with: undo it over this much of the end.
_HARD_WRAP_TAIL: Final = 64 * 1024


def _variants(raw: str) -> list[str]:
    """The text as one line, plus a version that undoes a terminal's hard wrap if it has one.

    A terminal wraps at a fixed width, mid-word or mid-number ("20.0" / "0 MiB"): lines of
    exactly that width are joined to the next without a space, over the text's last 64 KiB
    (where the message a log ends with is). Both versions are parsed and the one that yields
    more figures wins. Regular expressions run over the whole text, never once per line, so a
    text of a million short lines costs what one long line does. Log columns go first: rich's
    box borders and "file.py:123" at the right of a line, quote and comment markers at the left.
    """
    raw = _ANSI.sub("", raw).replace("\r\n", "\n").replace("\r", "\n")
    if "\u2502" in raw or "\u2503" in raw or ".py:" in raw:
        raw = _TRAIL_REVERSED.sub("", raw[::-1])[::-1]
    soft = " ".join(_LEAD.sub("", raw).split())
    out = [soft]
    lines = raw[-_HARD_WRAP_TAIL:].split("\n")
    widths = Counter(n for n in map(len, lines) if n >= 20)
    if widths:
        width, count = widths.most_common(1)[0]
        if count >= 2:
            parts: list[str] = []
            wrapped = False
            for line in lines:
                parts.append(line if wrapped else " " + _LEAD.sub("", line, count=1))
                wrapped = len(line) == width
            hard = " ".join("".join(parts).split())
            if hard != soft:
                out.append(hard)
    return out


# ---------------------------------------------------------------------------------------------
# Readers, one per wording: (window, anchor match) -> (fields, where the message ends)
# ---------------------------------------------------------------------------------------------

_DEV_WORD: Final = {"CUDA": "cuda", "HIP": "hip", "XPU": "xpu", "MTIA": "mtia", "NPU": "npu", "GPU": "cuda"}
_Values = dict[str, Any]


class _Fields:
    """Collects figures and remembers where the last one ended (the end of the message)."""

    def __init__(self, window: str, start: int) -> None:
        self.window = window
        self.end = start
        self.values: _Values = {}

    def find(
        self,
        pattern: str,
        name: str | None = None,
        *,
        pos: int = 0,
        end: int | None = None,
        read: Callable[[str | None], int | None] = _bytes,
    ) -> re.Match[str] | None:
        m = re.compile(pattern).search(self.window, pos, len(self.window) if end is None else end)
        if m is not None:
            self.end = max(self.end, m.end())
            if name is not None:
                self.values[name] = read(m.group(1))
        return m


def _read_allocator(window: str, m: re.Match[str], *, kind: OOMKind | None = None) -> tuple[_Values, int]:
    """The caching allocator's messages (CUDA, HIP, XPU), old parenthesised or 2.1+ sentences.

    Also reads them cut at the start: from "Tried to allocate X (GPU 0; ..." or from
    "GPU 0 has a total capacity of ...", where the device word of the figures names the device.
    """
    dev = m.groupdict().get("dev")
    f = _Fields(window, m.end())
    if dev:
        f.values["device_type"] = _DEV_WORD.get(dev, "cuda")
    tried = f.find(rf"Tried to allocate ({_SZ})", "tried_to_allocate", pos=m.start())
    after = tried.end() if tried else m.end()
    old = re.compile(r"\s*\(\s*(GPU|XPU|NPU)\s*(\d{1,4})\s*;").match(window, after)
    if old is not None:
        f.values.setdefault("device_type", _DEV_WORD[old.group(1)])
        f.values["kind"] = kind or "cuda_caching_allocator"
        f.values["device_index"] = int(old.group(2))
        f.end = max(f.end, old.end())
        _read_parenthesised(f, old.end())
        return f.values, f.end
    # The figures end where the advice about fragmentation or empty_cache begins.
    tail = re.compile(r"If reserved but unallocated memory|Please use `empty_cache`").search(window, after)
    f.window = window[: tail.start()] if tail is not None else window
    # Cut before its head, the message may start at "GPU 0 has a total capacity": the anchor itself.
    scan = tried.end() if tried else m.start()
    sentence = f.find(r"(GPU|XPU|device)\s*(\d{1,4}) has a total capac\w{0,8} of", pos=scan)
    f.values["kind"] = kind or ("cuda_sentence" if sentence else "cuda_caching_allocator")
    if sentence is not None:
        f.values.setdefault("device_type", _DEV_WORD.get(sentence.group(1), "cuda"))
        f.values["device_index"] = int(sentence.group(2))
        f.find(rf"has a total capac\w{{0,8}} of ({_SZ})", "total_capacity", pos=scan)
    f.values.setdefault("device_type", "cuda")
    f.find(rf"of which ({_SZ}) is free", "free", pos=after)
    processes = []
    for p in re.finditer(rf"Process (\d{{1,10}}) has ({_SZ}) memory", f.window[after:]):
        size = _bytes(p.group(2))
        if size is not None:
            processes.append((int(p.group(1)), size))
        f.end = max(f.end, after + p.end())
    f.values["processes"] = tuple(processes)
    f.find(rf"this process has ({_SZ}) memory", "process_in_use", pos=after)
    f.find(rf"({_SZ}) allowed;", "max_allowed", pos=after, read=_limit)
    f.find(rf"Of the allocated memory ({_SZ}) is allocated by PyTorch", "allocated_by_pytorch", pos=after)
    f.find(rf"with ({_SZ}) allocated in private pools", "private_pools", pos=after)
    f.find(rf"({_SZ}) is reserved by PyTorch but unallocated", "reserved_unallocated", pos=after)
    sim = f.find(rf"\(simulated by gpumagic: (\w+) with a ({_SZ}) budget\)", pos=after)
    if sim is not None:
        f.values.update(simulated=True, device_type=sim.group(1), device_index=None)
    return f.values, f.end


def _read_parenthesised(f: _Fields, block: int) -> None:
    """The figures of PyTorch 1.x's message: inside its parentheses (or up to where it was cut)."""
    close = f.window.find(")", block)
    close = len(f.window) if close == -1 else close
    f.find(rf"({_SZ}) total capacity", "total_capacity", pos=block, end=close)
    f.find(rf"({_SZ}) already allocated", "allocated_by_pytorch", pos=block, end=close)
    f.find(rf"({_SZ}) free\b", "free", pos=block, end=close)
    f.find(rf"({_SZ}) allowed;", "max_allowed", pos=block, end=close, read=_limit)
    f.find(rf"({_SZ}) cached\b", "reserved_unallocated", pos=block, end=close)
    f.find(rf"({_SZ}) reserved in total by Py[Tt]orch", "reserved_total", pos=block, end=close)


def _read_parenthesised_tail(window: str, m: re.Match[str]) -> tuple[_Values, int]:
    """PyTorch 1.x's message cut inside its parentheses: "1.17 GiB reserved in total by PyTorch)"."""
    f = _Fields(window, m.end())
    f.values.update(kind="cuda_caching_allocator", device_type="cuda")
    _read_parenthesised(f, m.start())
    return f.values, f.end


def _read_block_limit(window: str, m: re.Match[str]) -> tuple[_Values, int]:
    """Intel's XPU refusal of one block over 4 GB, followed by the caching allocator's figures."""
    values, end = _read_allocator(window, m, kind="xpu_allocation_limit")
    values["device_type"] = "xpu"
    return values, end


def _read_async(window: str, m: re.Match[str]) -> tuple[_Values, int]:
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
    f.find(
        rf"PyTorch limit \(set by user-supplied memory fraction\)\s*:\s*({_SZ})",
        "max_allowed",
        pos=m.end(),
        read=_limit,
    )
    return f.values, f.end


def _read_mps(window: str, m: re.Match[str]) -> tuple[_Values, int]:
    """The MPS allocator: "(MPS allocated: X, other allocations: Y, max allowed: Z). Tried to allocate W"."""
    f = _Fields(window, m.end())
    f.values.update(kind="mps", device_type="mps")
    f.find(rf"MPS allocated:\s*({_SZ})", "mps_allocated", pos=m.end())
    f.find(rf"other allocations:\s*({_SZ})", "other_allocations", pos=m.end())
    f.find(rf"max allowed:\s*({_SZ})", "max_allowed", pos=m.end(), read=_limit)
    # From the opening, or from "Tried to allocate" when the message was cut before it.
    f.find(rf"Tried to allocate ({_SZ})(?: on (?:private|shared) pool)?", "tried_to_allocate", pos=m.start())
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


def _tf_device(on: str | None, allocator: str | None) -> _Values:
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
    return None if text is None else int(text)


def _read_cpu(window: str, m: re.Match[str]) -> tuple[_Values, int]:
    return {"kind": "cpu_allocator", "device_type": "cpu", "tried_to_allocate": _int(m.group("n"))}, m.end()


def _read_numpy(window: str, m: re.Match[str]) -> tuple[_Values, int]:
    size = _shape_bytes(m.group("shape"), m.group("dtype"))
    tried = size if size is not None else _bytes(m.group("size"))
    return {"kind": "numpy", "device_type": "cpu", "tried_to_allocate": tried}, m.end()


def _read_xla(window: str, m: re.Match[str]) -> tuple[_Values, int]:
    """XLA (JAX, TensorFlow): "Out of memory while trying to allocate N bytes" or "Failed to allocate
    request for 2.99GiB (3206250496B) on device ordinal 0": the exact byte count wins."""
    values: _Values = {"kind": "xla_resource_exhausted", "device_type": "xla"}
    n = m.group("n") or m.group("n2") or m.group("b")
    values["tried_to_allocate"] = _int(n) if n is not None else _bytes(m.group("size"))
    if m.group("ordinal") is not None:
        values["device_index"] = int(m.group("ordinal"))
    return values, m.end()


def _read_xla_compile(window: str, m: re.Match[str]) -> tuple[_Values, int]:
    values: _Values = {"kind": "xla_tpu_compile", "device_type": "tpu"}
    if m.group("space").lower() == "hbm":
        values.update(total_capacity=_bytes(m.group("cap")), required_total=_bytes(m.group("used")))
    return values, m.end()


def _read_tf_tensor(window: str, m: re.Match[str]) -> tuple[_Values, int]:
    values: _Values = {"kind": "tensorflow", "tried_to_allocate": _shape_bytes(m.group("shape"), m.group("dtype"))}
    return {**values, **_tf_device(m.group("on"), m.group("alloc"))}, m.end()


def _read_tf_bfc(window: str, m: re.Match[str]) -> tuple[_Values, int]:
    values: _Values = {"kind": "tensorflow", "tried_to_allocate": _bytes(m.group("size"))}
    return {**values, **_tf_device(None, m.groupdict().get("alloc"))}, m.end()


def _read_tf_device(window: str, m: re.Match[str]) -> tuple[_Values, int]:
    return {"kind": "tensorflow", "device_type": "gpu", "tried_to_allocate": _int(m.group("n"))}, m.end()


def _read_cuda_error(window: str, m: re.Match[str]) -> tuple[_Values, int]:
    hip = "hip" in m.group(0).lower()
    values: _Values = {"kind": "cuda_error", "device_type": "hip" if hip else "cuda"}
    # ONNX Runtime and CNTK name the device ("CUDA failure 2: out of memory ; GPU=0 ; hostname=..."),
    # llama.cpp on the next line ("CUDA error 2 at ggml-cuda.cu:5509: out of memory current device: 0").
    gpu = re.compile(r" ?(?:; ?GPU=|current device: )(\d{1,4})").match(window, m.end())
    if gpu is not None:
        values["device_index"] = int(gpu.group(1))
    return values, m.end()


def _read_ggml(window: str, m: re.Match[str]) -> tuple[_Values, int]:
    values: _Values = {"kind": "ggml_backend", "tried_to_allocate": int(m.group("n"))}
    values.update(device_type=_DEV_WORD.get(m.group("dev"), m.group("dev").lower()), device_index=int(m.group("idx")))
    return values, m.end()


def _read_onnxruntime_arena(window: str, m: re.Match[str]) -> tuple[_Values, int]:
    """ONNX Runtime's arena (on whichever device the session runs): the request, and what was available."""
    values: _Values = {"kind": "onnxruntime_arena", "tried_to_allocate": int(m.group("n") or m.group("req"))}
    if m.group("avail") is not None:
        values["free"] = int(m.group("avail"))
    return values, m.end()


# --- the operating system and platform: host memory ---------------------------------------------


def _kb(text: str | None) -> int | None:
    """A kernel figure in kB ("15370088", or with stray thousands commas "153,700,88")."""
    return None if text is None else int(text.replace(",", "")) * 1024


def _read_oom_killer(window: str, m: re.Match[str]) -> tuple[_Values, int]:
    """The Linux OOM killer's line: the process it killed and, when printed, its resident memory."""
    values: _Values = {"kind": "linux_oom_killer", "device_type": "cpu", "pid": int(m.group("pid"))}
    values["process_name"] = m.group("name").strip()  # a line wrapped inside the parentheses adds a blank
    parts = [_kb(m.group(g)) for g in ("anon", "file", "shmem")]
    if m.group("anon") is not None:
        values["process_in_use"] = sum(n for n in parts if n is not None)
    return values, m.end()


def _read_model_system_memory(window: str, m: re.Match[str]) -> tuple[_Values, int]:
    """A model server's RAM check: "model requires more system memory (X) than is available (Y)"."""
    values: _Values = {"kind": "model_system_memory", "device_type": "cpu"}
    values.update(required_total=_bytes(m.group("need")), free=_bytes(m.group("avail")))
    return values, m.end()


# --- accelerators' runtimes and libraries ---------------------------------------------------------


def _read_tpu_runtime(window: str, m: re.Match[str]) -> tuple[_Values, int]:
    """The TPU runtime: "Attempting to allocate|reserve X. That was not possible. There are Y free."
    or "Could not allocate N bytes in memory ..._HBM0; A bytes allocatable, F bytes available"."""
    values: _Values = {"kind": "xla_resource_exhausted", "device_type": "tpu"}
    if m.group("n") is not None:
        values.update(tried_to_allocate=int(m.group("n")), free=int(m.group("avail")))
    else:
        values.update(tried_to_allocate=_bytes(m.group("size")), free=_bytes(m.group("free")))
    return values, m.end()


def _read_pinned_host(window: str, m: re.Match[str]) -> tuple[_Values, int]:
    """CUDA's page-locked host allocation failing: host memory, whatever the message's CUDA_ERROR says."""
    return {"kind": "pinned_host", "device_type": "cpu", "tried_to_allocate": int(m.group("n"))}, m.end()


def _read_ctx_retain(window: str, m: re.Match[str]) -> tuple[_Values, int]:
    """A CUDA context that could not be created at start-up (TensorFlow, JAX, numba), with the
    device's total when the runtime reports it: a total of 2**63 or more is the driver's failed
    query printed unsigned (18446744073709551615), not a size."""
    values: _Values = {"kind": "cuda_error", "device_type": "cuda", "total_capacity": _limit(m.group("total"))}
    if m.group("ordinal") is not None:
        values["device_index"] = int(m.group("ordinal"))
    return values, m.end()


# NCCL's log prefix "host:pid:tid [dev] file.cc:123 " names the local CUDA device in brackets.
_NCCL_DEVICE: Final = re.compile(r"\[(\d{1,3})\] (?:[\w/.-]{1,80}:\d{1,6} )?$")


def _read_nccl(window: str, m: re.Match[str]) -> tuple[_Values, int]:
    values: _Values = {"kind": "nccl", "device_type": "cuda"}
    if m.group("n") is not None:
        values["tried_to_allocate"] = int(m.group("n"))
    dev = _NCCL_DEVICE.search(window, max(0, m.start() - 120), m.start())
    if dev is not None:
        values["device_index"] = int(dev.group(1))
    return values, m.end()


def _library(kind: OOMKind) -> Callable[[str, re.Match[str]], tuple[_Values, int]]:
    """A CUDA library's allocation status (no figures), with the device where it is printed ("; GPU=0 ;")."""

    def read(window: str, m: re.Match[str]) -> tuple[_Values, int]:
        values: _Values = {"kind": kind, "device_type": "cuda"}
        gpu = re.compile(r" ?; ?GPU=(\d{1,4})").match(window, m.end())
        if gpu is not None:
            values["device_index"] = int(gpu.group(1))
        return values, m.end()

    return read


# --- serving engines' capacity checks -----------------------------------------------------------


def _read_vllm_startup(window: str, m: re.Match[str]) -> tuple[_Values, int]:
    """vLLM: "Free memory on device cuda:1 (19.77/22.05 GiB) on startup is less than desired GPU
    memory utilization (0.9, 19.84 GiB)": the free and total memory, and what the utilization asks."""
    unit = m.group("unit")
    values: _Values = {"kind": "vllm_startup_memory", "device_type": m.group("dev").lower()}
    if m.group("idx") is not None:
        values["device_index"] = int(m.group("idx"))
    values.update(
        free=_bytes(f"{m.group('free')} {unit}"),
        total_capacity=_bytes(f"{m.group('total')} {unit}"),
        required_total=_bytes(m.group("want")),
    )
    return values, m.end()


def _read_vllm_kv_cache(window: str, m: re.Match[str]) -> tuple[_Values, int]:
    """vLLM's check that one sequence of ``max_model_len`` fits the KV cache: in bytes (v1) or tokens (v0)."""
    f = _Fields(window, m.end())
    f.values.update(kind="vllm_kv_cache", max_model_len=_int(m.group("len") or m.group("len0")))
    if m.group("need") is not None:
        f.values.update(tried_to_allocate=_bytes(m.group("need")), free=_bytes(m.group("avail")))
        f.find(
            r"\. ?Based on the available memory, the estimated maximum model length is (\d{1,9})",
            "model_len_fits",
            pos=m.end(),
            end=m.end() + 120,
            read=_int,
        )
    else:
        f.values["model_len_fits"] = _int(m.group("fit"))
    return f.values, f.end


def _read_tgi_warmup(window: str, m: re.Match[str]) -> tuple[_Values, int]:
    return {"kind": "tgi_warmup", "prefill_tokens": int(m.group("n"))}, m.end()


def _fixed(kind: OOMKind, device_type: str) -> Callable[[str, re.Match[str]], tuple[_Values, int]]:
    """A reader for a wording that states no figure: only its kind and device."""

    def read(window: str, m: re.Match[str]) -> tuple[_Values, int]:
        return {"kind": kind, "device_type": device_type}, m.end()

    return read


# ---------------------------------------------------------------------------------------------
# Formats: where a message starts (its anchor) and which reader reads it
# ---------------------------------------------------------------------------------------------
# Every anchor does bounded work at each position it is tried from: no unbounded `[^)]*` or
# `\s*` that a repeated fragment could make it scan again from every start.


@dataclass(frozen=True)
class _Format:
    """One wording: ``anchor`` finds where a message starts, ``read`` reads its fields.

    ``states_figures`` is False for wordings that never state a size. A ``fragment`` is a
    message cut at its start ("Tried to allocate 20.00 MiB (GPU 0; ..."): right after another
    anchor it is that message's continuation, not a message of its own. A ``nocase`` anchor is
    written in lower case and searched in the text with ASCII letters lowered (same offsets).
    """

    name: str
    anchor: re.Pattern[str]
    read: Callable[[str, re.Match[str]], tuple[_Values, int]]
    states_figures: bool = True
    fragment: bool = False
    nocase: bool = False

    def read_at(self, text: str, m: re.Match[str]) -> tuple[_Values, int]:
        """Read the message that starts at ``m``: its fields, and where it ends."""
        return self.read(text[: m.start() + _WINDOW], m)


_FORMATS: Final = (
    # "CUDA" may be glued to the word before it (an issue title "whyCUDA out of memory."); the
    # shorter names need a boundary. The period keeps prose ("If you encounter CUDA out of memory,") out.
    _Format(
        "allocator",
        re.compile(
            r"(?P<dev>CUDA|HIP(?<![A-Za-z]HIP)|XPU(?<![A-Za-z]XPU)|MTIA(?<![A-Za-z]MTIA)|NPU(?<![A-Za-z]NPU)) "
            r"out of memory(?:\.|[ \t]*$)",
            re.MULTILINE,
        ),
        _read_allocator,
    ),
    _Format(
        "allocator_cut_before_head",
        re.compile(
            rf"Tried to allocate {_SZ}(?=\s?\(\s?(?:GPU|XPU) ?\d{{1,4}} ?;|\. (?:GPU|XPU) ?\d{{1,4}} has a total capac)"
        ),
        _read_allocator,
        fragment=True,
    ),
    _Format(
        "sentence_cut_before_figures",
        re.compile(r"(?:GPU(?<![\w.]GPU)|XPU(?<![\w.]XPU)) ?\d{1,4} has a total capac\w{0,8} of"),
        _read_allocator,
        fragment=True,
    ),
    _Format(
        "allocator_cut_in_figures",
        re.compile(
            r"(?<![\d.])\d{1,24}(?:\.\d{0,24})? ?(?:[KMGTPE]iB|bytes) "
            r"(?:total capacity;|already allocated;|reserved in total by Py[Tt]orch\))"
        ),
        _read_parenthesised_tail,
        fragment=True,
    ),
    _Format(
        "block_limit",
        re.compile(r"Current platform can NOT allocate memory block with size larger than \d{1,6}\s?GB!"),
        _read_block_limit,
    ),
    _Format(
        "async",
        re.compile(r"Allocation on device ?(?P<idx>\d{1,4})? ?would exceed allowed memory"),
        _read_async,
    ),
    _Format("mps", re.compile(r"MPS backend out of memory"), _read_mps),
    _Format(
        "mps_cut_before_head",
        re.compile(rf"Tried to allocate {_SZ} on (?:private|shared) pool"),
        _read_mps,
        fragment=True,
    ),
    _Format(
        "cpu",
        re.compile(
            r"DefaultCPUAllocator: (?:can't allocate memory|not enough memory): you tried to allocate "
            r"(?:(?P<n>\d{1,24}) bytes|\d{1,24}\s?GB)"
        ),
        _read_cpu,
    ),
    # The C allocator under libtorch's CPU tensors before 1.1: "posix_memalign(&data, gAlignment,
    # nbytes) == 0. 12 vs 0"; Paddle's: "posix_memalign(&p, alignment, size):12 != 0:0". 12 is ENOMEM;
    # other codes (22, EINVAL: a bad alignment) are not out of memory.
    _Format(
        "posix_memalign",
        re.compile(r"posix_memalign\([\w&, ]{1,60}\)(?: ?== ?0\. ?12 vs 0| ?: ?12 != 0:0)"),
        _fixed("cpu_allocator", "cpu"),
        states_figures=False,
    ),
    _Format(
        "numpy",
        re.compile(
            rf"Unable to allocate (?:(?P<size>{_SZ}) for an )?array with shape \((?P<shape>[^()]{{0,200}})\)"
            r"(?: and data type (?P<dtype>[\w<>|]{1,20}))?"
        ),
        _read_numpy,
    ),
    _Format(
        "xla",
        # XLA's own wordings stand without the status prefix (a log line, a cut message); the
        # generic "out of memory allocating N bytes" needs it.
        re.compile(
            r"(?:resource(?:_| )exhausted: ?)?(?:out of memory while trying to allocate ?(?P<n>\d{1,24}) ?bytes|"
            rf"failed to allocate request for (?P<size>{_SZ.lower()}) ?"
            r"(?:\((?P<b>\d{1,24})b\))?(?: on device ordinal (?P<ordinal>\d{1,4}))?)"
            r"|resource(?:_| )exhausted: ?out of memory allocating ?(?P<n2>\d{1,24}) ?bytes"
        ),
        _read_xla,
        nocase=True,
    ),
    _Format(
        "xla_compile",
        re.compile(
            r"Ran out of memory in memory space (?P<space>\w{1,20})\."
            rf"(?: ?Used (?P<used>{_SZ}) of (?P<cap>{_SZ}) (?P=space)\.)?"
            rf"(?: ?Exceeded (?P=space) capacity by (?P<over>{_SZ}))?"
        ),
        _read_xla_compile,
    ),
    _Format(
        "tf_tensor",
        re.compile(
            r"OOM when allocating tensor (?:with|of) shape ?\[(?P<shape>[^\[\]]{0,200})\]"
            r"(?: and type (?P<dtype>\w{1,20}))?(?: on (?P<on>[^\s\[]{1,120}?))?(?: by allocator (?P<alloc>\w{1,40}))?"
            r"(?=[\s\[]|$)"
        ),
        _read_tf_tensor,
    ),
    # TensorFlow's BFC allocator also warns "ran out of memory ... The caller indicates that this is
    # not a failure": it retries with less memory, and that warning is not an error.
    _Format(
        "tf_bfc",
        re.compile(
            rf"Allocator \((?P<alloc>\w{{1,40}})\) ran out of memory trying to allocate (?P<size>{_SZ})"
            r"(?!(?: \(rounded to \d{1,24}\))?(?: with freed_by_count=\d{1,10})?\.? The caller indicates that "
            r"this is not a failure)"
        ),
        _read_tf_bfc,
    ),
    _Format(
        "tf_bfc_1x",
        re.compile(
            rf"Ran out of memory trying to allocate (?P<size>{_SZ})"
            r"(?!(?: \(rounded to \d{1,24}\))?(?: with freed_by_count=\d{1,10})?\.? The caller indicates that "
            r"this is not a failure)"
        ),
        _read_tf_bfc,
    ),
    _Format(
        "tf_device",
        re.compile(
            rf"failed to allocate (?P<size>{_SZ}) \((?P<n>\d{{1,24}}) bytes\) from device: "
            r"CUDA_ERROR_OUT_OF_MEMORY(?:: out of memory)?"
        ),
        _read_tf_device,
    ),
    # CUDA's own error 2, as PyTorch, the CUDA runtime, TensorRT / ONNX Runtime ("Cuda Error in
    # allocate: 2 (out of memory)") and MXNet ("CUDA: out of memory") print it; spacing squashed or not.
    _Format(
        "cuda_error",
        re.compile(
            r"(?:cuda|hip) error: ?out of memory|cuda runtime error ?\(2\) ?: ?out of memory|"
            r"error=2 ?: ?out of memory|cuda_error_out_of_memory|cudaerrormemoryallocation|hiperroroutofmemory|"
            r"cuda error in [\w:]{1,80}: ?2(?: \(out of memory\)|(?!\d))|cuda runtime \(out of memory\)|"
            r"cuda: out of memory|cudamalloc failed: ?out of memory|errstr: ?out of memory|"
            r"cuda failed with error 2 out of memory|cuda failure 2: ?out of memory|"
            r"cuda error 2 at [^\s:]{1,200}:\d{1,6}: ?out of memory|gpuassert: ?out of memory"
        ),
        _read_cuda_error,
        states_figures=False,
        nocase=True,
    ),
    _Format(
        "ggml_backend",
        re.compile(r"failed to allocate (?P<dev>CUDA|HIP|SYCL|Metal)(?P<idx>\d{1,4}) buffer of size (?P<n>\d{1,24})"),
        _read_ggml,
    ),
    _Format(
        "onnxruntime_arena",
        re.compile(
            r"BFCArena::AllocateRawInternal[\w(),:*& ]{0,160}? (?:Failed to allocate memory for requested buffer "
            r"of size (?P<n>\d{1,24})|Available memory of (?P<avail>\d{1,24}) is smaller than requested bytes of "
            r"(?P<req>\d{1,24}))"
        ),
        _read_onnxruntime_arena,
    ),
    _Format(
        "cublas",
        re.compile(
            r"cu(?:da error: cu)?blas_status_alloc_failed(?: when calling `[^`]{0,300}`)?|"
            r"failed to create cublas handle: cublas_status_alloc_failed"
        ),
        _library("cublas"),
        states_figures=False,
        nocase=True,
    ),
    _Format(
        "cudnn",
        re.compile(r"cudnn(?: error: cudnn)?_status_alloc_failed"),
        _library("cudnn"),
        states_figures=False,
        nocase=True,
    ),
    _Format(
        "cuda_library",
        re.compile(r"CU(?:SOLVER|SPARSE)_STATUS_ALLOC_FAILED|CUFFT_ALLOC_FAILED"),
        _library("cuda_library"),
        states_figures=False,
    ),
    # --- host memory, as the operating system or the platform reports it ---
    # The kill line names the process; kernels before 5.0 print "Kill process N (name) score S or
    # sacrifice child" first. The figures follow the name; a name may hold parentheses itself.
    _Format(
        "linux_oom_killer",
        re.compile(
            r"(?:(?:Memory cgroup )?[Oo]ut of memory: Kill(?:ed)? process|(?<![\w-])Killed process) "
            r"(?P<pid>\d{1,10}) \((?P<name>[^\n]{1,64}?)\)(?= total-vm| score)"
            r"(?: total-vm:[\d,]{1,24} ?kB, anon-rss:(?P<anon>[\d,]{1,24}) ?kB, file-rss:(?P<file>[\d,]{1,24}) ?kB"
            r"(?:, shmem-rss:(?P<shmem>[\d,]{1,24}) ?kB)?)?"
        ),
        _read_oom_killer,
    ),
    _Format(
        "colab_session_ram",
        re.compile(r"Your session crashed after using all available RAM"),
        _fixed("colab_session_ram", "cpu"),
        states_figures=False,
    ),
    _Format(
        "kaggle_notebook_ram",
        re.compile(r"Your notebook tried to allocate more memory than is available"),
        _fixed("kaggle_notebook_ram", "cpu"),
        states_figures=False,
    ),
    # errno 12 is ENOMEM on Linux, macOS and Windows alike: the number says it in every locale.
    _Format("errno_enomem", re.compile(r"\[Errno 12\]"), _fixed("errno_enomem", "cpu"), states_figures=False),
    _Format(
        "windows_paging_file",
        re.compile(
            r"\[winerror 1455\]|os error 1455(?!\d)\)?|the paging file is too small for this operation to complete"
        ),
        _fixed("windows_paging_file", "cpu"),
        states_figures=False,
        nocase=True,
    ),
    _Format(
        "model_system_memory",
        re.compile(rf"model requires more system memory \((?P<need>{_SZ})\) than is available \((?P<avail>{_SZ})\)"),
        _read_model_system_memory,
    ),
    # --- accelerators' runtimes and the libraries under the frameworks ---
    _Format(
        "tpu_runtime",
        re.compile(
            rf"Attempting to (?:allocate|reserve) (?P<size>{_SZ})(?: at the bottom of memory)?\. That was not "
            rf"possible\. There are (?P<free>{_SZ}) free|Could not allocate (?P<n>\d{{1,24}}) bytes in memory "
            r"[\w]{1,40}; \d{1,24} bytes allocatable, (?P<avail>\d{1,24}) bytes available"
        ),
        _read_tpu_runtime,
    ),
    _Format(
        "pinned_host",
        re.compile(r"failed to alloc (?P<n>\d{1,24}) bytes on host: CUDA_ERROR_OUT_OF_MEMORY(?:: out of memory)?"),
        _read_pinned_host,
    ),
    _Format(
        "cuda_ctx_retain",
        re.compile(
            r"(?:failed initializing StreamExecutor for CUDA device ordinal (?P<ordinal>\d{1,4}): Internal: "
            r"failed call to )?cuDevicePrimaryCtxRetain(?::| results in) CUDA_ERROR_OUT_OF_MEMORY(?:: out of memory)?"
            r"(?:; total memory reported: (?P<total>\d{1,24}))?"
        ),
        _read_ctx_retain,
    ),
    _Format(
        "nccl",
        re.compile(
            r"(?:NCCL WARN )?(?:Cuda failure (?:2 )?'out of memory'|Failed to CUDA calloc (?P<n>\d{1,24}) bytes)"
        ),
        _read_nccl,
    ),
    # --- serving engines' capacity checks ---
    _Format(
        "vllm_startup_memory",
        re.compile(
            r"[Ff]ree memory on device (?P<dev>[a-z]{2,10}):?(?P<idx>\d{1,4})? \((?P<free>\d{1,9}(?:\.\d{1,6})?)/"
            r"(?P<total>\d{1,9}(?:\.\d{1,6})?) ?(?P<unit>[KMGT]iB)\) on startup is less than desired GPU memory "
            rf"utilization \([\d.]{{1,8}}, (?P<want>{_SZ})\)"
        ),
        _read_vllm_startup,
    ),
    _Format(
        "vllm_kv_cache",
        re.compile(
            r"(?:(?:To serve at least one request with the models?'s max seq len \((?P<len>\d{1,9})\), ?\(?)?"
            rf"(?P<need>{_SZ}) KV cache is needed, which is larger than the available KV cache memory "
            rf"\((?P<avail>{_SZ})\)|The model's max seq len \((?P<len0>\d{{1,9}})\) is larger than the maximum "
            r"number of tokens that can be stored in KV cache \((?P<fit>\d{1,9})\)"
            r"|No available memory for the cache blocks)"
        ),
        _read_vllm_kv_cache,
    ),
    _Format(
        "tgi_warmup",
        re.compile(r"Not enough memory to handle (?P<n>\d{1,9}) prefill tokens"),
        _read_tgi_warmup,
    ),
)

# Wordings that state no figure, by the kind they read as.
_NO_FIGURES: Final = frozenset({"cuda_error", "cublas", "cudnn", "cuda_library"})
# A message's own fields never lie further than this from where it starts.
_WINDOW: Final = 2500

_ASCII_LOWER: Final = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)

# Only when nothing above matched: a traceback line naming an out-of-memory exception class.
_A_OOM_CLASS: Final = re.compile(r"^[ \t]*(?:[\w.]{0,120}\.)?OutOfMemoryError: \S.*$", re.MULTILINE)
_A_MEMORY_ERROR: Final = re.compile(r"^[ \t]*(?:[\w.]{0,120}\.)?MemoryError(?:: .*)?[ \t]*$", re.MULTILINE)


def _anchors(text: str) -> list[tuple[_Format, re.Match[str]]]:
    """Every message start in ``text``, in order, overlaps resolved in favour of the earlier one."""
    # Lowering a copy rather than re.IGNORECASE: an anchor that starts with a literal lets the
    # engine jump between candidates instead of trying every position.
    lowered = text.translate(_ASCII_LOWER)
    found = [(fmt, m) for fmt in _FORMATS for m in fmt.anchor.finditer(lowered if fmt.nocase else text)]
    found.sort(key=lambda item: (item[1].start(), -item[1].end()))
    kept: list[tuple[_Format, re.Match[str]]] = []
    for fmt, m in found:
        if kept and m.start() < kept[-1][1].end():
            continue
        kept.append((fmt, m))
    return kept


_EXC_PREFIX: Final = re.compile(r"(?:[\w.]{0,80}(?:Error|Exception)|!!! Exception during processing !!!): ?$")


def _parse_text(text: str) -> OOMInfo | None:
    anchors = _anchors(text)
    if not anchors:
        return None
    # The last message is the one that was raised: a traceback or a log ends with it. Wordings
    # without figures often name the error twice ("CUDA error: out of memory ... Search for
    # `cudaErrorMemoryAllocation'"): those start at the first naming.
    i = len(anchors) - 1
    fmt, m = anchors[i]
    values, end = fmt.read_at(text, m)
    # A fragment ("Tried to allocate 20.00 MiB (GPU 0; ...", "1.17 GiB reserved in total by
    # PyTorch)") inside the message the anchor before it opens is part of that message.
    last = m.start()
    while fmt.fragment and i > 0 and last - anchors[i - 1][1].start() < _WINDOW:
        before_values, before_end = anchors[i - 1][0].read_at(text, anchors[i - 1][1])
        if m.start() >= before_end:
            break
        i -= 1
        fmt, m = anchors[i]
        values, end = before_values, before_end
    while (
        i > 0
        and not fmt.states_figures
        and anchors[i - 1][0] is fmt
        and anchors[i][1].start() - anchors[i - 1][1].end() < 300
        and m.start() - anchors[i - 1][1].start() < _WINDOW
    ):
        i -= 1
    first = anchors[i][1]
    tail = re.compile(r"\s?[.)]").match(text, end)
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
    """The exception, then its ``__cause__`` and ``__context__`` chains and the exceptions an
    ``ExceptionGroup`` holds, each once."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
        todo.extend(x for x in getattr(e, "exceptions", ()) if isinstance(x, BaseException))


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
    if "MemoryError" not in raw:
        return None
    raw = _ANSI.sub("", raw)
    last = _last(_A_OOM_CLASS.finditer(raw))
    if last is not None:
        return OOMInfo(kind="out_of_memory_error", message=last.group(0).strip())
    last = _last(_A_MEMORY_ERROR.finditer(raw))
    if last is not None:
        return OOMInfo(kind="python_memory_error", device_type="cpu", message=last.group(0).strip())
    return None


def _last(matches: Iterator[re.Match[str]]) -> re.Match[str] | None:
    last = None
    for last in matches:  # noqa: B007 - only the last one counts
        pass
    return last


def parse(text_or_exception: str | bytes | BaseException | None) -> OOMInfo | None:
    """Read an out-of-memory error; ``None`` if it is not one.

    Accepts the exception itself (its class, message and ``__cause__``/``__context__`` chain are
    read, and the exceptions of an ``ExceptionGroup``) or any text holding the message: the
    message alone, a traceback, a log, an issue; bytes are read as UTF-8. ``None`` (no error,
    as ``sys.last_value`` before any) is not an out-of-memory error.

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
    if text_or_exception is None:
        return None
    if isinstance(text_or_exception, (bytes, bytearray)):
        text_or_exception = bytes(text_or_exception).decode("utf-8", errors="replace")
    if not isinstance(text_or_exception, str):
        raise TypeError(f"parse() takes an exception, a str or bytes, got {type(text_or_exception).__name__}")
    return _parse_any_text(text_or_exception)


def _is_host(info: OOMInfo | None) -> bool:
    return info is not None and (info.kind in _HOST_KINDS or (info.device_type == "cpu" and not info.simulated))


def _family_headline(info: OOMInfo) -> str | None:
    """The headline of a wording that is not an allocator's: who stopped what, with its figures."""
    fb = format_bytes
    k = info.kind
    if k == "linux_oom_killer":
        held = f", which held {fb(info.process_in_use)} of RAM" if info.process_in_use is not None else ""
        return f"Out of host memory (RAM): the Linux kernel killed process {info.pid} ({info.process_name}){held}."
    if k == "colab_session_ram":
        return "Out of host memory (RAM): Colab ended the session after it used all available RAM."
    if k == "kaggle_notebook_ram":
        return "Out of host memory (RAM): Kaggle restarted the notebook after it asked for more RAM than it has."
    if k == "errno_enomem":
        return "Out of host memory (RAM): the operating system refused to allocate (errno 12, ENOMEM)."
    if k == "windows_paging_file":
        return "Out of host memory (RAM): Windows' paging file is too small (error 1455): RAM plus page file is full."
    if k == "pinned_host" and info.tried_to_allocate is not None:
        return f"Out of host memory (RAM): {fb(info.tried_to_allocate)} of pinned (page-locked) memory was refused."
    if k == "model_system_memory" and info.required_total is not None and info.free is not None:
        return f"Out of host memory (RAM): the model needs {fb(info.required_total)}, {fb(info.free)} is available."
    where = info.device or "the device"
    if k == "vllm_startup_memory" and None not in (info.required_total, info.free, info.total_capacity):
        return (
            f"vLLM cannot start on {where}: gpu_memory_utilization asks for {fb(info.required_total or 0)}, "
            f"{fb(info.free or 0)} of {fb(info.total_capacity or 0)} is free."
        )
    if k == "vllm_kv_cache" and info.max_model_len is None and info.tried_to_allocate is None:
        return "vLLM has no device memory left for its KV cache after the weights and the profiling peak."
    if k == "vllm_kv_cache":
        what = f"max_model_len {info.max_model_len}" if info.max_model_len is not None else "one sequence"
        need = (
            f": {fb(info.tried_to_allocate)} of KV cache needed, {fb(info.free)} available"
            if info.tried_to_allocate is not None and info.free is not None
            else ""
        )
        fits = f"; {info.model_len_fits} tokens fit" if info.model_len_fits is not None else ""
        return f"vLLM's KV cache cannot hold {what}{need}{fits}."
    if k == "tgi_warmup":
        return f"Out of memory on {where}: the server's warm-up could not run {info.prefill_tokens} prefill tokens."
    return None


def _headline(info: OOMInfo | None) -> str:
    if info is None:
        return "Out of memory (the error states no figures)."
    family = _family_headline(info)
    if family is not None:
        return family
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

"""Advice for the out-of-memory families that are not a framework allocator's on the device.

Host memory (the Linux OOM killer, Colab's RAM crash, errno 12, Windows' paging file, pinned host
buffers, a model server's RAM check) is fixed in RAM: less data held at once, fewer copies of it,
fewer processes; a smaller batch is not the first thing to try unless the batch is what was being
allocated. A serving engine's capacity check is fixed with that engine's own settings
(``gpu_memory_utilization``, ``max_model_len``, ``max_num_seqs``, a smaller or quantised model),
never with a training batch size. A library's allocation (NCCL) has its own knobs.

The rule, for every family: the suggestions come from the knob that governs the memory the
message says ran out, and the training-loop suggestions that cannot change that memory are
displaced (``FamilyAdvice.displaces``). ``advice.advise`` ranks these with its own rules; this
module imports only the parser and :mod:`gpumagic.units`, so it never forms an import circle
with the advice module.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Final

from gpumagic.oom.parsing import OOMInfo, _is_host
from gpumagic.units import format_bytes

__all__ = ["FamilyAdvice", "FamilySuggestion", "family_advice", "killed_hint"]


@dataclass(frozen=True)
class FamilySuggestion:
    """One suggestion and its score on ``advice.py``'s scale (100 is the strongest rule there)."""

    title: str
    detail: str
    kind: str
    score: int
    code: str | None = None


@dataclass(frozen=True)
class FamilyAdvice:
    """The family's suggestions, and the kinds of the other rules' suggestions they displace."""

    suggestions: tuple[FamilySuggestion, ...] = ()
    displaces: frozenset[str] = frozenset()


# Suggestions about the training loop's device memory: none of them changes RAM or an engine's
# reservation. "host_memory" is the generic host rule's, replaced by the family's own.
_TRAINING: Final = frozenset(
    {"batch_size", "measure", "accumulation", "evaluation", "mixed_precision", "checkpointing", "allocation"}
)
_DEVICE_ONLY: Final = frozenset({"fragmentation", "other_processes", "cuda_error", "limit"})
# Kinds whose message is one tensor's allocation in RAM: the batch may be what was allocated.
_TENSOR_IN_RAM: Final = frozenset({"cpu_allocator", "numpy", "python_memory_error"})

_FIRST: Final = 98  # above every device rule in advice.py (the strongest there scores 100 only for a binding limit)
_AFTER_BATCH: Final = 65  # below the batch rule (70) when the batch is what was being allocated

_LAZY: Final = (
    "hold less data in RAM at once: load samples lazily in the Dataset's __getitem__ or memory-map arrays "
    "(np.load(path, mmap_mode='r'), pandas' chunksize) instead of loading the whole data set; each DataLoader "
    "worker holds its own copy of the Dataset object, so use fewer workers"
)
_CHECK_LINUX: Final = "!free -h\n!dmesg -T 2>/dev/null | grep -i 'killed process' | tail -3"


def _host(info: OOMInfo, batch_dependent: bool | None) -> FamilyAdvice:
    fb = format_bytes
    k = info.kind
    score = _AFTER_BATCH if k in _TENSOR_IN_RAM and batch_dependent else _FIRST
    code: str | None = _CHECK_LINUX
    if k == "linux_oom_killer":
        held = f", holding {fb(info.process_in_use)}" if info.process_in_use is not None else ""
        title = "Use less host memory (RAM): the kernel killed a process for it"
        detail = (
            f"the Linux OOM killer ended process {info.pid} ({info.process_name}){held}, when RAM and swap were "
            f"full; {_LAZY}. The commands show the RAM left and the kernel's last kills"
        )
    elif k == "colab_session_ram":
        title = "Use less host memory (RAM), or a High-RAM runtime"
        detail = (
            f"Colab restarts the runtime when its RAM is full, and the kernel's variables are lost; {_LAZY}. "
            "Runtime > Change runtime type offers more RAM on paid plans"
        )
        code = "!free -h"
    elif k == "kaggle_notebook_ram":
        title = "Use less host memory (RAM)"
        detail = (
            f"Kaggle restarts the notebook when its RAM is full, and the kernel's variables are lost; {_LAZY}. "
            "Kaggle's sessions have a fixed RAM size: the data has to fit it"
        )
        code = "!free -h"
    elif k == "errno_enomem":
        title = "Use less host memory (RAM), or fewer worker processes"
        detail = (
            "the operating system refused memory (ENOMEM); most often in os.fork(), when a DataLoader worker or a "
            "subprocess starts and the parent's memory cannot be committed again: num_workers=0 shows whether the "
            f"workers are the cause; {_LAZY}"
        )
    elif k == "windows_paging_file":
        title = "Enlarge the Windows paging file, or start fewer processes"
        detail = (
            "Windows commits RAM plus the paging file for every process; each DataLoader worker (and each process "
            "that imports torch) commits its own copy of torch's CUDA libraries. Use num_workers=0 (or fewer "
            "workers), or let Windows manage a larger paging file: System > About > Advanced system settings > "
            "Performance > Advanced > Virtual memory (restart afterwards)"
        )
        code = None
    elif k == "pinned_host":
        size = fb(info.tried_to_allocate) if info.tried_to_allocate is not None else "a buffer"
        title = "Pin less host memory"
        detail = (
            f"{size} of page-locked RAM was refused (the CUDA error names the host, not the GPU): pinned memory "
            "cannot be swapped, so it needs free RAM. Use DataLoader(..., pin_memory=False), or fewer or smaller "
            "pinned buffers"
        )
        code = None
    elif k == "model_system_memory":
        return _model_server(info)
    else:
        n = info.tried_to_allocate
        tried = f"{fb(n)} could not be allocated in RAM" if n else "RAM ran out"
        title = "Use less host memory (RAM)"
        detail = f"{tried}: {_LAZY}, and pin_memory=False"
        code = None if k in _TENSOR_IN_RAM else code
    return FamilyAdvice(
        (FamilySuggestion(title, detail, "host_memory", score, code),),
        displaces=_DEVICE_ONLY | {"host_memory", "mixed_precision", "checkpointing"},
    )


def _model_server(info: OOMInfo) -> FamilyAdvice:
    fb = format_bytes
    need, avail = info.required_total, info.free
    short = f"; it is short by {fb(need - avail)}" if need is not None and avail is not None else ""
    figures = f" (needs {fb(need)}, {fb(avail)} available)" if need is not None and avail is not None else ""
    return FamilyAdvice(
        (
            FamilySuggestion(
                f"Use a smaller or more quantised model{figures}",
                "the model server checks the model's weights and context against free RAM before loading it"
                f"{short}: a variant with fewer parameters or a 4-bit quantisation (a q4 tag) needs about a quarter "
                "of the 16-bit size; a shorter context window also needs less. Closing other programs frees RAM too",
                "model_size",
                _FIRST,
            ),
        ),
        displaces=_TRAINING | _DEVICE_ONLY | {"host_memory", "holders"},
    )


def _utilization_that_fits(info: OOMInfo) -> float | None:
    """The largest gpu_memory_utilization (two decimals) whose reservation fits in the free memory."""
    free, total = info.free, info.total_capacity
    if free is None or not total:
        return None
    share = free / total
    u = math.floor(share * 100) / 100
    if share - u < 0.002:  # the printed figures are rounded: keep a margin below what is free
        u = round(u - 0.01, 2)
    return u if u > 0 else None


def _vllm_startup(info: OOMInfo) -> FamilyAdvice:
    fb = format_bytes
    u = _utilization_that_fits(info)
    wanted = fb(info.required_total) if info.required_total is not None else "its share"
    free = fb(info.free) if info.free is not None else "less"
    if u is None:
        title, code = "Lower gpu_memory_utilization", None
        tail = "a lower value, or free device memory first"
    else:
        title = f"Lower gpu_memory_utilization to {u:.2f}"
        code = f"gpu_memory_utilization={u:.2f}  # LLM(...) argument; command line: --gpu-memory-utilization {u:.2f}"
        tail = f"{u:.2f} asks for {fb(round(u * (info.total_capacity or 0)))}, which fits"
    detail = (
        f"vLLM reserves gpu_memory_utilization × the device's total at start-up ({wanted}), but only {free} was "
        f"free: other processes, or models and tensors this kernel already holds, use the rest; {tail}. A smaller "
        "reservation leaves less room for the KV cache: lower max_model_len or max_num_seqs if it then runs out"
    )
    return FamilyAdvice(
        (FamilySuggestion(title, detail, "serving", _FIRST, code),),
        displaces=_TRAINING | {"fragmentation", "cuda_error", "limit"},
    )


def _vllm_kv_cache(info: OOMInfo) -> FamilyAdvice:
    fb = format_bytes
    out = []
    fits = info.model_len_fits
    asked = f" (now {info.max_model_len})" if info.max_model_len is not None else ""
    if fits is not None:
        out.append(
            FamilySuggestion(
                f"Set max_model_len to {fits}{asked}",
                f"the KV cache left after the weights holds {fits} tokens of one sequence; a shorter max_model_len "
                "fits it, and prompts plus outputs longer than that are refused",
                "serving",
                _FIRST,
                f"max_model_len={fits}  # LLM(...) argument; on the command line: --max-model-len {fits}",
            )
        )
    need, avail = info.tried_to_allocate, info.free
    short = f" ({fb(need)} needed, {fb(avail)} available)" if need is not None and avail is not None else ""
    out.append(
        FamilySuggestion(
            "Give the KV cache more memory",
            f"the KV cache is what remains of gpu_memory_utilization × the device's memory after the weights and "
            f"the profiling peak{short}: raise gpu_memory_utilization (0.9 by default) if nothing else uses the "
            "device, lower max_num_seqs (a smaller profiling batch), store the cache in 8 bits (kv_cache_dtype='fp8'), "
            "use a smaller or quantised model, or split it over more devices (tensor_parallel_size)",
            "serving",
            _FIRST - 1 if fits is not None else _FIRST,
        )
    )
    return FamilyAdvice(tuple(out), displaces=_TRAINING | {"fragmentation", "cuda_error", "limit"})


def _tgi_warmup(info: OOMInfo) -> FamilyAdvice:
    n = info.prefill_tokens
    half = max(n // 2, 1) if n else None
    title = f"Lower --max-batch-prefill-tokens to {half}" if half else "Lower --max-batch-prefill-tokens"
    return FamilyAdvice(
        (
            FamilySuggestion(
                title,
                f"the server runs one prefill of {n} tokens at start-up to size its KV cache, and it did not fit "
                "next to the weights; halve it, with the input and total lengths it must hold (the server refuses "
                "a prefill budget below the input length), or load a quantised model (--quantize)",
                "serving",
                _FIRST,
                f"--max-batch-prefill-tokens {half} --max-input-tokens {half - 1} --max-total-tokens {half}"
                if half and half > 1
                else None,
            ),
        ),
        displaces=_TRAINING | {"fragmentation", "cuda_error", "limit"},
    )


def _nccl(info: OOMInfo) -> FamilyAdvice:
    fb = format_bytes
    size = f" ({fb(info.tried_to_allocate)} refused)" if info.tried_to_allocate is not None else ""
    where = f" on {info.device}" if info.device_index is not None else ""
    return FamilyAdvice(
        (
            FamilySuggestion(
                f"Leave device memory for NCCL's buffers{where}",
                f"NCCL allocates its communication buffers on the device when a communicator starts or a new "
                f"collective first runs{size}, outside PyTorch's caching allocator: free device memory before "
                "init_process_group and the first collective (torch.cuda.empty_cache() releases PyTorch's cached "
                "blocks), or shrink NCCL's buffers with NCCL_BUFFSIZE (4 MiB per channel by default) before the "
                "process group starts",
                "library",
                _FIRST,
                "%env NCCL_BUFFSIZE=1048576",
            ),
        ),
        displaces=frozenset({"cuda_error"}),
    )


def family_advice(info: OOMInfo | None, *, batch_dependent: bool | None = None) -> FamilyAdvice:
    """The family's own suggestions for ``info``, or none when the allocator rules cover it.

    ``batch_dependent`` is the advice context's: True when the failing code reads a batch size.

    >>> from gpumagic.oom.parsing import parse
    >>> family_advice(parse("OSError: [Errno 12] Cannot allocate memory")).suggestions[0].kind
    'host_memory'
    """
    if info is None:
        return FamilyAdvice()
    if info.kind == "vllm_startup_memory":
        return _vllm_startup(info)
    if info.kind == "vllm_kv_cache":
        return _vllm_kv_cache(info)
    if info.kind == "tgi_warmup":
        return _tgi_warmup(info)
    if info.kind == "nccl":
        return _nccl(info)
    if _is_host(info) and not info.simulated:
        return _host(info, batch_dependent)
    return FamilyAdvice()


# A process ended by a signal, or a kernel that died: the message names no memory failure, so it
# is not parsed as one; host memory is still the usual cause, and it can be checked.
_KILLED: Final = re.compile(
    r"DataLoader worker \(pid(?:\(s\))? [\d., ]{1,80}\) is killed by signal: Killed"
    r"|[Tt]he kernel appears to have died|Process finished with exit code 137|[Kk]illed by signal 9\b"
)


def killed_hint(error: BaseException | str) -> str | None:
    """What to check when a process was killed without a stated reason, or None for other errors.

    >>> killed_hint(RuntimeError("DataLoader worker (pid 4024) is killed by signal: Killed."))[:36]
    'The message states no memory failure'
    """
    if _KILLED.search(str(error)) is None:
        return None
    return (
        "The message states no memory failure, but a process killed without one is most often the Linux OOM "
        "killer ending it for host memory (RAM): `!dmesg -T | grep -i 'killed process'` shows whether it did, "
        "and `!free -h` the RAM left. Each DataLoader worker holds its own copy of the Dataset object: fewer "
        "workers (num_workers=0 to confirm), or a Dataset that loads samples lazily or memory-mapped, need less"
    )

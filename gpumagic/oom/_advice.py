"""Advice for an out-of-memory error: ranked suggestions with numbers derived from its figures."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from html import escape
from typing import Any, Final

from gpumagic._batchmath import accumulation_plan, lr_note, round_like
from gpumagic._units import format_bytes
from gpumagic.oom._parse import _MARGIN, _NO_FIGURES, GiB, MiB, OOMInfo, _headline, _is_host

__all__ = ["Advice", "AdviceContext", "Suggestion", "advise"]

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
    rank: int | None = None
    """The data-parallel rank that ran out of memory; by default this process's rank under
    torch.distributed, or the rank a launcher's error message names."""
    world_size: int | None = None
    """Ranks training together (data parallel): batch sizes are per rank, the global batch is
    per-rank size × world_size; by default torch.distributed's world size."""


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
        from gpumagic._text import wrap_block

        p.text(wrap_block(self.text(), code_indent=5))  # a terminal: prose within its width, code whole

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


# Wordings raised by PyTorch, where torch code snippets apply.
_TORCH_KINDS: Final = frozenset(
    {
        "cuda_caching_allocator", "cuda_sentence", "cuda_malloc_async", "cuda_error", "cublas", "cudnn",
        "cuda_library", "mps", "cpu_allocator", "out_of_memory_error", "xpu_allocation_limit",
    }
)  # fmt: skip


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
    advice = Advice(
        headline=_headline(info),
        suggestions=tuple(s for _, s in ranked),
        unknown=tuple(dict.fromkeys(unknown)),
        fits_batch_size=fits,
        info=info,
    )
    return _per_rank(advice, ctx)


# "-- Process 1 terminated with the following error" (torch.multiprocessing), "rank : 1" (torchelastic)
_RANK_IN_MESSAGE: Final = re.compile(r"Process (\d+) terminated with the following error|\brank\s*:\s*(\d+)")


def rank_in_error(error: BaseException | str) -> int | None:
    """The rank a launcher's error names (a child process's failure re-raised in the parent)."""
    m = _RANK_IN_MESSAGE.search(str(error))
    return None if m is None else int(m.group(1) or m.group(2))


def _per_rank(advice: Advice, ctx: AdviceContext) -> Advice:
    """Under data parallelism: name the rank, and state batch sizes per rank and for all ranks."""
    from gpumagic import _ranks

    rank = ctx.rank if ctx.rank is not None else _ranks.rank()
    world = ctx.world_size if ctx.world_size is not None else _ranks.world_size()
    if rank is None and (world is None or world < 2):
        return advice
    suggestions = list(advice.suggestions)
    if world is not None and world > 1:
        for i, s in enumerate(suggestions):
            if s.kind not in ("batch_size", "accumulation") or s.batch_size is None:
                continue
            k = s.accumulation_steps or 1
            was = ""
            if ctx.batch_size is not None:
                old_k = ctx.accumulation_steps or 1
                was = f", was {ctx.batch_size}{f' × {old_k}' if old_k > 1 else ''} × {world} = " \
                      f"{ctx.batch_size * old_k * world}"
            glob = f"{s.batch_size}{f' × {k}' if k > 1 else ''} × {world} ranks = {s.batch_size * k * world}"
            suggestions[i] = dataclasses.replace(
                s, detail=f"{s.detail}; the size is per rank (set it on every rank): global batch {glob}{was}"
            )
    who = f"Rank {rank}" if rank is not None else "One rank"
    of = f" of {world}" if world is not None and world > 1 else ""
    return dataclasses.replace(advice, headline=f"{who}{of}: {advice.headline}", suggestions=tuple(suggestions))

"""Advice for an out-of-memory error: ranked suggestions with numbers derived from its figures."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from html import escape
from typing import TYPE_CHECKING, Any, Final

from gpumagic.batchmath import DEFAULT_MARGIN, accumulation_plan, lr_note
from gpumagic.oom._families import family_advice
from gpumagic.oom.parsing import _NO_FIGURES, GiB, MiB, OOMInfo, _headline, _is_host, parse
from gpumagic.units import format_bytes, format_percent

if TYPE_CHECKING:
    from gpumagic.report import Remedy

__all__ = ["Advice", "AdviceContext", "Suggestion", "advise", "last_advice", "remember"]

# The share of usable memory a batch size computed from a fit or a proportion may fill: the
# search's default margin stays free, so the advice and %find_batch agree.
_USABLE: Final = 1 - DEFAULT_MARGIN
_USABLE_PCT: Final = format_percent(_USABLE)

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

    ``fit_source`` says where the fit comes from: ``"search"`` (a batch-size search: its line is
    trusted) or ``"run"`` (one run that worked: the line through its peak over-counts the bytes
    per sample, so what it says fits is a lower bound); ``None`` trusts the fit as given.
    ``batch_dependent``: False when the failing code reads no batch size (then no batch advice);
    None when unknown. ``measure_code``: the command that measures the batch size that fits for
    the failing code (``%find_batch --var batch_size -d cpu --budget 96MiB``), offered when no
    size can be derived with confidence. ``released``: (name, bytes) of the names gpumagic
    released after the error. ``where``: the failing line ("line 3 in the cell: x = ...").
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
    kept: tuple[tuple[str, int], ...] = ()
    """Results the failed cell bound that hold device memory, kept after the error (gpumagic
    never deletes a value): (name, bytes that ``del name`` frees), largest first."""
    rerun_binds_first: frozenset[str] = frozenset()
    """Names the failed cell binds before it reads them: a rerun computes them afresh."""
    mixed_precision: bool | None = None
    activation_bytes: int | None = None
    evaluation: bool = False
    """The failing code only evaluates (no backward): no accumulation or checkpointing advice;
    ``%find_batch --eval`` finds the evaluation batch."""
    batch_variable: str | None = None
    """Where the code reads its batch size: a name (``batch_size``) or an expression
    (``cfg['bs']``, ``args.batch_size``); a size to use says to set it there."""
    fit_source: str | None = None
    batch_dependent: bool | None = None
    measure_code: str | None = None
    released: tuple[tuple[str, int], ...] = ()
    where: str | None = None
    rank: int | None = None
    """The data-parallel rank that ran out of memory; by default this process's rank under
    torch.distributed, or the rank a launcher's error message names."""
    loop: tuple[tuple[str, str], ...] = ()
    """The failing loop's own code, for snippets: ("loop", ...), ("body", ...), ("loss", ...),
    ("optimizer", ...) as :func:`gpumagic.oom.context.loop_names` reads them from the cell."""
    batch_literal: str | None = None
    """The batch size is this number written in the failing code (read from the inputs' leading
    dimension): a size to use says to change it there."""
    world_size: int | None = None
    """Ranks training together (data parallel): batch sizes are per rank, the global batch is
    per-rank size × world_size; by default torch.distributed's world size."""
    remedies: tuple[Remedy, ...] | None = None
    """The failing cell's remedies, planned (:mod:`gpumagic.remedies`): what each saves and the
    batch that then fits. ``None``: not planned (``remedies_unplanned`` may say why); the
    generic autocast and checkpointing lines are given then."""
    remedies_fits_now: int | None = None
    """With ``remedies``: the batch the plan says fits as the cell is written."""
    remedies_unplanned: str | None = None

    def __post_init__(self) -> None:
        # a figure that is not a finite number (nan from a failed fit, inf) is unknown, like None
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                object.__setattr__(self, f.name, None)


@dataclass(frozen=True)
class Suggestion:
    """One thing to try. ``kind`` names it for code ("batch_size", "measure", "fragmentation", ...).

    ``batch_size`` is set only on a size to use (never on an upper bound); a ``"measure"``
    suggestion's ``code`` is the command that measures it.
    """

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
    released: tuple[tuple[str, int], ...] = ()
    """(name, bytes) of what gpumagic gave back after the error: the autograd graphs the failed
    cell's results held (``out``, ``loss``: their values stay, detached), and gradients or
    optimizer state the failed step added (``model (gradients)``)."""

    @property
    def released_note(self) -> str | None:
        """One line saying which graphs were freed (values kept) and how much was given back, or None."""
        if not self.released:
            return None
        graphs = [f"`{n}`" for n, _ in self.released if " (" not in n]
        added = [n for n, _ in self.released if " (" in n]
        total = format_bytes(sum(b for _, b in self.released))
        parts = []
        if graphs:
            parts.append(f"the autograd graph of {', '.join(graphs)} (the values stay, detached)")
        if added:
            parts.append("what the failed step added: " + ", ".join(added))
        return f"Gave back {total}: " + " and ".join(parts) + "; gpumagic never deletes a value"

    def text(self) -> str:
        """Plain text: the headline, one line per suggestion (code for the first two), what is unknown."""
        lines = [self.headline]
        if self.released_note:
            lines.append(self.released_note)
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
        from gpumagic import views

        p.text(views.view(self, "pretty"))  # a terminal: prose within its width, code whole

    def _repr_html_(self) -> str:
        items = []
        for s in self.suggestions:
            code = f'<pre style="margin:2px 0 4px 0">{escape(s.code)}</pre>' if s.code else ""
            items.append(f"<li><b>{escape(s.title)}</b>: {escape(s.detail)}{code}</li>")
        unknown = f'<div style="opacity:0.7">Unknown: {escape("; ".join(self.unknown))}.</div>' if self.unknown else ""
        released = f"<div>{escape(self.released_note)}</div>" if self.released_note else ""
        return (
            '<div class="gpumagic-oom" style="font-size:13px">'
            f"<div><b>{escape(self.headline)}</b></div>{released}"
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


_TIGHT: Final = 0.8
"""A lower bound within this share of the upper bound is close enough to be the size to use."""


def _exact_fit(ctx: AdviceContext, f: _Facts, unknown: list[str]) -> tuple[int | None, str, Suggestion | None]:
    """(largest batch the fit says fits, how, or a suggestion when even batch 1 does not fit)."""
    fb = format_bytes
    slope, intercept = ctx.bytes_per_sample, ctx.intercept_bytes
    if slope is None or intercept is None or slope <= 0:
        return None, "", None
    if f.usable is None:
        unknown.append("the capacity to fit the batch into (no figure in the error; pass capacity_bytes)")
        return None, "", None
    room = f.usable * _USABLE
    if room - intercept < slope:
        return None, "", Suggestion(
            "Even batch 1 does not fit",
            f"the fit's fixed part, {fb(round(intercept))}, plus {fb(round(slope))} per sample exceeds "
            f"{fb(round(room))} ({_USABLE_PCT} of {f.usable_how}): free memory first",
            "batch_size",
        )
    exact = int((room - intercept) // slope)
    how = f"peak ≈ {fb(round(intercept))} + {fb(round(slope))} per sample, so up to {exact} samples fit in " \
          f"{fb(round(room))} ({_USABLE_PCT} of {f.usable_how})"
    return exact, how, None


def _upper_bound(ctx: AdviceContext, f: _Facts, unknown: list[str]) -> tuple[int | None, str, Suggestion | None]:
    """(batch size from the error's figures, scaled in proportion, how; or a no-batch-fits suggestion)."""
    fb = format_bytes
    b = ctx.batch_size
    if b is None:
        unknown.append("the batch size in use (pass batch_size, or name it `batch_size` in the notebook)")
        return None, "", None
    if f.needed is None:
        unknown.append("how much the failing step needed (the error gives no allocated or requested figure)")
    if f.usable is None:
        unknown.append("how much memory is usable (the error gives no capacity or free figure)")
    if f.needed is None or f.usable is None:
        return None, "", None
    fixed = f.fixed if f.fixed is not None else 0.0
    room = f.usable * _USABLE
    if room <= fixed:
        return None, "", Suggestion(
            "Free memory first: no batch size fits",
            f"{f.fixed_how} ({fb(round(fixed))}) already fills {_USABLE_PCT} of {f.usable_how} ({fb(round(room))})",
            "batch_size",
        )
    if f.needed <= room:
        return None, "", None  # the figures say this batch fits: the cause is elsewhere
    exact = max(1, math.floor(b * (room - fixed) / (f.needed - fixed)))
    more = "more than " if f.needed_is_lower_bound else ""
    if f.fixed is None:
        unknown.append("how much memory does not grow with the batch (no baseline or fit)")
        assume = " if all memory grows with the batch"
    else:
        assume = f", keeping {f.fixed_how} ({fb(round(fixed))}) fixed"
    how = (
        f"batch {b} needed {more}{fb(f.needed)} ({f.needed_how}) of {fb(f.usable)} usable ({f.usable_how}); "
        f"scaled to {_USABLE_PCT} of that: {exact} samples{assume}"
    )
    return exact, how, None


def _batch_suggestion(ctx: AdviceContext, f: _Facts, unknown: list[str]) -> Suggestion | None:
    """The batch size to use when it can be derived with confidence, else the command that measures it.

    Confident: a trusted fit (a batch-size search), figures that state the whole need, or a lower
    bound (a run that worked, whose line over-counts per sample) within 80% of the upper bound the
    failure gives. An upper bound alone is shown as a bound, never as the size to use.
    """
    if ctx.batch_dependent is False:
        return None
    b = ctx.batch_size
    now = f" (now {b})" if b is not None else ""
    if ctx.batch_literal is not None:
        now += f": change {ctx.batch_literal} in the cell"
    elif ctx.batch_variable is not None and not ctx.batch_variable.isidentifier():
        now += f": set {ctx.batch_variable}"  # cfg['bs'], args.batch_size
    fit, fit_how, stop = _exact_fit(ctx, f, unknown)
    if stop is not None:
        return stop
    upper, upper_how, stop = _upper_bound(ctx, f, [] if fit is not None else unknown)
    if fit is not None and ctx.fit_source != "run":
        return Suggestion(f"Use batch size {fit}{now}", fit_how + _form_note(b, fit), "batch_size", batch_size=fit)
    if stop is not None:
        return stop
    lower = fit
    if lower is not None and ((b is not None and lower >= b) or (upper is not None and lower > upper)):
        lower = None  # the earlier run's line contradicts this failure: it does not describe this run
    if upper is not None and not f.needed_is_lower_bound:
        detail = upper_how + _form_note(b, upper)
        return Suggestion(f"Use batch size {upper}{now}", detail, "batch_size", batch_size=upper)
    if lower is not None and upper is not None and lower >= _TIGHT * upper:
        detail = f"{fit_how}, by a line through the peak of a run that worked at a smaller size (a lower " \
                 f"bound); the failure allows at most {upper}" + _form_note(b, lower)
        return Suggestion(f"Use batch size {lower}{now}", detail, "batch_size", batch_size=lower)
    fb = format_bytes
    bounds = []
    if lower is not None and ctx.bytes_per_sample is not None:
        bounds.append(f"at least {lower} (a run that worked at a smaller size: at most "
                      f"{fb(round(ctx.bytes_per_sample))} per sample)")
    if upper is not None and f.needed is not None:
        bounds.append(f"at most {upper} (batch {b} needed more than {fb(f.needed)}; the step failed part-way)")
    known = ("samples fit: " + " and ".join(bounds)) if bounds else "the figures give no size"
    if ctx.measure_code:
        return Suggestion(
            "Measure the batch size that fits", f"{known}. This tries a few sizes of the failed cell on the same "
            "device and budget, puts the model and data back, and recommends a size" + _kept_note(ctx),
            "measure", code=_measure_code(ctx),
        )
    if lower is not None:
        return Suggestion(f"Use batch size {lower}{now}", "; ".join(bounds), "batch_size", batch_size=lower)
    if upper is not None:
        # an upper bound is never the size to use: the step failed part-way, so the rest of it (the
        # backward, the optimizer step) may need more; say so, and how to measure one that fits
        var = ctx.batch_variable
        how = f"`%find_batch --var {var}` measures the size that fits" if var and var.isidentifier() else (
            "to measure the size that fits, let the code that builds the batches read a variable "
            "(`bs = ...`) and run `%find_batch --var bs`")
        return Suggestion(
            f"At most {upper} samples can fit{now}: a bound, not a size known to fit",
            f"{known}; a smaller size can still run out of memory later in the step; {how}", "bound",
        )
    return None


def _form_note(b: int | None, exact: int) -> str:
    if b is None:
        return ""
    if b & (b - 1) == 0 and exact > 1:
        return f"; the power of two below is {1 << (exact.bit_length() - 1)}"
    return ""


_ACCUMULATION_CODE: Final = """\
for i, (x, y) in enumerate(loader):  # DataLoader(..., batch_size={micro})
    loss = loss_fn(model(x), y) / {k}
    loss.backward()
    if (i + 1) % {k} == 0:
        optimizer.step()
        optimizer.zero_grad()"""


def _accumulation_code(ctx: AdviceContext, micro: int, k: int) -> str:
    """The accumulation loop, written with the failing loop's own code where it is known."""
    names = dict(ctx.loop)
    if not {"loop", "body", "optimizer"} <= names.keys():
        return _ACCUMULATION_CODE.format(micro=micro, k=k)
    opt = names["optimizer"]
    body = "\n".join("    " + line for line in names["body"].replace("__accumulation_steps__", str(k)).splitlines())
    return (
        f"{names['loop']}  # batch size {micro}\n{body}\n"
        f"    if (i + 1) % {k} == 0:\n"
        f"        {opt}.step()\n"
        f"        {opt}.zero_grad()"
    )


def _accumulation_suggestion(ctx: AdviceContext, fits: int | None, torch_code: bool) -> Suggestion | None:
    """Keep the effective batch: micro-batches that fit, gradients accumulated over k steps."""
    effective = ctx.effective_batch_size
    if effective is None and ctx.batch_size is not None:
        effective = ctx.batch_size * (ctx.accumulation_steps or 1)
    if effective is None or effective <= 1:
        return None
    if fits is None:
        # no micro-batch is known to fit: the search finds it, with the accumulation steps
        if not (ctx.measure_code and ctx.measure_code.startswith("%find_batch")):
            return None
        return Suggestion(
            f"Keep the effective batch {effective} with gradient accumulation",
            "the search finds the largest micro-batch that fits and the accumulation steps that reach "
            f"{effective}, with the learning-rate rule",
            "accumulation",
            code=f"{ctx.measure_code} --effective {effective}",
        )
    if fits < 1 or fits >= effective:
        return None
    micro, k = accumulation_plan(effective, fits)
    return Suggestion(
        f"Keep the effective batch {effective} with micro-batch {micro} × {k} accumulation steps",
        lr_note(effective, micro * k, ctx.optimizer),
        "accumulation",
        batch_size=micro,
        accumulation_steps=k,
        code=_accumulation_code(ctx, micro, k) if torch_code else None,
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


@dataclass(frozen=True)
class _In:
    """What every rule reads."""

    info: OOMInfo | None
    ctx: AdviceContext
    facts: _Facts
    shortfall: int | None
    torch_code: bool
    batch: Suggestion | None
    fits: int | None


_Made = tuple[Suggestion, bool] | None


def _process_rule(x: _In) -> _Made:
    """Memory other processes hold; strong when it alone covers the shortfall."""
    info, ctx, shortfall = x.info, x.ctx, x.shortfall
    procs, note = _others(info, ctx)
    if not procs:
        return None
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
    return Suggestion(title, detail, "other_processes", code=_NVIDIA_SMI), helps


def _mps_limit_rule(x: _In) -> _Made:
    """The MPS high watermark that stopped the allocation."""
    info = x.info
    if info is None or info.max_allowed is None or info.kind != "mps":
        return None
    fb = format_bytes
    limit = info.max_allowed
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
    return Suggestion("Raise the MPS memory limit", detail, "limit", code=code), True


def _limit_rule(x: _In) -> _Made:
    """A memory fraction (CUDA, HIP, XPU) that stopped the allocation; strong when it binds."""
    info, f = x.info, x.facts
    if info is None or info.max_allowed is None or info.kind == "mps":
        return None
    fb = format_bytes
    limit = info.max_allowed
    total = info.total_capacity
    if total is None or limit >= total:
        return None
    fraction = limit / total
    mod = "xpu" if info.device_type == "xpu" else "cuda"
    detail = f"a memory fraction of {fraction:.2f} caps PyTorch at {fb(limit)} of {fb(total)}"
    code = f"torch.{mod}.set_per_process_memory_fraction(1.0)"
    if f.needed is not None and f.needed / total > fraction:
        target = min(1.0, f.needed / total + 0.005)
        detail += f"; {fb(f.needed)} needs at least {target:.2f}"
        code = f"torch.{mod}.set_per_process_memory_fraction({target:.2f})"
    binding = info.allocated_by_pytorch is None or info.free is None or limit < info.allocated_by_pytorch + info.free
    return Suggestion(f"Raise the memory fraction ({fraction:.2f} now)", detail, "limit", code=code), binding


def _fragmentation_rule(x: _In) -> _Made:
    """Reserved-but-unallocated memory the caching allocator could not hand out as one block."""
    info = x.info
    if info is None or info.device_type not in ("cuda", "hip") or info.kind == "cuda_malloc_async":
        return None
    unalloc, reserved = info.reserved_unallocated, info.reserved_total
    if unalloc is None or reserved is None or not (unalloc > 0.2 * reserved or unalloc > GiB):
        return None
    fb = format_bytes
    var = "PYTORCH_HIP_ALLOC_CONF" if info.device_type == "hip" else "PYTORCH_CUDA_ALLOC_CONF"
    strong = info.tried_to_allocate is not None and unalloc >= info.tried_to_allocate
    than = f", more than the {fb(info.tried_to_allocate)} requested" if strong and info.tried_to_allocate else ""
    detail = (
        f"{fb(unalloc)} of the {fb(reserved)} PyTorch reserved is cached but unallocated{than}; expandable "
        f"segments grow blocks instead of splitting them. {var} must be set before CUDA starts: restart the kernel"
    )
    code = f'import os\nos.environ["{var}"] = "expandable_segments:True"  # first cell, before importing torch'
    return Suggestion("Avoid fragmentation with expandable segments", detail, "fragmentation", code=code), strong


def _holders_rule(x: _In) -> _Made:
    """Memory held by names from earlier cells that the failing cell does not use; strong when it
    alone covers the shortfall (only such names are listed: what the cell uses cannot be freed)."""
    info, ctx, shortfall = x.info, x.ctx, x.shortfall
    fb = format_bytes
    held = sorted(ctx.holders, key=lambda h: -h[1])
    if not held:
        return None
    top = held[:5]
    total = sum(n for _, n in held)
    more = f", and {len(held) - 5} more" if len(held) > 5 else ""
    title = f"Free memory held by notebook variables this cell does not use ({fb(total)})"
    detail = ", ".join(f"{name}: {fb(n)}" for name, n in top) + more + "; delete the ones you no longer need"
    lines = [f"del {', '.join(name for name, _ in top)}  # keep what you still need", "import gc; gc.collect()"]
    device_type = None if info is None or info.simulated else info.device_type
    if device_type in ("cuda", "hip"):
        lines.append("torch.cuda.empty_cache()")
    elif device_type in ("mps", "xpu"):
        lines.append(f"torch.{device_type}.empty_cache()")
    helps = shortfall is not None and 0 < shortfall <= total
    f = x.facts
    if helps and ctx.batch_dependent and f.needed is not None and f.usable is not None:
        # the failed allocation is only part of what a step that grows with the batch needs: freeing
        # ranks first only when the step's known need fits the memory freed plus what was usable
        helps = f.needed <= (f.usable + total) * _USABLE
    if helps and shortfall is not None:
        detail += f"; the allocation was short by {fb(shortfall)}"
    return Suggestion(title, detail, "holders", code="\n".join(lines)), helps


def _measure_code(ctx: AdviceContext) -> str | None:
    """The measuring command, after deleting the failed cell's kept results: a rerun of the cell
    computes them again, but until it rebinds a name (``out = model(x)`` rebinds ``out`` only after
    the forward) the old value would share the memory the trials measure."""
    names = [n for n, _ in _rebound_kept(ctx)]
    if not ctx.measure_code or not names:
        return ctx.measure_code
    return f"del {', '.join(names)}  # the failed cell's results; running it computes them again\n{ctx.measure_code}"


def _rebound_kept(ctx: AdviceContext) -> list[tuple[str, int]]:
    """Kept results a rerun of the cell binds before it reads them: deleting those loses nothing."""
    return [(n, b) for n, b in ctx.kept if n in ctx.rerun_binds_first]


def _kept_note(ctx: AdviceContext) -> str:
    kept = _rebound_kept(ctx)
    if not kept or not ctx.measure_code:
        return ""
    return (f"; it first deletes the failed cell's kept results ({format_bytes(sum(b for _, b in kept))}), "
            "which would otherwise stay alive during the trials until the cell rebinds them")


def _kept_rule(x: _In) -> _Made:
    """The failed cell's own results, kept after the error: deleting them frees their memory for
    the cells run next. Never strong: a rerun of the failed cell computes them again."""
    kept = x.ctx.kept
    total = sum(n for _, n in kept[:5])
    if not kept or x.shortfall is None or not 0 < x.shortfall <= total:
        return None  # only when freeing them is what would make the allocation fit
    if x.ctx.batch_dependent:
        return None  # a training loop's batch and outputs: its next run rebinds them before its peak
    fb = format_bytes
    names = [n for n, _ in kept[:5]]
    what = ", ".join(f"{n}: {fb(b)}" for n, b in kept[:5])
    return Suggestion(
        f"`del {', '.join(names)}` frees {fb(total)}",
        f"results the failed cell computed ({what}) are kept, without their autograd graph: gpumagic never "
        "deletes a value. Delete the ones you no longer need before running other cells; a rerun of the failed "
        "cell computes them again, so it does not need this",
        "kept_results",
        code=f"del {', '.join(names)}",
    ), False


def _baseline_rule(x: _In) -> _Made:
    """What existed before the cell already fills the device: no change inside the cell can fit."""
    ctx, f = x.ctx, x.facts
    base = ctx.baseline_bytes
    if base is None or f.usable is None or base < f.usable:
        return None
    fb = format_bytes
    named = sorted(ctx.holders, key=lambda h: -h[1])[:5]
    detail = (
        f"{fb(base)} was held before the cell ran, more than {fb(f.usable)} ({f.usable_how}): the models and data "
        "of earlier cells do not fit, so no batch size or change inside this cell can. Free memory held by "
        "earlier cells, or give a larger budget"
    )
    code = f"del {', '.join(n for n, _ in named)}\nimport gc; gc.collect()" if named else "%gpumem --free"
    return Suggestion("What existed before the cell does not fit", detail, "baseline", code=code), True


def _held_before_rule(x: _In) -> _Made:
    """Memory held before the cell when no names are known: the model and data the cell may use."""
    ctx = x.ctx
    if ctx.holders or not ctx.baseline_bytes:
        return None
    return Suggestion(
        f"Free memory held before this cell ({format_bytes(ctx.baseline_bytes)})",
        "models and data from earlier cells, which this cell may be using; `%gpumem --free` collects "
        "garbage and shows which names hold it",
        "holders",
        code="%gpumem --free",
    ), False


def _mixed_precision_rule(x: _In) -> _Made:
    """Autocast, with the saving when the activation size is known."""
    info, ctx = x.info, x.ctx
    if _is_host(info) or ctx.mixed_precision is True or ctx.batch_dependent is False or ctx.remedies is not None:
        return None  # planned remedies say it with numbers (_planned_remedy_rule)
    act = ctx.activation_bytes
    device_type = "cuda" if info is None or info.device_type in (None, "hip") else info.device_type
    saving = f"about {format_bytes(act // 2)}" if act else "about half of the activations (their size is unknown)"
    # evaluation has no backward: autocast wraps the forward alone, and no GradScaler is needed
    scaler = ", or float16" if ctx.evaluation else ", float16 with a GradScaler"
    body = "    out = model(x)" if ctx.evaluation else "    loss = loss_fn(model(x), y)\nloss.backward()"
    return Suggestion(
        "Use mixed precision (autocast)" if x.torch_code else "Use mixed precision",
        f"16-bit activations save {saving}; bfloat16 where the hardware has it{scaler}",
        "mixed_precision",
        code=(
            f'with torch.autocast(device_type="{device_type}", dtype=torch.bfloat16):\n' + body
            if x.torch_code
            else None
        ),
    ), False


def _checkpointing_rule(x: _In) -> _Made:
    """Activation checkpointing: recompute in backward instead of keeping."""
    if _is_host(x.info) or x.ctx.batch_dependent is False or x.ctx.evaluation:  # no backward: nothing to recompute
        return None
    if x.ctx.remedies is not None:
        return None  # planned remedies say it with numbers (_planned_remedy_rule)
    act = x.ctx.activation_bytes
    saving = f"most of the {format_bytes(act)} of activations" if act else "an unknown part of the activations"
    return Suggestion(
        "Checkpoint activations",
        f"recompute them in backward instead of keeping them: saves {saving}, for about 30% more compute",
        "checkpointing",
        code=(
            "from torch.utils.checkpoint import checkpoint\nh = checkpoint(block, h, use_reentrant=False)"
            if x.torch_code
            else None
        ),
    ), False


def _generic_batch_rule(x: _In) -> _Made:
    """A smaller batch when nothing better is known and the batch may be the cause."""
    ctx, f = x.ctx, x.facts
    if x.batch is not None or ctx.batch_dependent is False:
        return None
    if f.needed is not None and f.usable is not None and f.needed <= f.usable * _USABLE:
        return None  # the figures say the need fits: the cause is elsewhere
    now = f" (now {ctx.batch_size})" if ctx.batch_size is not None else ""
    if ctx.measure_code:
        return Suggestion(
            f"Measure the batch size that fits{now}",
            "the figures to compute one are missing; this measures the largest that fits" + _kept_note(ctx),
            "measure", code=_measure_code(ctx),
        ), False
    return Suggestion(
        f"Use a smaller batch size{now}",
        "the figures to compute one are missing; `%find_batch` measures the largest that fits",
        "batch_size",
    ), False


def _allocation_rule(x: _In) -> _Made:
    """One allocation that the batch size does not drive, or that cannot fit on its own."""
    info, ctx, f = x.info, x.ctx, x.facts
    tried = info.tried_to_allocate if info is not None else None
    if tried is None or _is_host(info):
        return None
    alone = f.usable is not None and tried > f.usable * _USABLE
    if ctx.batch_dependent or (ctx.batch_dependent is None and not alone):
        return None  # the batch may drive this allocation: batch advice covers it
    fb = format_bytes
    where = f" ({ctx.where})" if ctx.where else ""
    if alone and f.usable is not None:
        why = f"on its own it is more than the {fb(f.usable)} usable ({f.usable_how})"
    else:
        free = info.free if info is not None else None
        why = (f"only {fb(free)} was free" if free is not None else "it did not fit") + \
            "; the code reads no batch size, so a smaller batch will not help"
    detail = (
        f"{fb(tried)} requested at once{where}: {why}. Make that tensor smaller (its shape), store it in "
        "16 bits (half the bytes), or keep it on the CPU and move parts of it to the device"
    )
    return Suggestion(f"Make the {fb(tried)} allocation fit", detail, "allocation"), True


def _cuda_error_rule(x: _In) -> _Made:
    """Errors from CUDA or its libraries, not from PyTorch's allocator, state no figures."""
    info = x.info
    if info is None or info.kind not in _NO_FIGURES:
        return None
    who = {"cublas": "cuBLAS could not allocate its workspace", "cudnn": "cuDNN could not allocate its workspace"}
    detail = who.get(info.kind, "CUDA itself could not allocate (context, library or kernel memory)")
    detail += ", outside PyTorch's caching allocator: the GPU was already full, often because of another process"
    code = _NVIDIA_SMI
    if info.kind == "cudnn":
        detail += "; cudnn.benchmark tries workspace-hungry algorithms"
        code += "\ntorch.backends.cudnn.benchmark = False"
    return Suggestion("See what fills the GPU", detail, "cuda_error", code=code), True


def _host_rule(x: _In) -> _Made:
    info = x.info
    if not _is_host(info):
        return None
    tried = info.tried_to_allocate if info is not None else None
    what = f"{format_bytes(tried)} could not be allocated in RAM" if tried else "RAM ran out"
    return Suggestion(
        "Use less host memory",
        f"{what}: load data lazily or memory-mapped, use fewer DataLoader workers (each holds a copy of the "
        "dataset object and its prefetched batches) and pin_memory=False",
        "host_memory",
        code="DataLoader(dataset, batch_size=..., num_workers=2, pin_memory=False)",
    ), True


def _batch_rule(x: _In) -> _Made:
    return (x.batch, True) if x.batch is not None else None


def _evaluation_suggestion(ctx: AdviceContext) -> Suggestion:
    """Evaluation needs no gradients, saved activations or optimizer state: its own, larger batch."""
    var = ctx.batch_variable if ctx.batch_variable and ctx.batch_variable.isidentifier() else "batch_size"
    return Suggestion(
        "Find the evaluation batch with `%find_batch --eval`",
        "an evaluation loop holds no gradients, saved activations or optimizer state, so its largest batch is "
        "not the training one (often several times larger); `--eval` measures forward passes only. Keep the two "
        "sizes apart: an evaluation OOM is no reason to shrink the training batch",
        "evaluation",
        code=f"%%find_batch --eval --var {var}\n# the evaluation cell, reading {var}",
    )


def _evaluation_rule(x: _In) -> _Made:
    """An evaluation cell (no backward): its own batch, found with ``--eval``, instead of accumulation."""
    return (_evaluation_suggestion(x.ctx), True) if x.ctx.evaluation else None


def _planned_remedy_rule(x: _In) -> _Made:
    """The remedy whose plan lets the largest batch fit (or saves the most), with its numbers; the
    trade-offs (another optimizer) are never the line, only mentioned."""
    ctx = x.ctx
    if ctx.remedies is None:
        return None
    useful = [r for r in ctx.remedies if r.saved_bytes > 0 and r.accumulation_steps is None]
    if not useful:
        return None
    plain = [r for r in useful if not r.trade_off] or useful
    best = max(plain, key=lambda r: (r.batch_size_that_fits or 0, r.saved_bytes))
    parts = []
    if best.batch_size_that_fits is not None:
        now = ctx.remedies_fits_now
        parts.append(f"batch {best.batch_size_that_fits} then fits" + (
            f" (now {now} fits)" if now is not None else " (as written, no batch fits)"))
    parts.append(f"planned peak {format_bytes(best.peak_bytes)} at the cell's batch")
    detail = "; ".join(parts)
    others = [r for r in useful if r is not best][:3]
    if others:
        detail += "; also planned: " + ", ".join(
            f"{r.name} saves {format_bytes(r.saved_bytes)}" + (" (a trade-off)" if r.trade_off else "") for r in others)
    if best.cost:
        detail += f"; cost: {best.cost}"
    return Suggestion(
        f"{best.name} saves {format_bytes(best.saved_bytes)} on this cell", detail, "remedy",
        batch_size=best.batch_size_that_fits, code=best.code,
    ), best.batch_size_that_fits is not None


def _accumulation_rule(x: _In) -> _Made:
    if x.ctx.evaluation:  # no gradients to accumulate
        return None
    acc = _accumulation_suggestion(x.ctx, x.fits, x.torch_code)
    return (acc, True) if acc is not None else None


@dataclass(frozen=True)
class _Rule:
    """One advice rule: its suggestion scores ``strong`` when it alone addresses the failure (it
    covers the shortfall, or the limit it names is what stopped the allocation), else ``weak``."""

    make: Callable[[_In], _Made]
    strong: int
    weak: int


# Every rule and its scores, in one place; the advice lists suggestions by score (ties keep this order).
_RULES: Final[tuple[_Rule, ...]] = (
    _Rule(_limit_rule, strong=100, weak=40),
    _Rule(_baseline_rule, strong=98, weak=98),
    _Rule(_allocation_rule, strong=95, weak=95),
    _Rule(_fragmentation_rule, strong=90, weak=40),
    _Rule(_process_rule, strong=85, weak=45),
    _Rule(_holders_rule, strong=80, weak=50),
    _Rule(_batch_rule, strong=70, weak=70),
    _Rule(_accumulation_rule, strong=69, weak=69),
    _Rule(_evaluation_rule, strong=69, weak=69),
    _Rule(_mps_limit_rule, strong=65, weak=65),
    _Rule(_cuda_error_rule, strong=60, weak=60),
    _Rule(_host_rule, strong=60, weak=60),
    _Rule(_generic_batch_rule, strong=55, weak=55),
    _Rule(_kept_rule, strong=45, weak=45),
    # after every batch-size line: its code (autocast) may be a pattern to adapt, not a literal line
    _Rule(_planned_remedy_rule, strong=50, weak=32),
    _Rule(_held_before_rule, strong=35, weak=35),
    _Rule(_mixed_precision_rule, strong=30, weak=30),
    _Rule(_checkpointing_rule, strong=20, weak=20),
)

_LAST: list[Advice] = []


def remember(advice: Advice) -> None:
    """Keep ``advice`` as the one :func:`last_advice` returns (called where advice is shown)."""
    _LAST[:] = [advice]


def last_advice() -> Advice | None:
    """The :class:`Advice` last shown for an out-of-memory error in this process, or None.

    >>> last_advice() is None or isinstance(last_advice(), Advice)
    True
    """
    return _LAST[0] if _LAST else None


def advise(info: OOMInfo | str | BaseException | None, context: AdviceContext | None = None) -> Advice:
    """Ranked suggestions for an out-of-memory error, each with numbers derived from what is known.

    ``info`` is what :func:`parse` read, or the error itself (an exception or its text), parsed here.

    >>> info = parse("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 8.00 GiB "
    ...              "of which 1.00 GiB is free. Of the allocated memory 6.00 GiB is allocated by PyTorch, "
    ...              "and 0 bytes is reserved by PyTorch but unallocated.")
    >>> advise(info, AdviceContext(batch_size=64, measure_code="%find_batch --var bs")).suggestions[0].kind
    'measure'
    """
    if isinstance(info, (str, bytes, BaseException)):
        info = parse(info)
    elif info is not None and not isinstance(info, OOMInfo):
        raise TypeError(f"advise() takes an OOMInfo, an exception or its text, got {type(info).__name__}")
    if context is not None and not isinstance(context, AdviceContext):
        raise TypeError(f"advise()'s context must be an AdviceContext or None, got {type(context).__name__}")
    ctx = context or AdviceContext()
    unknown: list[str] = []
    f = _facts(info, ctx)
    shortfall = None
    if info is not None and info.tried_to_allocate is not None and info.free is not None:
        shortfall = info.tried_to_allocate - info.free
    elif f.needed is not None and f.usable is not None:
        shortfall = f.needed - f.usable
    batch = _batch_suggestion(ctx, f, unknown)
    fits = batch.batch_size if batch is not None and batch.kind == "batch_size" else None
    x = _In(info, ctx, f, shortfall, info is None or info.kind in _TORCH_KINDS, batch, fits)
    ranked: list[tuple[int, Suggestion]] = []
    for rule in _RULES:
        made = rule.make(x)
        if made is not None:
            suggestion, strong = made
            ranked.append((rule.strong if strong else rule.weak, suggestion))
    # Families beyond a framework's device allocator (host memory, serving engines, NCCL) bring
    # their own suggestions and displace the ones that cannot change the memory that ran out.
    family = family_advice(info, batch_dependent=ctx.batch_dependent)
    ranked = [(score, s) for score, s in ranked if s.kind not in family.displaces]
    ranked += [(s.score, Suggestion(s.title, s.detail, s.kind, code=s.code)) for s in family.suggestions]
    ranked.sort(key=lambda item: -item[0])  # stable: equal scores keep the table's order
    if "batch_size" in family.displaces:  # what only batch advice needed is not unknown, and no size fits
        unknown.clear()
        fits = None
    elif ctx.remedies is None and ctx.remedies_unplanned:
        unknown.append(f"what autocast or checkpointing would save: {ctx.remedies_unplanned}")
    elif ctx.remedies is None and not _is_host(info) and ctx.batch_dependent is not False and not ctx.activation_bytes:
        unknown.append("the size of the activations (so the saving from autocast or checkpointing)")
    advice = Advice(
        headline=_headline(info),
        suggestions=tuple(s for _, s in ranked),
        unknown=tuple(dict.fromkeys(unknown)),
        fits_batch_size=fits,
        info=info,
        released=ctx.released,
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

"""What-if plans: what each memory remedy would save on this very cell, planned, not guessed.

:func:`plan_what_if` plans the code once as it is (a dry run, :mod:`gpumagic.dryrun`) and once
per remedy that applies to it, each on its own fresh fake copies of the notebook's objects. A
remedy is applied *by construction* to those copies, never by reading or rewriting the user's
source, so it holds for any loop:

* **autocast** (bfloat16; float16 with a GradScaler): autocast is entered at the first module
  call of a step and left when ``backward()`` is called, i.e. around the forward and the loss,
  as the AMP recipe writes it;
* **activation checkpointing**: the model's largest run of repeated blocks (the most numerous
  class of module in one ``ModuleList``/``Sequential``) gets each block's ``forward`` wrapped in
  ``torch.utils.checkpoint.checkpoint``; a Hugging Face model gets ``gradient_checkpointing_enable()``.
  Its compute cost is counted: the plan's FLOPs (``torch.utils.flop_counter``) with and without;
* **zero_grad(set_to_none=True)** where the cell zeroes gradients in place;
* **foreach=False** on optimizers whose foreach implementation runs (its temporaries are per step);
* **SGD with momentum / Adafactor** in place of an Adam-like optimizer when its state is the
  largest part of the peak (a trade-off: other training dynamics, said so, never recommended);
* **gradient accumulation**: the batch knob halved (or more) and the optimizer copies stepping
  and zeroing only every k-th call, so the effective batch is the same;
* **freeing the previous step's outputs** (``del out, loss``) when names of the namespace still
  hold the last step's autograd outputs as the next step starts: they are deleted at that moment.

The batch that then fits needs a capacity (``--budget`` or ``--gpu``) and a batch knob: a
DataLoader or an ``int`` the cell names, equal to the cell's batch size. Peak is affine in the
batch size, so two plans give the line, the largest size under capacity × (1 − margin) is read
off it (the margin %find_batch keeps) and planned once more to confirm it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import keyword
import math
import re
import tokenize
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gpumagic.batchmath import DEFAULT_MARGIN
from gpumagic.report import MemoryReport, Remedy

__all__ = ["plan_what_if"]



@dataclass(frozen=True)
class _Options:
    device: str | None
    gpu: Any
    budget: int | None
    steps: int
    margin: float


@dataclass
class _Seen:
    """What the plan as written saw the code do (filled by the watchers of the first plan)."""

    zero_grad_in_place: bool = False
    autocast: bool = False
    graph_names: list[str] = field(default_factory=list)


@dataclass
class _Plan:
    """One planned run: the namespace with this plan's fake copies, and the as-written facts."""

    ns: MutableMapping[str, Any]
    kind: str
    foreach_default: bool
    seen: _Seen


_Apply = Callable[[_Plan], contextlib.AbstractContextManager[Any]]


@dataclass(frozen=True)
class _Knob:
    """How the batch size is changed: a DataLoader rebuilt, or an int rebound."""

    name: str
    loader: bool

    def set(self, ns: MutableMapping[str, Any], b: int) -> None:
        if self.loader:
            from gpumagic.batch import rebuild_loader

            ns[self.name] = rebuild_loader(ns[self.name], b)
        else:
            ns[self.name] = b

    def says(self, b: int) -> str:
        return f"DataLoader(..., batch_size={b}) for `{self.name}`" if self.loader else f"`{self.name} = {b}`"


@dataclass(frozen=True)
class _Candidate:
    name: str
    applies: Callable[[_Plan, MemoryReport], bool]
    apply: _Apply
    code: Callable[[_Plan, MemoryReport], str]
    notes: tuple[str, ...] = ()
    trade_off: bool = False
    flops: bool = False


# ---------------------------------------------------------------------------------------------
# planning one run


def _run_plan(run: Callable[[], Any], ns: MutableMapping[str, Any], opts: _Options, seen: _Seen,
              apply: _Apply | None = None, knob: _Knob | None = None, b: int | None = None,
              count_flops: bool = False, watch: bool = False) -> tuple[MemoryReport, int | None]:
    from gpumagic.dryrun import DryTracker, run_planned

    tracker = DryTracker(ns, device=opts.device, gpu=opts.gpu, budget=None if opts.gpu else opts.budget,
                         steps=opts.steps)
    flops: int | None = None
    with tracker:
        plan = _Plan(ns, tracker.kind, bool(tracker.target.foreach_optimizers), seen)
        with contextlib.ExitStack() as stack:
            if knob is not None and b is not None:
                knob.set(ns, b)
            if watch:
                stack.enter_context(_watch(plan))
            if apply is not None:
                stack.enter_context(apply(plan))
            counter = stack.enter_context(_FlopMode()) if count_flops else None
            try:
                run_planned(run)
            finally:
                if counter is not None:
                    flops = counter.total
    return tracker.report, flops


class _FlopMode(TorchDispatchMode):
    """Sums the FLOPs of the ops torch.utils.flop_counter knows (matmuls, convolutions, attention).

    Not FlopCounterMode itself: its module tracker's hooks keep a checkpointed block's recomputed
    activations alive, which changes the very peak being planned.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        from torch.utils.flop_counter import flop_registry

        self.registry = flop_registry
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = self.registry.get(func._overloadpacket)
        if count is not None:
            self.total += int(count(*args, **kwargs, out_val=out))
        return out


def _batch_of(report: MemoryReport) -> int | None:
    sizes = [s.batch_size for s in report.steps if s.batch_size is not None]
    return max(sizes) if sizes else None


@contextlib.contextmanager
def _patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    had = name in vars(owner)
    old = vars(owner).get(name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if had:
            setattr(owner, name, old)
        else:
            delattr(owner, name)


@contextlib.contextmanager
def _watch(plan: _Plan) -> Iterator[None]:
    """Record what the code does that decides which remedies apply."""
    import torch.nn.modules.module as modmod
    from torch.optim.optimizer import register_optimizer_step_post_hook

    seen = plan.seen
    ns = plan.ns
    opt_zero = torch.optim.Optimizer.zero_grad
    mod_zero = torch.nn.Module.zero_grad
    ac_enter = torch.amp.autocast_mode.autocast.__enter__
    stepped = [False]

    def opt_zero_grad(self: Any, set_to_none: bool = True) -> None:
        if not set_to_none:
            seen.zero_grad_in_place = True
        opt_zero(self, set_to_none)

    def mod_zero_grad(self: Any, set_to_none: bool = True) -> None:
        if not set_to_none:
            seen.zero_grad_in_place = True
        mod_zero(self, set_to_none)

    def enter(self: Any) -> Any:
        seen.autocast = True
        return ac_enter(self)  # type: ignore[no-untyped-call]

    def after_step(*_: Any) -> None:
        stepped[0] = True

    def pre(module: Any, args: Any) -> None:
        if stepped[0]:
            stepped[0] = False
            for name in _graph_names(ns):
                if name not in seen.graph_names:
                    seen.graph_names.append(name)

    h1 = register_optimizer_step_post_hook(after_step)
    h2 = modmod.register_module_forward_pre_hook(pre)
    try:
        with _patched(torch.optim.Optimizer, "zero_grad", opt_zero_grad), \
                _patched(torch.nn.Module, "zero_grad", mod_zero_grad), \
                _patched(torch.amp.autocast_mode.autocast, "__enter__", enter):
            yield
    finally:
        h1.remove()
        h2.remove()


def _graph_names(ns: MutableMapping[str, Any]) -> list[str]:
    """Names bound to outputs of autograd (a tensor with a grad_fn), or to a tuple/list of them."""
    out = []
    for k, v in list(ns.items()):
        if k.startswith("_"):
            continue
        vals = v if isinstance(v, (tuple, list)) and len(v) <= 8 else (v,)
        if any(isinstance(t, torch.Tensor) and t.grad_fn is not None for t in vals):
            out.append(k)
    return out


# ---------------------------------------------------------------------------------------------
# the remedies, applied on the plan's copies


def _models(ns: MutableMapping[str, Any]) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of the outermost models bound in the namespace (not inside another one)."""
    mods = [(k, v) for k, v in ns.items() if not k.startswith("_") and isinstance(v, torch.nn.Module)]
    inner = {id(m) for _, v in mods for m in list(v.modules())[1:]}
    return [(k, v) for k, v in mods if id(v) not in inner]


def _optimizers(ns: MutableMapping[str, Any]) -> list[tuple[str, torch.optim.Optimizer]]:
    return [(k, v) for k, v in ns.items() if not k.startswith("_") and isinstance(v, torch.optim.Optimizer)]


@contextlib.contextmanager
def _autocast_steps(dtype: torch.dtype, plan: _Plan) -> Iterator[None]:
    """Autocast from the step's first module call to its backward(): the forward and the loss."""
    import torch.nn.modules.module as modmod

    active: list[Any] = []
    backward = torch.autograd.backward

    def pre(module: Any, args: Any) -> None:
        if not active:
            ctx = torch.autocast(plan.kind, dtype=dtype)
            ctx.__enter__()
            active.append(ctx)

    def leave() -> None:
        while active:
            active.pop().__exit__(None, None, None)

    def autograd_backward(*a: Any, **k: Any) -> Any:
        leave()
        return backward(*a, **k)

    h = modmod.register_module_forward_pre_hook(pre)
    try:
        with _patched(torch.autograd, "backward", autograd_backward):
            yield
    finally:
        h.remove()
        leave()


def _autocast_code(dtype: str) -> Callable[[_Plan, MemoryReport], str]:
    def code(plan: _Plan, report: MemoryReport) -> str:
        lines = [f'with torch.autocast("{plan.kind}", dtype=torch.{dtype}):  # the forward and the loss',
                 "    out = model(x)", "    loss = loss_fn(out, y)"]
        if dtype == "float16":
            lines += [f'scaler = torch.amp.GradScaler("{plan.kind}")  # once, before the loop',
                      "scaler.scale(loss).backward(); scaler.step(opt); scaler.update()"]
        else:
            lines.append("loss.backward()")
        return "\n".join(lines)

    return code


def _blocks(plan: _Plan) -> tuple[str, str, list[torch.nn.Module]] | None:
    """(expression of the container, class name, blocks) of the largest run of repeated blocks."""
    best: tuple[int, int, str, str, list[torch.nn.Module]] | None = None
    for name, model in _models(plan.ns):
        for path, mod in model.named_modules():
            if not isinstance(mod, (torch.nn.ModuleList, torch.nn.Sequential)):
                continue
            groups: dict[type, list[torch.nn.Module]] = {}
            for child in mod.children():
                groups.setdefault(type(child), []).append(child)
            for cls, blocks in groups.items():
                # a block is a module of modules (a layer, a stage): one Linear alone saves nothing
                if len(blocks) < 2 or not any(True for _ in blocks[0].children()) or \
                        not any(True for _ in blocks[0].parameters()):
                    continue
                size = sum(p.numel() for b in blocks for p in b.parameters())
                key = (len(blocks), size)
                if best is None or key > best[:2]:
                    best = (*key, _expr(name, path), cls.__name__, blocks)
    return None if best is None else (best[2], best[3], best[4])


def _expr(name: str, path: str) -> str:
    out = name
    for part in path.split(".") if path else []:
        out += f"[{part}]" if part.isdigit() else f".{part}"
    return out


def _hf(plan: _Plan) -> tuple[str, torch.nn.Module] | None:
    for name, model in _models(plan.ns):
        if getattr(model, "supports_gradient_checkpointing", False) and hasattr(model, "gradient_checkpointing_enable"):
            return name, model
    return None


@contextlib.contextmanager
def _checkpoint(plan: _Plan) -> Iterator[None]:
    from torch.utils.checkpoint import checkpoint

    hf = _hf(plan)
    if hf is not None:
        enable: Callable[[], None] = hf[1].gradient_checkpointing_enable  # type: ignore[assignment]
        enable()
    else:
        found = _blocks(plan)
        assert found is not None
        for block in found[2]:  # instance attributes on the plan's copies, which die with the plan
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)  # type: ignore[method-assign]
    yield


def _checkpoint_applies(plan: _Plan, report: MemoryReport) -> bool:
    return _hf(plan) is not None or _blocks(plan) is not None


def _checkpoint_code(plan: _Plan, report: MemoryReport) -> str:
    hf = _hf(plan)
    if hf is not None:
        return f"{hf[0]}.gradient_checkpointing_enable()"
    found = _blocks(plan)
    assert found is not None
    container, cls, blocks = found
    every = len(blocks) == len(list(_container(plan, container).children()))
    it = container if every else f"[m for m in {container} if type(m).__name__ == {cls!r}]"
    return ("import functools, torch.utils.checkpoint\n"
            f"for block in {it}:  # {len(blocks)} × {cls}, once, before the loop\n"
            "    block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, "
            "use_reentrant=False)")


def _container(plan: _Plan, expr: str) -> torch.nn.Module:
    name = re.match(r"\w+", expr)
    assert name is not None
    obj: Any = plan.ns[name.group(0)]
    for attr, idx in re.findall(r"\.(\w+)|\[(\d+)\]", expr[name.end():]):
        obj = getattr(obj, attr) if attr else obj[int(idx)]
    assert isinstance(obj, torch.nn.Module)
    return obj


@contextlib.contextmanager
def _zero_grad_to_none(plan: _Plan) -> Iterator[None]:
    opt_zero = torch.optim.Optimizer.zero_grad
    mod_zero = torch.nn.Module.zero_grad

    def opt_zero_grad(self: Any, set_to_none: bool = True) -> None:
        opt_zero(self, True)

    def mod_zero_grad(self: Any, set_to_none: bool = True) -> None:
        mod_zero(self, True)

    with _patched(torch.optim.Optimizer, "zero_grad", opt_zero_grad), \
            _patched(torch.nn.Module, "zero_grad", mod_zero_grad):
        yield


def _uses_foreach(plan: _Plan, opt: torch.optim.Optimizer) -> bool:
    for g in opt.param_groups:
        if g.get("fused"):
            return False
        if g.get("foreach") or (g.get("foreach") is None and "foreach" in g and plan.foreach_default):
            return True
    return False


@contextlib.contextmanager
def _no_foreach(plan: _Plan) -> Iterator[None]:
    for _, opt in _optimizers(plan.ns):
        for g in opt.param_groups:
            if "foreach" in g:
                g["foreach"] = False
    yield


def _foreach_code(plan: _Plan, report: MemoryReport) -> str:
    names = [n for n, o in _optimizers(plan.ns) if _uses_foreach(plan, o)]
    return "\n".join(f'for g in {n}.param_groups:\n    g["foreach"] = False  # once, before the loop' for n in names)


_ADAM_LIKE = ("Adam", "AdamW", "NAdam", "RAdam", "Adamax")


def _adam(plan: _Plan) -> list[tuple[str, torch.optim.Optimizer]]:
    return [(n, o) for n, o in _optimizers(plan.ns) if type(o).__name__ in _ADAM_LIKE]


def _state_largest(plan: _Plan, report: MemoryReport) -> bool:
    b = report.breakdown
    return bool(_adam(plan)) and b is not None and b.optimizer_state_bytes >= max(
        b.parameters_bytes, b.gradients_bytes, b.other_bytes)


def _replace_optimizer(make: Callable[[list[torch.Tensor], float], torch.optim.Optimizer]) -> _Apply:
    @contextlib.contextmanager
    def apply(plan: _Plan) -> Iterator[None]:
        for name, opt in _adam(plan):
            params = [p for g in opt.param_groups for p in g["params"]]
            new = make(params, float(opt.param_groups[0]["lr"]))
            for k in [k for k, v in plan.ns.items() if v is opt]:
                plan.ns[k] = new
            del name
        yield

    return apply


def _replace_code(ctor: str) -> Callable[[_Plan, MemoryReport], str]:
    def code(plan: _Plan, report: MemoryReport) -> str:
        lines = []
        for n, o in _adam(plan):
            params = f'[p for g in {n}.param_groups for p in g["params"]]'
            lines.append(f"{n} = " + ctor.format(params=params, lr=o.param_groups[0]["lr"]))
        return "\n".join(lines)

    return code


@contextlib.contextmanager
def _free_outputs(plan: _Plan) -> Iterator[None]:
    """Delete the names holding the last step's outputs when the next step's first module call comes."""
    import torch.nn.modules.module as modmod
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stepped = [False]
    names = set(plan.seen.graph_names)

    def after_step(*_: Any) -> None:
        stepped[0] = True

    def pre(module: Any, args: Any) -> None:
        if stepped[0]:
            stepped[0] = False
            for name in names:
                plan.ns.pop(name, None)

    h1 = register_optimizer_step_post_hook(after_step)
    h2 = modmod.register_module_forward_pre_hook(pre)
    try:
        yield
    finally:
        h1.remove()
        h2.remove()


def _accumulate(k: int) -> _Apply:
    @contextlib.contextmanager
    def apply(plan: _Plan) -> Iterator[None]:
        for _, opt in _optimizers(plan.ns):
            calls = [0]
            step, zero = opt.step, opt.zero_grad

            def acc_step(*a: Any, _step: Any = step, _calls: list[int] = calls, **kw: Any) -> Any:
                _calls[0] += 1
                return _step(*a, **kw) if _calls[0] % k == 0 else None

            def acc_zero(*a: Any, _zero: Any = zero, _calls: list[int] = calls, **kw: Any) -> Any:
                return _zero(*a, **kw) if _calls[0] % k == 0 else None

            opt.step = acc_step  # type: ignore[method-assign]
            opt.zero_grad = acc_zero  # type: ignore[method-assign]
        yield

    return apply


def _always(plan: _Plan, report: MemoryReport) -> bool:
    return True


def _candidates(plan: _Plan) -> list[_Candidate]:
    kind = plan.kind
    out: list[_Candidate] = []
    if not plan.seen.autocast:
        out.append(_Candidate("autocast (bfloat16)", _always,
                              functools.partial(_autocast_steps, torch.bfloat16), _autocast_code("bfloat16"),
                              ("the forward and the loss in bfloat16; parameters, gradients and optimizer state "
                               "stay float32",)))
        out.append(_Candidate("autocast (float16) + GradScaler", _always,
                              functools.partial(_autocast_steps, torch.float16), _autocast_code("float16"),
                              ("the GradScaler's own memory (a scale and a flag) is a few bytes and not planned",)))
    out.append(_Candidate("activation checkpointing", _checkpoint_applies, _checkpoint, _checkpoint_code,
                          ("each repeated block keeps only its input; its forward runs again in backward",),
                          flops=True))
    out.append(_Candidate("zero_grad(set_to_none=True)", lambda p, r: p.seen.zero_grad_in_place,
                          _zero_grad_to_none, lambda p, r: "opt.zero_grad(set_to_none=True)  # instead of False",
                          ("gradients are freed between steps instead of zeroed in place",)))
    out.append(_Candidate("optimizer foreach=False",
                          lambda p, r: any(_uses_foreach(p, o) for _, o in _optimizers(p.ns)),
                          _no_foreach, _foreach_code,
                          ("the optimizer updates one tensor at a time: no per-step temporaries for all "
                           "parameters at once; usually slower",)))
    out.append(_Candidate("SGD with momentum instead of Adam", _state_largest,
                          _replace_optimizer(lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9)),
                          _replace_code("torch.optim.SGD({params}, lr={lr}, momentum=0.9)"),
                          ("a trade-off, not a recommendation: one state tensor per parameter instead of two, "
                           "and other training dynamics (the learning rate needs tuning again)",), trade_off=True))
    if hasattr(torch.optim, "Adafactor"):
        out.append(_Candidate("Adafactor (factored state) instead of Adam", _state_largest,
                              _replace_optimizer(lambda ps, lr: torch.optim.Adafactor(ps, lr=lr)),
                              _replace_code("torch.optim.Adafactor({params}, lr={lr})"),
                              ("a trade-off, not a recommendation: row and column statistics instead of a full "
                               "second moment, no first moment; other training dynamics",), trade_off=True))
    out.append(_Candidate("free the previous step's outputs", lambda p, r: bool(p.seen.graph_names),
                          _free_outputs,
                          lambda p, r: f"del {', '.join(p.seen.graph_names)}  # last line of the loop body",
                          ("names that still hold the last step's outputs keep them alive into the next step",)))
    del kind
    return out


# ---------------------------------------------------------------------------------------------
# the batch that fits


def _find_knob(ns: MutableMapping[str, Any], source: str | None, b0: int) -> _Knob | None:
    from torch.utils.data import DataLoader

    # a name the code binds itself (`loader = DataLoader(..., batch_size=bs)`) is rebuilt by it: not a knob
    names = (_names_in(source) - _bound_in(source)) if source is not None else set(ns)
    loaders = [n for n in names if isinstance(ns.get(n), DataLoader) and getattr(ns[n], "batch_size", None) == b0]
    ints = [n for n in names if type(ns.get(n)) is int and ns[n] == b0 and not n.startswith("_")]
    if len(loaders) == 1:
        return _Knob(loaders[0], True)
    if not loaders and len(ints) == 1:
        return _Knob(ints[0], False)
    return None


def _bound_in(source: str) -> set[str]:
    import ast

    try:
        tree = ast.parse(source)
    except SyntaxError:  # IPython syntax (%magics, !shell): nothing known to be bound
        return set()
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}


def _names_in(source: str) -> set[str]:
    try:
        return {t.string for t in tokenize.generate_tokens(io.StringIO(source).readline)
                if t.type == tokenize.NAME and not keyword.iskeyword(t.string)}
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return set(re.findall(r"[A-Za-z_]\w*", source))


def _fits(plan_at: Callable[[int], int | None], b0: int, p0: int, limit: float) -> tuple[int | None, str | None]:
    """Largest batch whose planned peak stays <= limit, from the line through two plans, confirmed."""
    b1 = b0 // 2 if b0 >= 2 else 2
    p1 = plan_at(b1)
    if p1 is None:
        return None, f"not found (the code gave no batch of {b1} when asked for one)"
    slope = (p0 - p1) / (b0 - b1)
    if slope <= 0:
        return None, "not found (the planned peak does not grow with the batch size)"
    pick = math.floor((limit - (p0 - slope * b0)) / slope)
    for _ in range(3):
        if pick < 1:
            return None, f"none (the planned peak at batch 1 is over {_fmt(limit)}, the capacity less the margin)"
        p = plan_at(pick)
        if p is None:
            return None, f"not found (the code gave no batch of {pick}: the data may hold fewer samples)"
        if p <= limit:
            return pick, None
        if pick != b0:  # the secant through the cell's own batch and this one
            slope = (p - p0) / (pick - b0)
        pick = min(pick - 1, math.floor(b0 + (limit - p0) / slope)) if slope > 0 else pick - 1
    return None, "not found (the plans did not settle on a batch size)"


# ---------------------------------------------------------------------------------------------
# the entry point


def plan_what_if(run: Callable[[], Any], namespace: MutableMapping[str, Any], *, device: str | None = None,
                 gpu: Any = None, budget: int | None = None, steps: int = 3, margin: float = DEFAULT_MARGIN,
                 source: str | None = None, fit_all: bool = True,
                 time_limit: float | None = None) -> MemoryReport:
    """Plan ``run`` as written and once per remedy that applies; the plan's report with ``what_if``.

    ``run`` executes the code (reading its objects from ``namespace``); ``source`` is its text,
    used only to find the batch knob (a DataLoader or an int it names). A plan that fails for a
    remedy leaves the remedy out with a note; a failure of the plan as written raises
    :class:`~gpumagic.dryrun.DryRunError`. ``fit_all=False`` finds the batch that then fits only
    for the remedy that saves the most (no trade-off), as the OOM advice needs: fewer plans.
    ``time_limit`` (seconds): no plan starts after it; what was left is named in a note.

    >>> rep = plan_what_if(lambda: exec(cell, ns), ns, device="cpu", budget=2**30, source=cell)  # doctest: +SKIP
    >>> [(r.name, r.saved_bytes) for r in rep.what_if]                                          # doctest: +SKIP
    """
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be >= 0 and < 1, got {margin}")
    from gpumagic.dryrun import one_collection

    with one_collection():  # one full garbage collection for the row of plans, not one per plan
        return _plan_what_if(run, namespace, device=device, gpu=gpu, budget=budget, steps=steps, margin=margin,
                             source=source, fit_all=fit_all, time_limit=time_limit)


def _plan_what_if(run: Callable[[], Any], namespace: MutableMapping[str, Any], *, device: str | None,
                  gpu: Any, budget: int | None, steps: int, margin: float, source: str | None, fit_all: bool,
                  time_limit: float | None) -> MemoryReport:
    import time

    start = time.perf_counter()

    def late() -> bool:
        return time_limit is not None and time.perf_counter() - start > time_limit

    opts = _Options(device, gpu, budget, steps, margin)
    seen = _Seen()
    base, base_flops = _run_plan(run, namespace, opts, seen, count_flops=True, watch=True)
    from gpumagic.dryrun import _target_of, plan_target

    kind, _, capacity = plan_target(device, gpu, None if gpu else budget)  # a budget or a GPU: never host RAM
    b0 = _batch_of(base)
    knob = _find_knob(namespace, source, b0) if b0 is not None else None
    notes: list[str] = []
    limit = None if capacity is None else capacity * (1 - margin)

    # the fit's plans stop after two optimizer steps: the peak is the same from the second step on
    fit_opts = dataclasses.replace(opts, steps=min(steps, 2))

    def plan_at(apply: _Apply | None) -> Callable[[int], int | None]:
        def at(b: int) -> int | None:
            rep, _ = _run_plan(run, namespace, fit_opts, seen, apply, knob, b)
            return rep.peak_bytes if _batch_of(rep) == b else None

        return at

    def fits(apply: _Apply | None, p0: int) -> tuple[int | None, str | None]:
        if limit is None or knob is None or b0 is None:
            return None, None
        return _fits(plan_at(apply), b0, p0, limit)

    skipped: list[str] = []
    now_fits, why = None, None
    if not late():
        try:
            now_fits, why = fits(None, base.peak_bytes)
        except Exception as e:  # a knob that cannot take another size (a custom batch sampler)
            why = f"not found ({_one_line(e)})"
    if why:
        notes.append(f"the batch that fits as written: {why}")
    # which remedies apply is read on the real objects (names, types, groups), never changing them
    probe = _Plan(namespace, kind, bool(_target_of(kind).foreach_optimizers), seen)
    planned: list[tuple[_Candidate, MemoryReport, int | None]] = []
    for cand in _candidates(probe):
        if not cand.applies(probe, base):
            continue
        if late():
            skipped.append(cand.name)
            continue
        try:
            rep, flops = _run_plan(run, namespace, opts, seen, cand.apply, count_flops=cand.flops)
        except Exception as e:  # one remedy that cannot be planned leaves the others
            notes.append(f"{cand.name}: could not be planned ({_one_line(e)})")
            continue
        planned.append((cand, rep, flops))
    useful = [(c, r) for c, r, _ in planned if not c.trade_off and r.peak_bytes < base.peak_bytes]
    best = min(useful, key=lambda cr: cr[1].peak_bytes)[0] if useful else None
    remedies: list[Remedy] = []
    for cand, rep, flops in planned:
        fit, why = None, None
        if (fit_all or cand is best) and not late():
            try:
                fit, why = fits(cand.apply, rep.peak_bytes)
            except Exception as e:
                why = f"not found ({_one_line(e)})"
        cost = None
        if cand.flops:
            if flops is not None and base_flops:
                cost = f"+{100 * (flops - base_flops) / base_flops:.0f}% FLOPs per step (the recomputed forward)"
            else:
                cost = "not measured"
        rnotes = list(cand.notes)
        if why:
            rnotes.append(f"the batch that then fits: {why}")
        remedies.append(Remedy(
            name=cand.name, peak_bytes=rep.peak_bytes, saved_bytes=base.peak_bytes - rep.peak_bytes,
            batch_size_that_fits=fit, code=cand.code(probe, base), notes=tuple(rnotes), cost=cost,
            trade_off=cand.trade_off,
        ))
    if skipped:
        notes.append(f"not planned within the time limit ({time_limit:.0f} s): {', '.join(skipped)}")
    if knob is not None and b0 is not None and b0 >= 2 and fit_all and not late():
        remedies.extend(_accumulation(run, namespace, opts, seen, knob, b0, base, limit, notes))
    if b0 is not None and knob is None and limit is not None:
        notes.append(f"the batch that fits: no batch knob found (a DataLoader or an int equal to {b0} that the "
                     "code names)")
    notes.append("what if: every remedy planned on its own fake copies of the objects; nothing of yours was changed")
    return dataclasses.replace(base, what_if=tuple(remedies), batch_size_that_fits=now_fits,
                               notes=base.notes + tuple(notes))


def _accumulation(run: Callable[[], Any], ns: MutableMapping[str, Any], opts: _Options, seen: _Seen, knob: _Knob,
                  b0: int, base: MemoryReport, limit: float | None, notes: list[str]) -> list[Remedy]:
    """Micro-batches of b0/k, k the smallest power of two that fits (2 without a capacity)."""
    found: tuple[int, int, MemoryReport] | None = None
    k = 2
    try:
        while b0 // k >= 1:
            rep, _ = _run_plan(run, ns, opts, seen, _accumulate(k), knob, b0 // k)
            if rep.total_steps < min(2, base.total_steps):
                # a loop of fixed length makes fewer optimizer steps of k micro-batches: the plan says nothing
                if found is None:
                    notes.append(f"gradient accumulation: not planned (the loop ended after {rep.total_steps} "
                                 f"optimizer step(s) of {k} micro-batches)")
                break
            found = (k, b0 // k, rep)
            if limit is None or rep.peak_bytes <= limit:
                break
            k *= 2
    except Exception as e:
        notes.append(f"gradient accumulation: could not be planned ({_one_line(e)})")
        return []
    if found is None:
        return []
    k, micro, rep = found
    code = (f"# {knob.says(micro)}: micro-batches of {micro}, {k} per optimizer step (effective batch {micro * k})\n"
            "for i, (x, y) in enumerate(loader):\n"
            f"    loss = loss_fn(model(x), y) / {k}\n"
            "    loss.backward()\n"
            f"    if (i + 1) % {k} == 0:\n"
            "        opt.step(); opt.zero_grad()")
    return [Remedy(
        name=f"gradient accumulation ({k} × {micro})", peak_bytes=rep.peak_bytes,
        saved_bytes=base.peak_bytes - rep.peak_bytes, batch_size_that_fits=None, code=code,
        notes=(f"the same effective batch ({micro * k}) in {k} micro-batches of {micro}; the step's "
               "FLOPs are the same, smaller kernels may run slower (not measured)",),
        cost="same FLOPs", micro_batch_size=micro, accumulation_steps=k,
    )]


def _fmt(n: float) -> str:
    from gpumagic.units import format_bytes

    return format_bytes(round(n))


def _one_line(e: BaseException) -> str:
    """``"KeyError: 'x'"``; the exception's frames are dropped (they hold the plan's fake copies)."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    e.__traceback__ = None
    return f"{type(e).__name__}: {first}" if first else type(e).__name__

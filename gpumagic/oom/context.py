"""What the notebook knows when a cell runs out of memory, as an :class:`AdviceContext`.

Pure functions of the namespace, the cell's source (as Python, after IPython's transforms) and
the measurements remembered from earlier runs: which variable holds the batch size, which
DataLoader or prebuilt batches the cell draws from, the line through a run that worked, the
command that measures the size that fits. No IPython here: the magics pass the shell's
namespace and the transformed cell in, and show what comes out.

    >>> names_used({}, "loss = model(x).sum()") >= {"loss", "model", "x"}
    True
"""

from __future__ import annotations

import ast
import contextlib
import re
import traceback
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gpumagic.oom.advice import AdviceContext
from gpumagic.units import IEC_UNITS

__all__ = [
    "Earlier",
    "batch_variable",
    "build_context",
    "device_for",
    "fit_from_report",
    "freed_by_deleting",
    "int_literals",
    "loader_variable",
    "looks_like_evaluation",
    "loop_names",
    "measure_options",
    "measured_the_failing_device",
    "measurement_key",
    "names_used",
    "oom_backend",
    "optimizer_name",
    "prebuilt_batches",
    "rebound_bytes",
    "same_code",
    "same_code_but_numbers",
    "size_arg",
    "user_frame",
]


def optimizer_name(ns: Mapping[str, Any], code: str | None = None, stepped: tuple[str, ...] = ()) -> str | None:
    """The class name of the optimizer the code steps: one that stepped while it ran, else one the
    code (or a function it calls) builds, else one from the namespace that the code uses; None
    when none is known or they disagree (the advice then says the family is unknown).

    >>> optimizer_name({}, "opt = torch.optim.AdamW(model.parameters())")
    'AdamW'
    """
    import torch

    if stepped:
        return stepped[0] if len(set(stepped)) == 1 else None
    classes = {n for n in dir(torch.optim) if isinstance(c := getattr(torch.optim, n), type)
               and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer}
    used = names_used(ns, code)
    built = sorted((used | _attributes(code)) & classes)
    if built:
        return built[0] if len(built) == 1 else None
    found = sorted({type(v).__name__ for n in used if isinstance(v := ns.get(n), torch.optim.Optimizer)})
    return found[0] if len(found) == 1 else None


def _attributes(code: str | None) -> set[str]:
    """Attribute names the code reads (``torch.optim.AdamW`` gives ``optim`` and ``AdamW``)."""
    try:
        tree = ast.parse(code or "")
    except SyntaxError:
        return set()
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}


def names_used(ns: Mapping[str, Any], code: str | None) -> set[str]:
    """Names the code (a cell as Python) reads or binds, and the globals that the functions it
    calls read (two levels deep): advice must not suggest deleting what the cell works with, and
    a batch size read inside ``get_batch()`` is still the cell's batch size."""
    if not code:
        return set()
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return set()
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    todo = [(n, 0) for n in names]
    while todo:
        name, depth = todo.pop()
        fn_code = getattr(ns.get(name), "__code__", None)
        if fn_code is None or depth >= 2 or not isinstance(fn_code, types.CodeType):
            continue
        for inner in _code_names(fn_code):
            if inner not in names:
                names.add(inner)
                todo.append((inner, depth + 1))
    return names


def _code_names(code: types.CodeType) -> set[str]:
    out = set(code.co_names)
    for const in code.co_consts:  # nested functions, comprehensions
        if isinstance(const, types.CodeType):
            out |= _code_names(const)
    return out


_BATCH_NAME = re.compile(r"^(bs|mbs|batch|.*batch_?size.*|.*_bs|batch_?sz)$", re.IGNORECASE)


def _ints_read(ns: Mapping[str, Any], code: str | None) -> dict[str, tuple[str, int]]:
    """Positive ints the code reads, by the expression that reads them: a name (also one a
    function the code calls reads), a dict item with a constant key (``cfg['bs']``) or an
    attribute (``args.batch_size``) of a namespace object -> (the key or attribute name, value)."""
    out: dict[str, tuple[str, int]] = {}

    def ok(v: Any) -> int | None:
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

    for name in names_used(ns, code):
        if (n := ok(ns.get(name))) is not None:
            out[name] = (name, n)
    try:
        tree = ast.parse(code or "")
    except SyntaxError:
        return out
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and \
                isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
            holder = ns.get(node.value.id)
            if isinstance(holder, Mapping) and (n := ok(holder.get(node.slice.value))) is not None:
                out[f"{node.value.id}[{node.slice.value!r}]"] = (node.slice.value, n)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ns:
            holder = ns[node.value.id]
            if isinstance(holder, (type, types.ModuleType)):
                continue  # torch.float16 and the like are no settings of the notebook
            with contextlib.suppress(Exception):  # an attribute that raises is no batch size
                if (n := ok(vars(holder).get(node.attr))) is not None:
                    out[f"{node.value.id}.{node.attr}"] = (node.attr, n)
    return out


def batch_variable(ns: Mapping[str, Any], code: str | None, observed: int | None = None) -> tuple[str, int] | None:
    """The expression the code reads its batch size from, and its value; None when it reads none.

    One rule: among the positive ints the code reads (names, also inside the functions it calls;
    ``cfg['bs']``; ``args.batch_size``), the one whose value is the batch size the steps were
    seen to consume (``observed``: the DataLoader's batch, the inputs' leading dimension); else,
    or when several have that value, the one named like a batch size (``batch_size``, ``bs``,
    ``BATCH_SIZE``, ``train_batch_size``...), ``batch_size`` and ``bs`` first.

    >>> batch_variable({"cfg": {"bs": 64}, "n": 3}, "x = X[:cfg['bs']]")
    ("cfg['bs']", 64)
    >>> batch_variable({"n": 48, "steps": 3}, "for i in range(steps): f(X[:n])", observed=48)
    ('n', 48)
    """
    ints = _ints_read(ns, code)

    def by_name(exprs: list[str]) -> str | None:
        named = [(0 if ints[e][0].lower() in ("batch_size", "bs") else 1, e) for e in exprs
                 if _BATCH_NAME.match(ints[e][0])]
        return min(named)[1] if named else None

    if observed is not None:
        same = sorted(e for e, (_, v) in ints.items() if v == observed)
        if len(same) == 1:
            return same[0], observed
        chosen = by_name(same)
        if chosen is not None:
            return chosen, observed
    chosen = by_name(sorted(ints))
    return (chosen, ints[chosen][1]) if chosen is not None else None


def loader_variable(ns: Mapping[str, Any], used: set[str]) -> tuple[str, int] | None:
    """A DataLoader from an earlier cell that the code iterates: its name and batch size."""
    from torch.utils.data import DataLoader

    for name in sorted(used):
        v = ns.get(name)
        if isinstance(v, DataLoader) and isinstance(v.batch_size, int):
            return name, v.batch_size
    return None


def prebuilt_batches(ns: Mapping[str, Any], used: set[str]) -> tuple[str, int] | None:
    """A list of batches built earlier that the code iterates (``[(x, y), ...]`` or ``[x, ...]``):
    its name and the leading dimension its first batch's tensors share."""
    import torch

    for name in sorted(used):
        v = ns.get(name)
        if not isinstance(v, (list, tuple)) or not v or isinstance(v, str):
            continue
        first = v[0]
        parts = first if isinstance(first, (list, tuple)) else (first,)
        dims = {t.shape[0] for t in parts if isinstance(t, torch.Tensor) and t.dim() > 0}
        if len(dims) == 1 and all(isinstance(t, torch.Tensor) for t in parts):
            return name, dims.pop()
    return None


def size_arg(n: int) -> str:
    """A size as a --budget argument: 96MiB, 2GiB, or bytes."""
    for unit, size in reversed(IEC_UNITS):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def looks_like_evaluation(cell: str | None) -> bool:
    """A cell that runs the model without gradients and never calls backward or an optimizer step."""
    if not cell:
        return False
    no_grad = any(w in cell for w in ("no_grad", "inference_mode", ".generate(", "set_grad_enabled(False)"))
    return no_grad and "backward" not in cell and ".step(" not in cell


def int_literals(code: str | None, value: int) -> int:
    """How many times the integer ``value`` is written as a literal in the code."""
    try:
        tree = ast.parse(code or "")
    except SyntaxError:
        return 0
    return sum(1 for n in ast.walk(tree) if isinstance(n, ast.Constant) and type(n.value) is int and n.value == value)


def same_code(a: str | None, b: str | None) -> bool:
    """The same cell, up to a leading cell-magic line and blank lines or trailing spaces."""
    def norm(c: str | None) -> str:
        lines = (c or "").strip().splitlines()
        if lines and lines[0].lstrip().startswith("%%"):
            lines = lines[1:]
        return "\n".join(line.rstrip() for line in lines if line.strip())

    return norm(a) == norm(b)


def same_code_but_numbers(a: str | None, b: str | None) -> bool:
    """The same cell up to its numbers (a batch size written as a literal, changed between runs)."""
    number = re.compile(r"\b\d+\b")
    return a is not None and b is not None and same_code(number.sub("0", a), number.sub("0", b))


def user_frame(tb: Any) -> str | None:
    """'line 7 in train(): x = model(batch)' for the innermost frame outside torch and gpumagic."""
    frames = traceback.extract_tb(tb)
    for fr in reversed(frames):
        f = fr.filename.replace("\\", "/")
        if "/torch/" in f or "/gpumagic/" in f or "/IPython/" in f:
            continue
        where = f"{fr.name}()" if fr.name != "<module>" else "the cell"
        return f"line {fr.lineno} in {where}: {(fr.line or '').strip()}"
    return None


def fit_from_report(
    report: Any, batch_size: int | None = None, rebound_bytes: int = 0
) -> tuple[float, float] | None:
    """(intercept, bytes per sample) of a line that over-counts memory per sample, from a run that
    worked: through its largest-batch step's peak and the memory before the cell.

    Everything at the peak beyond the memory before the cell is charged to the batch (gradients,
    optimizer state, temporaries of the optimizer step): the slope can only be too steep, so the
    size the line says fits is a lower bound. ``batch_size`` stands for the steps' size when the
    loop does not use a DataLoader. ``rebound_bytes``: what the names the cell rebinds held
    before it (the previous run's batch and outputs, freed during the run): not part of the
    memory that stays, so the line starts below it.
    """
    def size_of(s: Any) -> int | None:  # a size the loop reads beats one guessed from its inputs
        return int(batch_size) if batch_size and getattr(s, "batch_size_guessed", False) else \
            s.batch_size or batch_size

    steps = [s for s in getattr(report, "steps", ()) if size_of(s) and s.peak_bytes and s.count == 1]
    if not steps:
        return None
    step = max(steps, key=lambda s: (size_of(s), s.peak_bytes))
    size = size_of(step)
    assert size is not None
    fixed = float(max(0, report.baseline_bytes - rebound_bytes))
    slope = (step.peak_bytes - fixed) / size
    return (fixed, slope) if slope > 0 else None


def oom_backend(info: Any) -> Any:
    """The backend whose device an out-of-memory message names; None for the host (a simulated OOM,
    a host error, a device no backend claims)."""
    from gpumagic import backends

    device_type = getattr(info, "device_type", None)
    if getattr(info, "simulated", False) or device_type is None:
        return None
    return next((b for b in backends.registry() if device_type in b.oom_device_types), None)


def device_for(info: Any) -> Any:
    """The torch device an out-of-memory message names (the host for a simulated or host OOM);
    None when no backend here can resolve it."""
    import torch

    from gpumagic.devices import resolve_device

    backend = oom_backend(info)
    try:
        if backend is None:
            return torch.device("cpu")
        index = getattr(info, "device_index", None)
        return resolve_device(backend.name if index is None else f"{backend.name}:{index}")
    except ValueError:
        return None


def measure_options(info: Any) -> str:
    """-d/--budget for a cell the global handler saw: the device the message names."""
    if getattr(info, "simulated", False):
        cap = getattr(info, "total_capacity", None)
        return "-d cpu" + (f" --budget {size_arg(cap)}" if cap else "")
    backend = oom_backend(info)
    if backend is None:
        return ""
    index = getattr(info, "device_index", None)
    return f"-d {backend.name}" + (f":{index}" if backend.indexed and index is not None else "")


def measured_the_failing_device(info: Any, report: Any, dev: Any) -> bool:
    """Whether ``report`` measured the device the error is about: its budget, baseline and steps
    describe the failure only then (a "CUDA out of memory" raised by the code inside a cell
    measured on the host says nothing about the host's budget)."""
    if getattr(info, "simulated", False):
        return True  # gpumagic's own budget, on the device the report measured
    label = str(getattr(report, "device", "") or "")
    return dev is not None and label.split(":")[0] == dev.type


_NOT_HOLDERS = frozenset({"exit", "quit", "get_ipython", "In", "_ih", "__builtins__", "__builtin__"})
_NOT_WALKED = (types.ModuleType, type, types.BuiltinFunctionType, types.MethodType, str, bytes, int, float)
_WALK_LIMIT = 200_000  # objects looked at per walk: a namespace with more says less, never wrong by excess


def _reachable_storages(roots: list[Any], device: Any, ns: Mapping[str, Any]) -> dict[int, int]:
    """{storage key: bytes} of every tensor on ``device`` reachable from ``roots`` through the
    objects that refer to it (containers, attributes, closures, a Dataset's tensors, a model's
    parameters and their gradients, an optimizer's state), the namespace itself left out."""
    import gc

    import torch

    from gpumagic._tensors import storages

    out: dict[int, int] = {}
    seen = {id(ns)}
    todo = list(roots)
    while todo and len(seen) < _WALK_LIMIT:
        o = todo.pop()
        kind = type(o)  # type(), not isinstance: an odd object's __class__ may warn or raise
        if id(o) in seen or issubclass(kind, _NOT_WALKED):
            continue
        seen.add(id(o))
        if issubclass(kind, torch.Tensor):
            with contextlib.suppress(Exception):  # an unreadable tensor holds nothing we can count
                if o.device.type == device.type and (device.index is None or o.device.index in (None, device.index)):
                    for key, st in storages(o) or ():
                        out[key] = int(st.nbytes())
                if o.is_leaf and o.grad is not None:  # a non-leaf's .grad warns, and is never set
                    todo.append(o.grad)
            continue
        if issubclass(kind, types.FunctionType):
            # what a function holds is its closure and defaults: its __globals__ is a whole module
            # (a DataLoader's collate_fn reaches torch's), which would use up the walk's limit
            todo.extend(c.cell_contents for c in o.__closure__ or () if _filled(c))
            todo.extend(o.__defaults__ or ())
            todo.extend((o.__kwdefaults__ or {}).values())
            continue
        todo.extend(gc.get_referents(o))
    return out


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018  (an empty cell raises)
    except ValueError:
        return False
    return True


def freed_by_deleting(ns: Mapping[str, Any], names: list[str], device: Any) -> list[tuple[str, int]]:
    """[(name, bytes)] for each of ``names`` that holds memory on ``device`` nothing else holds:
    ``del name`` frees those bytes. A storage that another name also reaches (a ``TensorDataset``
    holding ``X``, a model's parameter, a list that stays) counts for neither; largest first.

    >>> import torch; x = torch.zeros(256)
    >>> freed_by_deleting({"x": x, "y": x[:8], "z": torch.zeros(4)}, ["x", "z"], torch.device("cpu"))
    [('z', 16)]
    """
    names = [n for n in dict.fromkeys(names) if n in ns and n not in _NOT_HOLDERS]
    if not names:
        return []
    rest = [v for k, v in list(ns.items()) if k not in names and k not in _NOT_HOLDERS]
    held = _reachable_storages(rest, device, ns)
    each = {n: _reachable_storages([ns[n]], device, ns) for n in names}
    out = []
    for n, mine in each.items():
        others = set(held).union(*(each[m] for m in names if m != n))
        freed = sum(b for key, b in mine.items() if key not in others)
        if freed:
            out.append((n, freed))
    return sorted(out, key=lambda kv: -kv[1])


@dataclass(frozen=True)
class Earlier:
    """What earlier cells measured, remembered for advice after a later OOM.

    ``report``: the last ``%%gpumem`` report that completed, with the batch variable's value
    during that run (``report_batch``), the bytes the names it rebound held before it
    (``report_rebound``) and its code (``report_cell``); ``search``: the last batch-size search
    and the code it searched over (``search_code``).
    """

    report: Any = None
    report_batch: int | None = None
    report_rebound: int = 0
    report_cell: str | None = None
    search: Any = None
    search_code: str | None = None
    report_key: Any = None
    search_key: Any = None
    """What each measured (:func:`measurement_key`): used only while the key still matches."""

    def current(self, key: Any) -> Earlier:
        """Only the measurements whose key is ``key``: a measurement of the same cell text on another
        model, other data or after ``%reset`` describes something else and is forgotten here."""
        keep_report = key is not None and self.report_key == key
        keep_search = key is not None and self.search_key == key
        return Earlier(
            self.report if keep_report else None, self.report_batch if keep_report else None,
            self.report_rebound if keep_report else 0, self.report_cell if keep_report else None,
            self.search if keep_search else None, self.search_code if keep_search else None,
            self.report_key if keep_report else None, self.search_key if keep_search else None,
        )


_K = "__accumulation_steps__"
"""Where :func:`loop_names` leaves the accumulation steps in the loop body, for the advice to fill in."""


def loop_names(code: str | None) -> tuple[tuple[str, str], ...]:
    """The training loop's own code, for an accumulation snippet: its ``for`` header (counting
    steps in ``i``), its body with the loss divided by ``_K`` (the steps, filled in later) and
    the optimizer's ``step()`` and ``zero_grad()`` left out (the snippet runs them every k
    steps), the name ``backward()`` is called on and the optimizer that steps. Empty when the code has no such loop.

    >>> dict(loop_names("for xb, yb in dl:\\n    l = crit(net(xb), yb)\\n    l.backward()\\n    sgd.step()"))["loop"]
    'for i, (xb, yb) in enumerate(dl):'
    """
    try:
        tree = ast.parse(code or "")
    except SyntaxError:
        return ()
    for node in ast.walk(tree):
        if not isinstance(node, ast.For):
            continue
        calls = [n for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                 and isinstance(n.func.value, ast.Name)]
        backward = [c.func.value.id for c in calls if c.func.attr == "backward"]  # type: ignore[attr-defined]
        step = [c.func.value.id for c in calls if c.func.attr == "step" and not c.args]  # type: ignore[attr-defined]
        if len(set(backward)) != 1 or len(set(step)) != 1:
            continue
        loss, opt = backward[0], step[0]
        body: list[str] = []
        assigned = False
        for stmt in node.body:
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call) and \
                    isinstance(f := stmt.value.func, ast.Attribute) and isinstance(f.value, ast.Name) and \
                    f.value.id == opt and f.attr in ("step", "zero_grad"):
                continue
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name) \
                    and stmt.targets[0].id == loss:
                body.append(f"{loss} = ({ast.unparse(stmt.value)}) / {_K}")
                assigned = True
                continue
            body.extend(ast.unparse(stmt).splitlines())
        if not assigned:
            continue
        it, target = node.iter, node.target
        if isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id == "enumerate" and \
                isinstance(target, ast.Tuple) and len(target.elts) == 2 and it.args:
            it, target = it.args[0], target.elts[1]  # count with our own i
        header = f"for i, {ast.unparse(target)} in enumerate({ast.unparse(it)}):"  # a tuple unparses in parentheses
        return (("loop", header), ("body", "\n".join(body)), ("loss", loss), ("optimizer", opt))
    return ()


def _stored_names(code: str | None) -> set[str]:
    """Names the code assigns (anywhere in it, loops and ``with`` included)."""
    try:
        tree = ast.parse(code or "")
    except SyntaxError:
        return set()
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}


def measurement_key(ns: Mapping[str, Any], code: str | None) -> tuple[Any, ...]:
    """What a run of ``code`` measures, beyond its batch size: the code (up to its numbers) and the
    models, optimizers, tensors and data sets it uses, by identity and shape (parameter count and
    dtypes, tensor shapes, data-set lengths). Objects the code creates itself count by shape only
    (each run makes new ones); tensors it creates, plain numbers and lists of batches not at all
    (they follow the batch size). Two runs with equal keys measured the same thing.

    >>> import torch
    >>> ns = {"model": torch.nn.Linear(4, 2)}
    >>> measurement_key(ns, "model(x)") == measurement_key({"model": torch.nn.Linear(4, 2)}, "model(x)")
    False
    """
    import torch
    from torch.utils.data import DataLoader, Dataset

    created = _stored_names(code)
    parts: list[tuple[Any, ...]] = []
    for name in sorted(names_used(ns, code)):
        v = ns.get(name)
        ident = None if name in created else id(v)
        if isinstance(v, torch.nn.Module):
            params = list(v.parameters())
            dtypes = tuple(sorted({str(p.dtype) for p in params}))
            parts.append((name, "module", ident, type(v).__name__, sum(p.numel() for p in params), dtypes))
        elif isinstance(v, torch.optim.Optimizer):
            count = sum(len(g["params"]) for g in v.param_groups)
            parts.append((name, "optimizer", ident, type(v).__name__, count))
        elif name in created:
            continue
        elif isinstance(v, torch.Tensor):
            parts.append((name, "tensor", ident, tuple(v.shape), str(v.dtype)))
        elif isinstance(v, DataLoader):
            parts.append((name, "loader", id(v.dataset), _length(v.dataset)))
        elif isinstance(v, Dataset):
            parts.append((name, "dataset", ident, _length(v)))
    number = re.compile(r"\b\d+\b")
    return number.sub("0", _normal(code)), tuple(parts)


def rebound_bytes(ns: Mapping[str, Any], code: str | None, device: Any) -> int:
    """Device bytes held now by the names the code assigns (its last run's outputs): freed when a
    new run rebinds them, so not part of the memory that stays."""
    from gpumagic.devices import holders

    stored = _stored_names(code)
    return sum(n for _, n in holders({k: ns[k] for k in stored if k in ns}, device, top=len(stored)))


def _length(data: Any) -> int | None:
    try:
        return len(data)
    except Exception:  # an IterableDataset
        return None


def _normal(code: str | None) -> str:
    return "\n".join(line.rstrip() for line in (code or "").strip().splitlines() if line.strip())


def _guessed_batch(
    report: Any, input_batch: int | None, cell: str | None, code: str | None, earlier: Earlier
) -> tuple[int, tuple[float, float]] | None:
    """(batch size, fit) for a loop that reads no batch variable and draws from no DataLoader:
    the size read from the failing step's inputs, when it is written once as a literal in the
    cell, and a line through a run that worked at a smaller size: an earlier run of the same
    cell (up to its numbers), else the failing run's own completed steps. None otherwise:
    without such a run the size is a guess that nothing confirms."""
    steps = getattr(report, "steps", ())
    b = input_batch
    if b is None:
        sizes = [s.batch_size for s in steps if s.batch_size and s.batch_size_guessed]
        b = sizes[-1] if sizes else None
    if b is None or int_literals(code, b) != 1:
        return None

    def smaller(r: Any) -> bool:
        sizes = [s.batch_size for s in getattr(r, "steps", ()) if s.batch_size_guessed and s.batch_size]
        return bool(sizes) and all(s.batch_size_guessed for s in r.steps if s.batch_size) and max(sizes) < b

    prev = earlier.report
    line = None
    if smaller(prev) and same_code_but_numbers(earlier.report_cell, cell):
        line = fit_from_report(prev, None, earlier.report_rebound)
    if line is None and report is not None and smaller(report):
        line = fit_from_report(report)
    return (b, line) if line is not None else None


class _Order(ast.NodeVisitor):
    """Names in the order the code first reads or binds them, evaluating as Python does: an
    assignment's value before its targets, a loop's iterable before its target."""

    def __init__(self) -> None:
        self.first: dict[str, bool] = {}  # name -> bound (True) or read (False) first

    def visit_Name(self, node: ast.Name) -> None:
        self.first.setdefault(node.id, isinstance(node.ctx, ast.Store))

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        for t in node.targets:
            self.visit(t)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)
        self.visit(node.target)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if isinstance(node.target, ast.Name):
            self.first.setdefault(node.target.id, False)  # read, then written
        self.visit(node.value)

    def visit_For(self, node: ast.For) -> None:
        self.visit(node.iter)
        self.visit(node.target)
        for stmt in (*node.body, *node.orelse):
            self.visit(stmt)

    visit_AsyncFor = visit_For  # type: ignore[assignment]


def bound_before_read(code: str | None) -> frozenset[str]:
    """Names the code binds before it reads them: a rerun computes them afresh, so deleting them
    first loses nothing the rerun needs (``for x, y in loader``'s ``x``; ``out = model(x)``'s
    ``out``; not ``x = x.to(device)``'s ``x``)."""
    if not code:
        return frozenset()
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return frozenset()
    order = _Order()
    order.visit(tree)
    return frozenset(name for name, bound in order.first.items() if bound)


def build_context(
    info: Any, exc: BaseException, *, ns: Mapping[str, Any], cell: str | None, code: str | None,
    report: Any, batch_size: int | None, dev: Any, released: tuple[tuple[str, int], ...],
    measure: str | None, earlier: Earlier, evaluation: bool = False, input_batch: int | None = None,
    bound: tuple[str, ...] = (), stepped: tuple[str, ...] = (),
) -> AdviceContext:
    """The :class:`AdviceContext` for ``exc`` raised by ``cell`` (``code``: the cell as Python).

    ``report``: the failing run's report, ``batch_size`` the size its loader drew, ``dev`` the
    device the message names, ``released`` what was given back after the error, ``measure`` the
    options that reproduce the device and budget, ``input_batch`` the leading dimension of the
    failing step's inputs, ``bound`` the names the failed cell bound or rebound, ``stepped`` the
    class names of the optimizers that stepped while it ran.
    """
    from gpumagic.devices import holders

    earlier = earlier.current(measurement_key(ns, code))
    if report is not None and not measured_the_failing_device(info, report, dev):
        # its figures, and the options that measured it, are another device's
        report, batch_size, input_batch = None, None, None
        measure = measure_options(info) or None
    in_use = names_used(ns, code)
    tracked = batch_size
    if batch_size is None and report is not None:
        sizes = [s.batch_size for s in report.steps if s.batch_size and not s.batch_size_guessed]
        tracked = sizes[-1] if sizes else None
    guessed_sizes = [s.batch_size for s in getattr(report, "steps", ()) if s.batch_size and s.batch_size_guessed]
    observed = tracked or input_batch or (guessed_sizes[-1] if guessed_sizes else None)
    var = batch_variable(ns, code, observed)
    loader = loader_variable(ns, in_use) if var is None else None
    prebuilt = prebuilt_batches(ns, in_use) if var is None and loader is None else None
    if var is not None:
        batch_size = var[1]
    elif tracked is not None:
        batch_size = tracked
    elif loader is not None:
        batch_size = loader[1]
    elif prebuilt is not None:
        batch_size = prebuilt[1]
    dependent = var is not None or loader is not None or tracked is not None or prebuilt is not None
    guessed = None
    if not dependent and not evaluation:
        guessed = _guessed_batch(report, input_batch, cell, code, earlier)
        if guessed is not None:
            batch_size, dependent = guessed[0], True
    # memory held by earlier cells: what the failing cell itself uses is not a candidate; the bytes
    # are what `del` frees (a storage a name the cell uses also reaches, as a TensorDataset holds
    # its tensors, is not freed by deleting)
    held: tuple[tuple[str, int], ...] = ()
    kept: tuple[tuple[str, int], ...] = ()
    rebound: frozenset[str] = frozenset()
    if dev is not None:
        with contextlib.suppress(Exception):  # an object that cannot be walked: advice without these names
            others = {k: v for k, v in ns.items() if k not in in_use}
            held = tuple(freed_by_deleting(ns, [n for n, _ in holders(others, dev, top=50)], dev))
        with contextlib.suppress(Exception):
            kept = tuple(freed_by_deleting(ns, [n for n in bound if n in ns], dev))
            rebound = bound_before_read(code or cell)
    line: tuple[float, float] | None = None
    source = None
    fit = getattr(earlier.search, "fit", None)
    if evaluation and not getattr(earlier.search, "evaluation", False):
        fit = None  # a training measurement says nothing about an evaluation batch
    if fit is not None and earlier.search_code is not None and same_code(earlier.search_code, cell):
        line, source = (fit.intercept_bytes, fit.bytes_per_sample), "search"
    if guessed is not None:
        line, source = guessed[1], "run"
    if line is None and not evaluation:
        # the last run that worked at a smaller batch (steps that completed at the failing size
        # say little: later steps hold more, gradients and optimizer state from the first)
        prev, prev_b = earlier.report, earlier.report_batch
        sizes = [(prev_b if s.batch_size_guessed else s.batch_size) or prev_b or s.batch_size
                 for s in getattr(prev, "steps", ())]
        sizes = [v for v in sizes if v]
        if sizes and batch_size is not None and max(sizes) < batch_size:
            line = fit_from_report(prev, prev_b, earlier.report_rebound)
            source = "run" if line is not None else None
    measure_code = None
    if var is not None and not var[0].isidentifier():
        measure_code = None  # %find_batch --var takes a name: a size in cfg['bs'] is advised, not searched
    elif measure is not None and (var is not None or loader is not None):
        what = f"--var {var[0]}" if var is not None else f"--loader {loader[0]}" if loader else ""
        measure_code = f"%find_batch {what}{' --eval' if evaluation else ''} {measure}".strip()
    processes: tuple[tuple[int, int, str | None], ...] = ()
    backend = oom_backend(info)
    if backend is not None:
        import torch

        # the device the message names, whether or not this process can use it (NVML still answers)
        index = int(getattr(info, "device_index", None) or 0)
        with contextlib.suppress(RuntimeError):  # a registered device torch has no type for
            named = torch.device(backend.name, index) if backend.indexed else \
                torch.device(backend.name)
            processes = tuple((p.pid, p.used_bytes or 0, p.name) for p in backend.processes(named))
    return AdviceContext(
        batch_size=batch_size if dependent else None,
        optimizer=optimizer_name(ns, code, stepped),
        loop=loop_names(code),
        peak_bytes=getattr(earlier.report, "peak_bytes", None),
        baseline_bytes=getattr(report, "baseline_bytes", None),
        capacity_bytes=getattr(report, "budget_bytes", None) or getattr(report, "capacity_bytes", None),
        bytes_per_sample=line[1] if line else None,
        intercept_bytes=line[0] if line else None,
        holders=held,
        kept=kept,
        rerun_binds_first=rebound,
        processes=processes,
        fit_source=source,
        batch_dependent=dependent,
        measure_code=measure_code,
        released=released,
        where=user_frame(exc.__traceback__),
        world_size=getattr(report, "world_size", None),
        batch_literal=str(batch_size) if guessed is not None else None,
        batch_variable=var[0] if var is not None else None,
    )


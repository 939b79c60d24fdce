"""Which batch size trains best: one run per size from the same starting state.

The sweep takes a ``body(b)`` that trains at batch size ``b`` (the magics build it from a
cell). Before anything runs, the state the body can change is saved (:func:`save_state`); then

1. the sizes: given, or from what fits (``find_sizes()``, a ``%find_batch`` search) and smaller
   powers of two about 4x apart, with the data set's size when the whole data set fits;
2. the noise scale (:mod:`gpumagic.noise`): the body runs a few steps at the smallest and the
   largest size with every optimizer step reading the gradient and dropping it, so the
   weights never move, and the state is put back;
3. one run per size: the learning rate of every optimizer the body steps is scaled by the rule
   at its first step (relative to the cell's own learning rate and batch size), each run stops
   after the step that reaches the samples (or seconds) target (a
   :class:`~gpumagic.tracking.StopTrial` from the tracker's step callback), the losses are the
   tracker's (the loop's own), ``val()`` is read after the run, and the state is put back.

An out-of-memory error at one size is that run's result. Any other error of the user's code
ends the sweep with that error, after the state is put back.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from typing import Any, Literal, cast

import torch

from gpumagic._safe import describe
from gpumagic.batch import StateSnapshot, discover_stateful, is_oom, stateful_objects
from gpumagic.batchmath import lr_rule_for, pow2_floor
from gpumagic.devices import DeviceLike, device_label, release_memory, resolve
from gpumagic.noise import GradientNorms, NoiseScale, estimate
from gpumagic.options import BadOptions, SearchOptions, parse_budget
from gpumagic.sweep_results import By, SweepResult, SweepRule, SweepRun
from gpumagic.tracking import StopTrial, Tracker

__all__ = ["LR_RULES", "NOISE_BATCHES", "NOISE_MAX_BATCHES", "NOISE_PRECISION", "batch_sweep", "default_sizes",
           "save_state", "sweep", "sweep_in_namespace"]

LR_RULES = ("auto", "linear", "sqrt", "none")
NOISE_BATCHES = 20
"""Gradients read at least per batch size for the noise scale."""
NOISE_SMALL_FACTOR = 3
"""At the smallest size, at least this many times ``noise_batches`` gradients: a bootstrap over
few noisy norms draws its band too narrow."""
NOISE_MAX_BATCHES = 400
"""Gradients read at most at the smallest size."""
NOISE_PRECISION = 0.12
"""The smallest size's gradients are read until the estimate's 10–90% band is within ±12%."""

_HIGHER_IS_BETTER = ("acc", "score", "f1", "auc", "precision", "recall", "iou", "map", "bleu", "top")


def save_state(objects: Iterable[Any], namespace: MutableMapping[str, Any] | None) -> StateSnapshot:
    """The one place the sweep saves what its runs may change (models, optimizers, schedulers,
    scalers, RNG states, the namespace): ``.restore()`` puts it back and returns what could not
    be; ``.storage_keys`` are the saved copies' storages (not the runs' memory)."""
    return StateSnapshot.take(objects, namespace=namespace)


def default_sizes(largest: int, dataset_size: int | None) -> tuple[list[int], bool]:
    """The largest size that fits (the data set's size when it all fits: ``True``) and smaller
    powers of two about 4x apart; at least three sizes where ``largest`` allows.

    >>> default_sizes(700, None), default_sizes(5000, 2000)
    (([32, 128, 700], False), ([128, 512, 2000], True))
    """
    full = dataset_size is not None and largest >= dataset_size
    top = dataset_size if full and dataset_size is not None else largest
    sizes = [top]
    for spacing in (4, 2):  # 2x apart only where 4x apart leaves fewer than three sizes
        sizes = [top]
        while len(sizes) < 3 and sizes[-1] > 1:
            # the power of two nearest to a quarter (in log scale), always below the last size
            nearest = 2 ** max(0, round(math.log2(sizes[-1] / spacing)))
            sizes.append(min(nearest, pow2_floor(sizes[-1] - 1)))
        if len(sizes) >= 3:
            break
    return sorted(set(sizes)), full


def _factor(rule: str, b: int, base: int | None) -> float:
    if rule == "none" or base is None:
        return 1.0
    return b / base if rule == "linear" else math.sqrt(b / base)


_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")


class _LRScaler:
    """At each optimizer's first step in a run, multiply its learning rates (and its
    schedulers' ``base_lrs``) by the rule's factor; records the rates the run used."""

    def __init__(self, rule: str, b: int, base: int | None, known: Sequence[Any]) -> None:
        self.rule, self.b, self.base = rule, b, base
        self.known = known
        self.seen: set[int] = set()
        self.lrs: list[float] = []
        self.rules: list[str] = []
        self.problems: list[str] = []
        self._handle: Any = None

    def __enter__(self) -> _LRScaler:
        import torch.optim.optimizer as optmod

        self._handle = optmod.register_optimizer_step_pre_hook(self._first_step)
        return self

    def __exit__(self, *exc: object) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.remove()

    def _first_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if id(optimizer) in self.seen:
            return
        self.seen.add(id(optimizer))
        try:
            self._scale(optimizer)
        except Exception as e:  # ours: the run goes on at the rate it has, and the result says so
            self.problems.append(f"could not scale the learning rate of a {type(optimizer).__name__}: "
                                 f"{describe(e)}")

    def _scale(self, optimizer: Any) -> None:
        rule = lr_rule_for(optimizer) if self.rule == "auto" else self.rule
        self.rules.append(rule)
        f = _factor(rule, self.b, self.base)
        if f != 1.0:
            for group in optimizer.param_groups:
                for key in _LR_KEYS:
                    if isinstance(group.get(key), (float, int, torch.Tensor)) and not isinstance(group[key], bool):
                        group[key] = group[key] * f
            for sched in self._schedulers(optimizer):
                sched.base_lrs = [v * f for v in sched.base_lrs]
        self.lrs.extend(float(g["lr"]) for g in optimizer.param_groups)

    def _schedulers(self, optimizer: Any) -> list[Any]:
        kinds = (torch.optim.lr_scheduler.LRScheduler,)
        found = [o for o in self.known if isinstance(o, kinds) and o.optimizer is optimizer]
        if any(o is optimizer for o in self.known):
            return found  # made before the sweep: its schedulers are among the known objects
        from gpumagic._gcscan import instances_of  # made by the code: look for its schedulers

        return [o for o in instances_of(kinds) if getattr(o, "optimizer", None) is optimizer]


def _dataset_size(it: Any) -> int | None:
    ds = getattr(it, "_dataset", None)
    try:
        return len(ds) if ds is not None else None
    except TypeError:
        return None


class _Stop:
    """The run's stopping rule and its per-step axis, fed by the tracker's step callback."""

    def __init__(self, b: int, samples: int | None, seconds: float | None) -> None:
        self.b = b
        self.samples_target = samples
        self.seconds_target = seconds
        self.samples: list[int] = []
        self.seconds: list[float] = []
        self.t0 = time.perf_counter()
        self.dataset_size: int | None = None
        self.tracker: Tracker | None = None
        self.optimizer_steps = False
        """An optimizer steps in this loop: a backward before its first step is no step to stop at."""

    def on_batch(self, it: Any, size: int | None) -> None:
        if self.dataset_size is None:
            self.dataset_size = _dataset_size(it)

    def on_step(self, rec: Any) -> None:
        # a backward before any optimizer step is recorded provisionally, then replaced by the
        # optimizer step with the same index
        del self.samples[rec.index:], self.seconds[rec.index:]
        total = (self.samples[-1] if self.samples else 0) + (rec.batch_size or self.b)
        self.samples.append(total)
        self.seconds.append(time.perf_counter() - self.t0)
        if self.optimizer_steps and self.tracker is not None and self.tracker.optimizer_steps == 0:
            return  # provisional: the optimizer step that follows replaces it
        if self.samples_target is not None and total >= self.samples_target:
            raise StopTrial(f"{total} samples")
        if self.seconds_target is not None and self.seconds[-1] >= self.seconds_target:
            raise StopTrial(f"{self.seconds[-1]:.1f} s")


def _tracker(device: torch.device, backend: Any, budget: int | None, snapshot: StateSnapshot,
             stop_steps: int | None, on_step: Callable[[Any], None]) -> Tracker:
    return Tracker(device, budget, backend=backend, stop_after_steps=stop_steps, exclude_storages=snapshot.storage_keys,
                   on_step=on_step, gather_ranks=False, max_records=10**7)


def _parameters(objects: Sequence[Any]) -> list[torch.Tensor]:
    """The parameters of the known models and optimizers, each once."""
    found: dict[int, torch.Tensor] = {}
    for o in objects:
        if isinstance(o, torch.nn.Module):
            found.update((id(p), p) for p in o.parameters())
        elif isinstance(o, torch.optim.Optimizer):
            found.update((id(p), p) for g in o.param_groups for p in g["params"])
    return list(found.values())


def _fingerprint(params: Sequence[torch.Tensor]) -> list[float] | None:
    """A sum per parameter: equal before and after a measuring run when no weight moved (None
    where a parameter has no values to read, e.g. on the meta device)."""
    try:
        with torch.no_grad():
            return [float(p.detach().double().sum()) for p in params]
    except Exception:
        return None


def _measure_noise(body: Callable[[int], Any], sizes: Sequence[int], *, device: torch.device, backend: Any,
                   budget: int | None, snapshot: StateSnapshot, batches: int, notes: list[str],
                   rule: str, base: int | None,
                   known: Sequence[Any]) -> tuple[NoiseScale | None, str | None, int | None, bool]:
    """(noise scale, why not, data-set size seen, whether an optimizer stepped), from gradients
    read at the starting weights:
    ``batches`` at the largest size that fits, then at the smallest, ``batches`` and more (up to
    :data:`NOISE_MAX_BATCHES`) until the estimate's 10–90% band is within ±:data:`NOISE_PRECISION`.
    The small batches' gradients are the noisy ones, and they are the cheap ones."""
    norms = GradientNorms()
    n_seen: int | None = None
    order = sorted(set(sizes))
    measured: list[int] = []

    too_big: set[int] = set()

    def candidates() -> Iterable[int]:
        for b in reversed(order):  # the largest that fits ...
            if not measured:
                yield b
        for b in order:  # ... then the smallest that fits
            if len(measured) == 1 and b < measured[0] and b not in too_big:
                yield b

    params = _parameters(known)
    before = _fingerprint(params)
    failed: str | None = None
    moved = False
    for b in candidates():
        stop = _Stop(b, None, None)
        small = bool(measured)

        def on_step(rec: Any, stop: _Stop = stop, small: bool = small, seen: int | None = n_seen) -> None:
            norms.step_batch(rec.batch_size or stop.b)
            k = sum(1 for s, _ in norms.norms if s != measured[0]) if small else 0
            if small and k >= NOISE_SMALL_FACTOR * batches and k % 10 == 0:
                got = estimate(norms.norms, seen or stop.dataset_size)
                if not isinstance(got, str) and got.high - got.low <= 2 * NOISE_PRECISION * got.value:
                    raise StopTrial("noise scale precise enough")

        limit = NOISE_MAX_BATCHES if small else batches
        tracker = _tracker(device, backend, budget, snapshot, limit, on_step)
        tracker.on_batch = stop.on_batch
        oom = False
        try:
            # at the run's learning rate, as the runs will be: a loop that reads it sees the same
            # the undo log below the tracker, as in a search's trial: the snapshot puts back every write
            with _LRScaler(rule, b, base, known), norms, snapshot.recording(), tracker:
                body(b)
        except StopTrial:
            pass
        except Exception as e:
            if is_oom(e):
                oom = True
                release_memory(e)
            else:  # the runs show whether the loop fails without the gradients being read, too
                failed = describe(e)
            e.__traceback__ = None
            del e
        finally:
            moved = moved or _fingerprint(params) != before
            for problem in snapshot.restore():
                if problem not in notes:
                    notes.append(problem)
        if failed is not None:
            break
        if oom:
            too_big.update(s for s in order if s >= b)
            continue
        n_seen = n_seen or stop.dataset_size
        if any(s == b for s, _ in norms.norms):
            measured.append(b)
    stepped = norms.steps > 0
    if failed is not None:
        return None, f"the loop failed while its gradients were read ({failed})", n_seen, stepped
    if norms.problem is not None:
        return None, norms.problem, n_seen, stepped
    if moved:
        return (None, "an optimizer changed the weights without gradients (a custom step, or decay applied to "
                "every parameter): the gradients were not all read at the same weights", n_seen, stepped)
    if not norms.norms:
        return None, "no optimizer step read a gradient (no optimizer, or no parameter had a gradient)", n_seen, stepped
    if len(norms.norms) < 3:
        return None, f"too few batches: {len(norms.norms)} gradients read, at least 3 are needed", n_seen, stepped
    got = estimate(norms.norms, n_seen)
    if isinstance(got, str):
        return None, got, n_seen, norms.steps > 0
    return got, None, n_seen, norms.steps > 0


def _run(body: Callable[[int], Any], b: int, *, device: torch.device, backend: Any, budget: int | None,
         snapshot: StateSnapshot, rule: str, base: int | None, samples: int | None, seconds: float | None,
         val: Callable[[], Any] | None, val_problems: list[str], notes: list[str],
         known: Sequence[Any], optimizer_steps: bool) -> tuple[SweepRun, list[str], int | None]:
    stop = _Stop(b, samples, seconds)
    tracker = _tracker(device, backend, budget, snapshot, None, stop.on_step)
    stop.tracker, stop.optimizer_steps = tracker, optimizer_steps
    tracker.on_batch = stop.on_batch
    oom: str | None = None
    scaler = _LRScaler(rule, b, base, known)
    value: float | None = None
    try:
        try:
            with scaler, snapshot.recording(), tracker:
                stop.t0 = time.perf_counter()
                body(b)
        except StopTrial:
            pass
        except Exception as e:
            if not is_oom(e):
                raise
            oom = describe(e)
            release_memory(e)
            e.__traceback__ = None
            del e
        if val is not None and oom is None:
            try:
                value = float(val())
            except Exception as e:  # the validation figure is missing, the sweep goes on
                msg = f"the validation figure (val) failed after the run at batch {b}: {describe(e)}"
                val_problems.append(msg)
    finally:
        for problem in snapshot.restore():
            if problem not in notes:
                notes.append(problem)
    report = tracker.finished_report
    steps = list(report.steps) if report is not None else []
    n = min(len(steps), len(stop.samples))
    losses = tuple(s.loss for s in steps[:n])
    timed = [t1 - t0 for t0, t1 in zip(stop.seconds, stop.seconds[1:], strict=False)]
    sps = None
    if oom is None and len(stop.samples) > 1 and sum(timed[: n - 1]) > 0:
        sps = (stop.samples[n - 1] - stop.samples[0]) / sum(timed[: n - 1])
    for problem in scaler.problems:
        if problem not in notes:
            notes.append(problem)
    run = SweepRun(b, tuple(scaler.lrs), tuple(stop.samples[:n]), tuple(stop.seconds[:n]), losses, value,
                   None if oom is not None or report is None else report.peak_bytes, sps, oom)
    return run, scaler.rules, stop.dataset_size


def _recommend(runs: Sequence[SweepRun], by: By, val_name: str | None, higher: bool,
               noise: NoiseScale | None) -> tuple[int | None, str]:
    ok = [r for r in runs if r.oom is None and r.steps]
    if not ok:
        return None, "no size completed a step: nothing to compare"
    with_val = [r for r in ok if r.val is not None]
    if with_val:
        best = (max if higher else min)(with_val, key=lambda r: cast(float, r.val))
        name = val_name or "validation"
        others = ", ".join(f"{r.batch_size}: {r.val:.4g}" for r in with_val if r is not best)
        why = (f"batch {best.batch_size} reached the best {name} ({best.val:.4g}, "
               f"{'higher' if higher else 'lower'} is better) after {best.total_samples:,} samples"
               + (f" ({others})" if others else ""))
    else:
        xs = [r.total_samples if by == "samples" else r.total_seconds for r in ok]
        until = min(xs)
        at = [(r, r.final_loss(until, by)) for r in ok]
        scored = [(r, v) for r, v in at if v is not None and math.isfinite(v)]
        if not scored:
            return None, "no run recorded a loss (the loop's backward() was not on a scalar)"
        best, loss = min(scored, key=lambda p: p[1])
        span = f"{until:,.0f} samples" if by == "samples" else f"{until:.1f} s"
        others = ", ".join(f"{r.batch_size}: {v:.4g}" for r, v in scored if r is not best)
        why = (f"batch {best.batch_size} reached the lowest loss ({loss:.4g}, smoothed) for {span}"
               + (f" ({others})" if others else ""))
    close = _within_one_percent(ok, best, by, with_val, higher)
    if close:
        why += (f"; {', '.join(map(str, close))} came within 1% of it: per sample they train about as well, "
                "and the larger uses the hardware better")
    if noise is not None:
        b, bn = best.batch_size, noise.value
        if b < bn / 4:
            why += (f"; it is well below the noise scale (≈ {bn:,.0f}): larger batches would still cut the steps "
                    "almost in proportion, using the hardware better for about the same samples")
        elif b > 4 * bn:
            why += (f"; it is well above the noise scale (≈ {bn:,.0f}): a larger batch buys few fewer steps per "
                    "extra sample")
        else:
            why += f"; it is near the noise scale (≈ {bn:,.0f}), the efficient size for both steps and samples"
    return best.batch_size, why


def _within_one_percent(ok: Sequence[SweepRun], best: SweepRun, by: By, with_val: Sequence[SweepRun],
                        higher: bool) -> list[int]:
    """The other sizes whose figure is within 1% of the best one's."""
    if with_val:
        ref = cast(float, best.val)
        got = {r.batch_size: cast(float, r.val) for r in with_val}
    else:
        until = min(r.total_samples if by == "samples" else r.total_seconds for r in ok)
        ref = best.final_loss(until, by) or 0.0
        got = {r.batch_size: v for r in ok if (v := r.final_loss(until, by)) is not None}
    return [b for b, v in got.items() if b != best.batch_size and abs(v - ref) <= 0.01 * abs(ref)]


def sweep(
    body: Callable[[int], Any],
    *,
    objects: Sequence[Any],
    namespace: MutableMapping[str, Any] | None = None,
    sizes: Sequence[int] | None = None,
    find_sizes: Callable[[], Any] | None = None,
    samples: int | None = None,
    seconds: float | None = None,
    lr_rule: str = "auto",
    base_batch_size: int | None = None,
    val: Callable[[], Any] | None = None,
    val_name: str | None = None,
    by: By = "samples",
    device: DeviceLike = None,
    hints: Iterable[Any] = (),
    budget: str | int | None = None,
    noise_batches: int = NOISE_BATCHES,
    progress: Callable[[str], None] | None = None,
) -> SweepResult:
    """The sweep over ``body(b)``; ``objects``: the models, optimizers, schedulers and scalers it
    changes; ``find_sizes()``: a batch-size search (a ``BatchSearchResult``) when ``sizes`` is None;
    ``progress(message)`` hears of each stage as it ends. Errors in the options raise
    :class:`~gpumagic.options.BadOptions` naming the parameter."""
    _check(sizes, samples, seconds, lr_rule, by, noise_batches, base_batch_size)
    bud = parse_budget(budget)
    try:
        backend, dev = resolve(device, hints if device is None else ())
    except ValueError as e:
        raise BadOptions(str(e)) from None
    notes: list[str] = []
    full = False
    dataset_size: int | None = None
    if sizes is None:
        if find_sizes is None:
            raise BadOptions("give `sizes`, or a way to find what fits")
        found = find_sizes()
        top = found.recommended_batch_size or found.max_batch_size
        if top is None:
            raise BadOptions(f"no batch size fits ({found.reason}); give `sizes` explicitly")
        dataset_size = found.dataset_size
        chosen, full = default_sizes(top, dataset_size)
        notes.append(f"sizes chosen from what fits: {top} is the largest the search recommends"
                     + (f", capped at the data set's {dataset_size:,} samples" if full else "")
                     + ", and smaller powers of two about 4x apart")
        sizes = chosen
    order = sorted(set(int(s) for s in sizes))
    snapshot = save_state(objects, namespace)
    runs: list[SweepRun] = []
    rules: list[str] = []
    val_problems: list[str] = []
    try:
        noise, noise_why, seen, stepped = _measure_noise(body, order, device=dev, backend=backend, budget=bud,
                                                snapshot=snapshot, batches=noise_batches, notes=notes,
                                                rule=lr_rule, base=base_batch_size, known=objects)
        dataset_size = dataset_size or seen
        if progress is not None:
            progress(f"noise scale {noise.value:,.0f}" if noise is not None else f"no noise scale: {noise_why}")
        has_optimizer = any(isinstance(o, torch.optim.Optimizer) for o in objects)
        target = samples
        if samples is None and seconds is None and dataset_size is not None:
            target = dataset_size
            notes.append(f"each run sees one pass over the data set ({dataset_size:,} samples)")
        for b in order:
            run, used, seen = _run(body, b, device=dev, backend=backend, budget=bud, snapshot=snapshot,
                                   rule=lr_rule, base=base_batch_size, samples=target, seconds=seconds, val=val,
                                   val_problems=val_problems, notes=notes, known=objects,
                                   optimizer_steps=stepped or has_optimizer)
            dataset_size = dataset_size or seen
            if target is None and seconds is None and run.oom is None and run.total_samples:
                target = run.total_samples  # no data set length: the first run's samples set the target
                notes.append(f"the loop has no data set length: batch {b} ran to the loop's end "
                             f"({target:,} samples) and the other runs stopped at as many")
            runs.append(run)
            rules.extend(used)
            if target is not None and seconds is None and run.oom is None and run.total_samples < target:
                notes.append(f"batch {b}: the loop ended after {run.total_samples:,} samples, before the "
                             f"{target:,} the runs were to see")
            if progress is not None:
                progress(f"batch {b}: " + (f"out of memory after {run.steps} steps" if run.oom else
                                           f"{run.total_samples:,} samples in {run.steps:,} steps, "
                                           f"{run.total_seconds:.1f} s"))
    finally:
        for problem in snapshot.restore():
            if problem not in notes:
                notes.append(problem)
    notes.extend(val_problems)
    if dataset_size is not None and max(order) >= dataset_size:
        full = True
    rule, rule_why = _rule_said(lr_rule, rules, base_batch_size)
    higher = bool(val_name) and any(w in (val_name or "").lower() for w in _HIGHER_IS_BETTER)
    recommended, why = _recommend(runs, by, val_name, higher, noise)
    if val is not None and val_name is None:
        val_name = "val"
    return SweepResult(
        runs=tuple(runs), recommended=recommended, why=why, lr_rule=cast(SweepRule, rule), lr_rule_why=rule_why,
        base_batch_size=base_batch_size, noise_scale=noise, noise_scale_why=noise_why, by=by,
        samples_target=target if seconds is None else None, seconds_target=seconds, val_name=val_name,
        val_higher_is_better=higher, dataset_size=dataset_size, full_batch=full,
        device=device_label(backend, dev), notes=tuple(notes),
    )


def _rule_said(asked: str, used: list[str], base: int | None) -> tuple[str, str]:
    if asked == "none":
        return "none", "asked for"
    if not used:
        return "none", "no optimizer stepped"
    if base is None:
        return "none", "the cell's batch size is not known, so the learning rate was left as the cell set it"
    kinds = sorted(set(used))
    rule = kinds[0] if len(kinds) == 1 else "linear"
    if asked != "auto":
        return rule, f"asked for, relative to the cell's batch {base}"
    how = {"sqrt": "square root of the batch ratio, for an adaptive (Adam-like) optimizer",
           "linear": "in proportion to the batch ratio, for an SGD-like optimizer"}
    if len(kinds) > 1:
        return rule, "by optimizer family: " + "; ".join(how[k] for k in kinds) + f"; relative to batch {base}"
    return rule, f"{how[rule]}, relative to the cell's batch {base}"


def _check(sizes: Sequence[int] | None, samples: int | None, seconds: float | None, lr_rule: str, by: str,
           noise_batches: int, base: int | None) -> None:
    if sizes is not None:
        bad = [s for s in sizes if not isinstance(s, int) or isinstance(s, bool) or s < 1]
        if bad or not sizes:
            raise BadOptions(f"`sizes` must be integers >= 1, got {list(sizes)}")
    if samples is not None and seconds is not None:
        raise BadOptions("give either `samples` or `seconds`, not both")
    if samples is not None and samples < 1:
        raise BadOptions(f"`samples` must be >= 1, got {samples}")
    if seconds is not None and not seconds > 0:
        raise BadOptions(f"`seconds` must be > 0, got {seconds}")
    if lr_rule not in LR_RULES:
        raise BadOptions(f"`lr_rule` must be one of {', '.join(LR_RULES)}, got {lr_rule!r}")
    if by not in ("samples", "time"):
        raise BadOptions(f"`by` must be 'samples' or 'time', got {by!r}")
    if noise_batches < 2:
        raise BadOptions(f"`noise_batches` must be >= 2, got {noise_batches}")
    if base is not None and base < 1:
        raise BadOptions(f"`base_batch_size` must be >= 1, got {base}")


def batch_sweep(
    train_fn: Callable[[int], Any],
    *,
    sizes: Sequence[int] | None = None,
    samples: int | None = None,
    seconds: float | None = None,
    lr_rule: Literal["auto", "linear", "sqrt", "none"] = "auto",
    base_batch_size: int | None = None,
    val: Callable[[], Any] | None = None,
    val_name: str | None = None,
    by: By = "samples",
    device: DeviceLike = None,
    budget: str | int | None = None,
    restore: Iterable[Any] | None = None,
    noise_batches: int = NOISE_BATCHES,
) -> SweepResult:
    """Train at several batch sizes from the same start and say which trains best.

    ``train_fn(batch_size)`` runs the training; each size gets one run, stopped after the step
    that reaches ``samples`` (or ``seconds``; default one pass over the DataLoader's data set).
    ``lr_rule``: how every optimizer's learning rate follows the batch, relative to the rate it
    has and ``base_batch_size`` (the batch it was tuned for; without it the rate is left alone):
    "auto" is "sqrt" for adaptive (Adam-like) optimizers and "linear" for SGD-like ones.
    ``val()``: a number read after each run (``val_name`` says what it is; a name like
    "accuracy" means higher is better). Models, optimizers, schedulers and scalers (``restore``,
    or found through the optimizers alive now) and the RNG states are put back afterwards.
    Without ``sizes`` they are chosen from what fits (needs ``budget`` on the CPU).

    >>> res = batch_sweep(lambda b: train(make_loader(b)), sizes=[16, 64, 256], base_batch_size=64)  # doctest: +SKIP
    >>> res.recommended                                                                                # doctest: +SKIP
    """
    objects = stateful_objects(restore) if restore is not None else discover_stateful()

    def find() -> Any:
        from gpumagic.batch import find_batch

        return find_batch(train_fn, device=device, budget=budget, restore=objects, progress=False)

    # wrong options raise BadOptions, a ValueError naming the parameter
    return sweep(train_fn, objects=objects, sizes=sizes, find_sizes=find, samples=samples, seconds=seconds,
                 lr_rule=lr_rule, base_batch_size=base_batch_size, val=val, val_name=val_name, by=by,
                 device=device, budget=budget, noise_batches=noise_batches)


def sweep_in_namespace(
    ns: MutableMapping[str, Any],
    run: Callable[[], Any],
    code: str,
    *,
    var: str,
    val: str | None = None,
    hints: Iterable[Any] = (),
    **options: Any,
) -> SweepResult:
    """The magics' form: ``run()`` runs ``code`` in ``ns`` with ``var`` bound to each size;
    ``val`` an expression evaluated in ``ns`` after each run. ``options`` as for :func:`sweep`."""
    from gpumagic.batch import check_var_is_read, find_batch_in_namespace

    if not var.isidentifier():
        raise BadOptions(f"`var` must be a Python name, got {var!r}")
    check_var_is_read(code, var, ns)
    current = ns.get(var)
    base = current if isinstance(current, int) and not isinstance(current, bool) and current > 0 else None
    if val is not None:
        try:
            compiled = compile(val, "<--val>", "eval")
        except SyntaxError as e:
            raise BadOptions(f"`val` {val!r} is not a Python expression: {e.msg}") from None
    roots = [v for k, v in list(ns.items()) if not k.startswith("_")]
    objects = stateful_objects(roots)

    def body(b: int) -> None:
        ns[var] = b
        run()

    def evaluate() -> Any:
        return eval(compiled, ns if isinstance(ns, dict) else dict(ns))

    def find() -> Any:
        return find_batch_in_namespace(
            ns, run, code, hints=hints, var=var, progress=False,
            opts=SearchOptions(device=options.get("device"), budget=parse_budget(options.get("budget")),
                               plan_first=True))

    return sweep(body, objects=objects, namespace=ns, find_sizes=find, base_batch_size=base,
                 val=evaluate if val is not None else None, hints=hints, **options)


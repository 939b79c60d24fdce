"""IPython magics: ``%%gpumem``, ``%find_batch``, ``%batch_sweep``, ``%gpumon``, ``%gpumagic``.

Thin over the core: arguments are parsed here, the work is done by :mod:`gpumagic.tracking`,
:mod:`gpumagic.batch` and :mod:`gpumagic.oom`, and results display themselves.

Cells run like ``%%time`` runs them: IPython's own transformer and compiler, in the user's
namespace, so line magics and ``!`` work inside, and an exception reaches IPython exactly once
(with ``%tb``, ``%debug`` and the kernel's error status working as usual).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import sys
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import Any

from IPython.core import magic_arguments
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class, no_var_expand
from IPython.display import display
from IPython.utils.capture import capture_output

from gpumagic._imports import orphans_dropped
from gpumagic._shell import (
    find_batch_in_shell,
    hints,
    last_gpumem_cell,
    previous_cell,
    run_cell_source,
    show_monitor,
    sweep_in_shell,
)
from gpumagic.batchmath import DEFAULT_MARGIN, PICKS, THROUGHPUT_WITHIN

__all__ = ["GPUMagics", "load", "unload"]

_MAGIC_NAMES = {"line": ("gpumem", "find_batch", "batch_sweep", "gpumon", "gpumagic"),
                "cell": ("gpumem", "find_batch", "batch_sweep")}


# ---------------------------------------------------------------------------------------------
# out-of-memory presentation


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _ipython_dir() -> str:
    import IPython

    return os.path.dirname(os.path.abspath(IPython.__file__)) + os.sep


def user_traceback(tb: TracebackType | None) -> TracebackType | None:
    """A copy of the chain ``tb`` without gpumagic's frames (the magic, the cell runner, the
    simulated device) nor IPython's leading ones (what runs the cell): the user's frames only."""
    kept: list[TracebackType] = []
    while tb is not None:
        if not os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE_DIR):
            kept.append(tb)
        tb = tb.tb_next
    ipython = _ipython_dir()
    while len(kept) > 1 and os.path.abspath(kept[0].tb_frame.f_code.co_filename).startswith(ipython):
        kept.pop(0)
    out: TracebackType | None = None
    for t in reversed(kept):
        out = TracebackType(out, t.tb_frame, t.tb_lasti, t.tb_lineno)
    return out


class TracebackView:
    """``_render_traceback_`` for a translated OOM: the short form the first time IPython shows
    the error, and afterwards (``%tb``) the full traceback of the user's frames, formatted before
    the frames are cleared to free memory, so their arguments still show."""

    def __init__(self, shell: InteractiveShell, exc: BaseException) -> None:
        lines = str(exc).strip().splitlines()
        self.short = [f"{type(exc).__name__}: {lines[0] if lines else ''}"]
        from gpumagic.oom.context import user_frame  # imported on the first OOM, not at %load_ext

        where = user_frame(exc.__traceback__)
        if where:
            self.short.append(f"  at {where}")
        self.short.append("  (full traceback: %tb)")
        tb = user_traceback(exc.__traceback__)
        try:
            self.full = list(shell.InteractiveTB.structured_traceback(type(exc), exc, tb, tb_offset=0))
        except Exception:  # IPython's formatter failed: Python's, without the arguments
            self.full = traceback.format_exception(type(exc), exc, tb)
        self.wrap = _text_only(shell)  # a terminal: lines within its width (a notebook wraps by itself)
        if self.wrap and self.full:
            from gpumagic.render.text import wrap_block

            self.full[-1] = wrap_block(self.full[-1])  # the message: one line of 300 characters
        self.shown = False

    def __call__(self) -> list[str]:
        if not self.shown:
            self.shown = True
            from gpumagic.render.text import wrap_block

            text = "\n".join(self.short)
            return (wrap_block(text) if self.wrap else text).splitlines()
        return self.full


_REMEDY_PLANS_SECONDS = 20.0
"""After an OOM, no further what-if plan starts past this: the advice must not keep the user waiting."""


class OOMPresenter:
    """Turns an out-of-memory exception into advice, a short traceback and freed memory.

    After an OOM, the autograd graphs the failed cell's results hold are freed, their values kept
    (:func:`gpumagic.devices.release_names`): otherwise the next run at a size that fits runs out
    of memory too.
    """

    def __init__(self, shell: InteractiveShell) -> None:
        self.shell = shell
        self.last_report: Any = None  # the last MemoryReport that completed
        self.last_report_batch: int | None = None  # the batch variable's value during that run
        self.last_report_rebound = 0  # bytes the names that run rebound held before it
        self.last_report_cell: str | None = None  # the code of that run
        self.last_search: Any = None  # the last BatchSearchResult
        self.last_search_code: str | None = None  # the code it searched over
        # what each measurement measured (oom.context.measurement_key): one whose key no longer
        # matches (another model, other data, after %reset) is not used
        self.last_report_key: Any = None
        self.last_search_key: Any = None
        self.last_oom_cell: str | None = None  # the code of the last cell that ran out of memory
        self.pre_cell: Any = None  # Bindings of the namespace before the running cell

    def before_cell(self, *_: Any) -> None:
        """``pre_run_cell`` event: remember what every name is bound to (no objects kept alive)."""
        from gpumagic.devices import Bindings

        try:
            self.pre_cell = Bindings(self.shell.user_ns)
        except Exception:  # an odd object in the namespace: no release after an OOM, never a broken cell
            self.pre_cell = None

    def present(
        self,
        exc: BaseException,
        *,
        report: Any = None,
        batch_size: int | None = None,
        cell: str | None = None,
        bindings: Any = None,
        measure: str | None = None,
        input_batch: int | None = None,
        stepped: tuple[str, ...] = (),
    ) -> bool:
        """Show advice for ``exc`` if it is an OOM; returns whether it was one.

        ``bindings``: the namespace before the cell (default: as the ``pre_run_cell`` event saw
        it); ``measure``: the magic's options that reproduce the device and budget (``-d cpu
        --budget 96MiB``); ``input_batch``: the batch size read from the failing step's inputs
        (their leading dimension), for a loop that draws from no DataLoader; ``stepped``: the
        class names of the optimizers that stepped in the cell.
        """
        if getattr(exc, "_gpumagic_handled", False):
            return True
        from gpumagic import oom

        info = oom.parse(exc)
        if info is None:
            return False
        # the full traceback is formatted now, while its frames still hold their arguments: the
        # work below (planning remedies) runs code whose errors chain to this one and clear frames
        with contextlib.suppress(Exception):  # a nicety: the advice and the release happen regardless
            exc._render_traceback_ = TracebackView(self.shell, exc)  # type: ignore[attr-defined]
        try:
            from_history = cell is None
            if cell is None:  # the global handler: the cell that just ran
                hist = getattr(self.shell.history_manager, "input_hist_raw", None) or [""]
                cell = hist[-1]
            from gpumagic.oom import advice as _advice

            self.last_oom_cell = cell
            released: tuple[tuple[str, int], ...] = ()
            before = bindings if bindings is not None else self.pre_cell
            dev = self._device(info)
            if before is not None and dev is not None:
                from gpumagic.devices import release_names

                with contextlib.suppress(Exception):  # an odd value: the frames are still released below
                    released = release_names(self.shell.user_ns, before, dev)
            if measure is None and from_history:
                measure = self._measure_options(info)
            try:
                from gpumagic.oom import context

                code = self._python(cell)
                ns = self.shell.user_ns
                bound = () if before is None else tuple(
                    n for n, v in list(ns.items()) if not n.startswith("_") and not before.same(n, v))
                evaluation = cell is not None and context.looks_like_evaluation(cell)
                ctx = context.build_context(
                    info, exc, ns=ns, cell=cell, code=code, report=report, batch_size=batch_size, dev=dev,
                    released=released, measure=measure, earlier=self._earlier(), evaluation=evaluation,
                    input_batch=input_batch, bound=bound, stepped=stepped)
                ctx = dataclasses.replace(ctx, rank=_advice.rank_in_error(exc))
                if evaluation:
                    ctx = dataclasses.replace(ctx, evaluation=True)
            except Exception:  # advice with less context, never an error of gpumagic's in the cell
                ctx = oom.AdviceContext(released=released)
            ctx = self._with_remedies(ctx, cell, dev, exc)
            advice = oom.advise(info, ctx)
            _advice.remember(advice)
            with contextlib.suppress(AttributeError):  # an exception type with __slots__
                exc.advice = advice  # type: ignore[attr-defined]
            self._show(advice)
        finally:
            from gpumagic.devices import release_memory

            exc._gpumagic_handled = True  # type: ignore[attr-defined]
            release_memory(exc)
        return True

    def _with_remedies(self, ctx: Any, cell: str | None, dev: Any, exc: BaseException) -> Any:
        """``ctx`` with the failing cell's remedies planned on fake copies (gpumagic.remedies), or why not."""
        if cell is None or dev is None or ctx.evaluation or ctx.batch_dependent is False:
            return ctx
        if cell.lstrip().startswith("%%"):  # another cell magic's body: not code a plan can run as is
            return dataclasses.replace(ctx, remedies_unplanned="the cell runs under a cell magic")
        import io

        from gpumagic.devices import release_memory
        from gpumagic.remedies import plan_what_if

        try:
            release_memory(exc)  # the failed step's frames first: a plan's baseline counts what is alive
            with contextlib.redirect_stdout(io.StringIO()):  # the cell's prints, once per plan: not the user's output
                rep = plan_what_if(lambda: run_cell_source(self.shell, cell), self.shell.user_ns, device=str(dev),
                                   budget=ctx.capacity_bytes, source=cell, fit_all=False,
                                   time_limit=_REMEDY_PLANS_SECONDS)
        except Exception as e:  # a cell the dry run cannot plan: the advice says so and keeps its wording
            e.__traceback__ = None
            why = f"a dry run could not plan this cell ({type(e).__name__})"
            return dataclasses.replace(ctx, remedies_unplanned=why)
        return dataclasses.replace(ctx, remedies=rep.what_if, remedies_fits_now=rep.batch_size_that_fits)

    def _show(self, advice: Any) -> None:
        """The advice as text/HTML, and in a kernel with widgets a button that runs its measuring command."""
        widget = None
        if getattr(self.shell, "kernel", None) is not None:  # a Jupyter kernel: a widget manager may render it
            try:
                from gpumagic.render.widgets import advice_widget

                widget = advice_widget(advice, lambda code: self.shell.run_cell(code, store_history=True))
            except Exception:  # no ipywidgets, or it failed: the text and HTML still show
                widget = None
        if widget is None:
            display(advice)
            return
        bundle = {"text/plain": advice.text(), "text/html": advice._repr_html_(),
                  "application/vnd.jupyter.widget-view+json": {
                      "version_major": 2, "version_minor": 0, "model_id": widget.model_id}}
        display(bundle, raw=True)

    @staticmethod
    def _device(info: Any) -> Any:
        from gpumagic.oom.context import device_for

        return device_for(info)

    @staticmethod
    def _measure_options(info: Any) -> str:
        from gpumagic.oom.context import measure_options

        return measure_options(info)

    def _python(self, cell: str | None) -> str | None:
        """The cell as Python (IPython's transforms applied), for the heuristics in ``oom.context``."""
        if cell is None:
            return None
        try:
            return str(self.shell.transform_cell(cell))
        except Exception:  # a cell IPython cannot transform: no names read from it
            return None

    def _earlier(self) -> Any:
        from gpumagic.oom.context import Earlier

        return Earlier(self.last_report, self.last_report_batch, self.last_report_rebound, self.last_report_cell,
                       self.last_search, self.last_search_code, self.last_report_key, self.last_search_key)

    def key(self, cell: str | None) -> Any:
        """What a measurement of ``cell`` measured, to remember with it (None if it cannot be read)."""
        from gpumagic.oom.context import measurement_key

        try:
            return measurement_key(self.shell.user_ns, self._python(cell))
        except Exception:  # an odd object: a measurement without a key is never reused
            return None

    def completed(self, report: Any, cell: str, rebound_bytes: int = 0) -> None:
        """A ``%%gpumem`` cell finished: keep its report (and batch size) for advice after a later OOM."""
        self.last_report = report
        self.last_report_rebound = rebound_bytes
        self.last_report_cell = cell
        self.last_report_key = self.key(cell)
        from gpumagic.oom.context import batch_variable

        steps = [s.batch_size for s in getattr(report, "steps", ()) if s.batch_size]
        var = batch_variable(self.shell.user_ns, self._python(cell), steps[-1] if steps else None)
        self.last_report_batch = var[1] if var is not None else None
        self.last_oom_cell = None  # `%find_batch` alone now re-runs this cell


def _cell_body(cell: str | None) -> str | None:
    """A cell without its ``%%gpumem`` line (a failed cell, to re-run under ``%find_batch``)."""
    if cell is None:
        return None
    lines = cell.strip("\n").splitlines()
    if lines and lines[0].lstrip().startswith("%%gpumem"):
        lines = lines[1:]
    body = "\n".join(lines)
    return body if body.strip() else None


class OOMHandler:
    """IPython holds one custom exception handler: ours chains to (and restores) the previous one."""

    def __init__(self, shell: InteractiveShell, presenter: OOMPresenter) -> None:
        self.shell = shell
        self.presenter = presenter
        self._saved: tuple[Any, Any] | None = None
        self._ours: Any = None

    @property
    def installed(self) -> bool:
        return self._saved is not None and getattr(self.shell, "CustomTB", None) is self._ours

    def install(self) -> None:
        if self.installed:
            return
        shell = self.shell
        prev_types = tuple(shell.custom_exceptions)
        prev_handler = shell.CustomTB if prev_types else None
        self._saved = (shell.CustomTB, shell.custom_exceptions)
        presenter = self.presenter

        def handler(sh: Any, etype: Any, value: Any, tb: Any, tb_offset: Any = None) -> list[str]:
            try:
                is_oom = isinstance(value, Exception) and presenter.present(value)
            except Exception:  # advice must never break the display of the user's error
                is_oom = False
            if is_oom:
                sh.showtraceback((etype, value, tb), tb_offset=tb_offset)
                return []
            if prev_handler is not None and isinstance(value, prev_types):
                result = prev_handler(etype, value, tb, tb_offset=tb_offset)
                return list(result) if result else []
            sh.showtraceback((etype, value, tb), tb_offset=tb_offset)
            return []

        # every error is read: an out-of-memory error is known by what its message says (the parser's
        # families), not by its type: torch's RuntimeError subclasses, MemoryError, but also a host's
        # OSError [Errno 12], a serving engine's ValueError. Any other error shows as it would anyway.
        types = tuple(dict.fromkeys((Exception, *prev_types)))
        shell.set_custom_exc(types, handler)
        self._ours = shell.CustomTB

    def uninstall(self) -> None:
        if self._saved is None:
            return
        if getattr(self.shell, "CustomTB", None) is self._ours:
            self.shell.CustomTB, self.shell.custom_exceptions = self._saved
        # else: someone installed a handler after ours; leave theirs in place
        self._saved = self._ours = None


# ---------------------------------------------------------------------------------------------
# displaying results and progress


def _kernel_frontend(shell: InteractiveShell) -> bool:
    """A Jupyter kernel (a notebook, VS Code, Colab, nbclient) rather than terminal IPython."""
    return getattr(shell, "kernel", None) is not None


def _text_only(shell: InteractiveShell) -> bool:
    """The shell shows plain text only (terminal IPython): results render through ``_repr_pretty_``."""
    formatter = shell.display_formatter
    return formatter is not None and "text/html" not in formatter.active_types


def search_progress(shell: InteractiveShell, quiet: bool) -> str | None:
    """Which progress a search shows (opened and closed by the search, before the result shows):
    none with -q; in a kernel a widget bar; elsewhere "text", a tqdm bar on a terminal's stderr and
    one line per trial in a log or CI."""
    if quiet:
        return None
    return "widget" if _kernel_frontend(shell) else "text"


def _usage_message(e: ValueError) -> str:
    """A core error as a UsageError's message: option fields spelled as the magics' flags."""
    from gpumagic.options import BadOptions

    return e.spelled(FLAGS) if isinstance(e, BadOptions) else str(e)


FLAGS: dict[str, str] = {
    "device": "--device", "budget": "--budget", "gpu": "--gpu", "start": "--start", "min_size": "--min",
    "max_size": "--max", "steps": "--steps", "margin": "--margin", "pick": "--pick", "effective": "--effective",
    "evaluation": "--eval", "dry_run": "--dry-run", "var": "--var", "loader": "--loader", "size_fn": "--size-fn",
    "sizes": "--sizes", "samples": "--samples", "seconds": "--seconds", "lr_rule": "--lr-rule", "by": "--by",
    "val": "--val", "noise_batches": "--noise-batches", "interval": "--interval",
}
"""How the magics spell the core's option fields in error messages (see :class:`gpumagic.options.BadOptions`)."""


def _sweep_progress(message: str) -> None:
    """One line per stage of a sweep, on the cell's stderr (a terminal, a log or a notebook)."""
    print(f"batch_sweep: {message}", file=sys.stderr, flush=True)


def _text_bundle(shell: InteractiveShell) -> Callable[[Any], Any]:
    """A mimebundle printer for results: none in a text-only shell (IPython then calls
    ``_repr_pretty_``, the multi-line report; no widget or PNG is built), else the result's own."""

    def printer(obj: Any) -> Any:
        return None if _text_only(shell) else obj._repr_mimebundle_()

    return printer


# by name: IPython resolves them on the first display, so %load_ext does not import the results
_RESULT_TYPES = ("gpumagic.report.MemoryReport", "gpumagic.report.BatchSearchResult",
                 "gpumagic.sweep_results.SweepResult")


# ---------------------------------------------------------------------------------------------
# the magics


def _asks_for_help(line: str) -> bool:
    """``-h`` / ``--help`` among the options (not in a statement after ``--``)."""
    words = line.split()
    options = words[: words.index("--")] if "--" in words else words
    return "-h" in options or "--help" in options


def _split_statement(line: str) -> tuple[str, str | None]:
    """The options, and the raw statement after the first ``--`` that stands alone outside quotes
    (kept as typed: its quotes and spaces are Python's, not the shell's)."""
    quote: str | None = None
    i = 0
    while i < len(line):
        c = line[i]
        if quote is not None:
            if c == "\\" and quote == '"':
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif (line.startswith("--", i) and (i == 0 or line[i - 1].isspace())
              and (i + 2 == len(line) or line[i + 2].isspace())):
            return line[:i], line[i + 2:].strip()
        i += 1
    return line, None


def option_words(parser: Any, line: str) -> list[str]:
    """A magic's line as argv, split the way a POSIX shell does: quotes group and are removed
    (``-d 'cuda:0'``, ``--size-fn "lambda i: lengths[i]"``). A value that starts with ``-``
    after an option that takes one is kept as that option's value (``--budget -5MiB``), so the
    option's own check names it instead of argparse's "expected one argument". The statement
    after ``--`` is one word, as typed. The one splitter of every magic (``%%gpumem``,
    ``%find_batch`` and the magics built on their options)."""
    options, statement = _split_statement(line)
    try:
        words = shlex.split(options, posix=True)
    except ValueError as e:  # "No closing quotation"
        raise UsageError(f"could not split options {options.strip()!r}: {e}") from None
    takes_value = {
        flag for action in parser._actions if action.option_strings and action.nargs != 0
        for flag in action.option_strings
    }
    known = set(parser._option_string_actions)
    argv: list[str] = []
    for word in words:
        if argv and argv[-1] in takes_value and word.startswith("-") and word.split("=")[0] not in known:
            argv[-1] = f"{argv[-1]}={word}"
        else:
            argv.append(word)
    if statement is not None:
        argv += ["--", statement] if statement else ["--"]
    return argv


def _refuse_nesting(magic: str) -> None:
    """A measuring magic inside a cell that another one measures (or a search's trial)."""
    tracking = sys.modules.get("gpumagic.tracking")
    outer = None if tracking is None else tracking.active_tracker()
    if outer is not None:
        raise UsageError(
            f"{magic} cannot run inside a cell that %%gpumem or %find_batch is already measuring (on "
            f"{outer.device}): nesting them is not supported; run {magic} in a cell of its own"
        )


def _parse(fn: Any, line: str) -> Any:
    parser = fn.parser
    try:
        return parser.parse_args(option_words(parser, line))
    except UsageError:
        raise
    except SystemExit as e:  # argparse on --help or odd input
        raise UsageError(f"could not parse options {line!r}") from e


@magics_class
class GPUMagics(Magics):
    shell: InteractiveShell

    def __init__(self, shell: InteractiveShell) -> None:
        super().__init__(shell)
        self.presenter = OOMPresenter(shell)
        self.oom_handler = OOMHandler(shell, self.presenter)
        self.saved_printers: dict[str, Any] = {}  # mimebundle printers ours replaced, restored on unload

    # -- %gpumem / %%gpumem --------------------------------------------------------------------
    @magic_arguments.magic_arguments()
    @magic_arguments.argument(
        "-d", "--device", default=None,
        help="Device to measure: cpu, cuda, cuda:N or mps. Default: the device of the models and "
        "tensors in the namespace, else cuda if available, else mps, else cpu.",
    )
    @magic_arguments.argument(
        "--budget", default=None,
        help="Simulated device capacity, e.g. 2GiB or 800MB (IEC units binary, SI decimal) or bytes. "
        "On cpu, an allocation past it raises torch.OutOfMemoryError worded like CUDA's; on cuda it sets "
        "the per-process memory fraction for the cell and restores it after.",
    )
    @magic_arguments.argument(
        "-o", "--output", action="store_true", help="Return the MemoryReport (like %%timeit -o)."
    )
    @magic_arguments.argument(
        "-q", "--quiet", action="store_true", help="Do not display the report (OOM advice is still shown)."
    )
    @magic_arguments.argument(
        "--free", action="store_true",
        help="Line magic only: gc.collect() + empty_cache(), then show the device and the names still holding memory.",
    )
    @magic_arguments.argument(
        "--dry-run", action="store_true",
        help="Plan instead of measuring: run the cell on fake tensors (no data, no compute, no GPU needed), "
        "stop after --steps optimizer steps and report the predicted peak, breakdown and, on cuda, reserved memory.",
    )
    @magic_arguments.argument(
        "--gpu", default=None,
        help="A GPU from the catalog (T4, L4, A10G, V100-16GB, V100-32GB, A100-40GB, A100-80GB, H100-80GB, H200, "
        "RTX-3090, RTX-4090): with --dry-run, plan for it; without, its usable memory is the budget.",
    )
    @magic_arguments.argument(
        "--steps", type=int, default=3,
        help="With --dry-run: optimizer steps planned before the cell stops (default 3).",
    )
    @magic_arguments.argument(
        "--what-if", dest="what_if", action="store_true",
        help="Plan the cell as written and once per memory remedy that applies (autocast, activation "
        "checkpointing, optimizer choices, gradient accumulation, freeing the last step's outputs), each on fake "
        "copies; show what each saves and, with --budget or --gpu, the batch that then fits.",
    )
    @no_var_expand
    @line_cell_magic
    def gpumem(self, line: str = "", cell: str | None = None) -> Any:
        """Measure device memory of a training cell: peak for the cell and per step, loss and time per step.

        Cell magic: run the cell unchanged and record, for the cell, the baseline (memory allocated
        before it), the peak (absolute and over the baseline), the memory at the end, the peak
        reserved (cuda), the capacity (or budget) and the wall time; and for every training step
        (each optimizer.step(), or each backward() when no optimizer steps) its loss, peak
        memory, duration and batch size (when a DataLoader is iterated). A compact report is shown.

        Line magic: show the device now: allocated / reserved / total / free and, through NVML,
        the processes using the GPU. With --free, collect garbage and empty the cache first.

        Examples::

            %%gpumem
            for x, y in loader:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(); loss.backward(); opt.step()

            %%gpumem -d cpu --budget 64MiB -o
            train()

            %%gpumem --dry-run --gpu T4      # a plan on fake tensors: will it fit a T4?
            train()

            %gpumem            # the device now
            %gpumem --free     # free cached memory and list what still holds some
        """
        if _asks_for_help(line):  # as `%gpumem?` / `%%gpumem?` do; the cell does not run
            self.shell.run_line_magic("pinfo", "%%gpumem" if cell is not None else "%gpumem")
            return None
        args = _parse(self.gpumem, line)
        if cell is not None:
            _refuse_nesting("%%gpumem")
        from gpumagic.devices import device_status, free_memory, resolve, resolve_budget

        ns = self.shell.user_ns
        if cell is not None and (args.dry_run or args.gpu is not None or args.what_if):
            with orphans_dropped():  # a Ctrl-C in torch's first import of sympy must not break later cells
                return self._gpumem_planned(args, cell)
        if args.what_if:
            raise UsageError("--what-if applies to the cell magic %%gpumem")
        if args.steps != 3:
            raise UsageError("--steps applies to %%gpumem --dry-run")
        from gpumagic import distributed

        launcher = cell is not None and distributed.launches_processes(cell)
        try:
            if launcher:
                # the ranks run in forked children, which cannot use a GPU this process initialised:
                # this process is measured on the host, the children on their own devices
                backend, device = resolve("cpu")
            else:
                backend, device = resolve(args.device, hints(ns) if args.device is None else ())
            budget = resolve_budget(args.budget, name="--budget")
        except ValueError as e:
            raise UsageError(_usage_message(e)) from None
        if cell is None:
            if args.budget is not None:
                raise UsageError("--budget applies to the cell magic %%gpumem, not to %gpumem")
            target = args.device if args.device is not None else device  # a name resolves to its backend again
            status = free_memory(ns, target) if args.free else device_status(target)
            if args.output:
                return status
            display(status)
            return None
        if args.free:
            raise UsageError("--free is for the line magic %gpumem, not for %%gpumem")
        if not cell.strip():
            raise UsageError("%%gpumem needs a cell body to run")
        from gpumagic import _ranks
        from gpumagic.devices import Bindings
        from gpumagic.oom.context import size_arg
        from gpumagic.tracking import Tracker

        measure = f"-d {device}" + (f" --budget {size_arg(budget)}" if budget is not None else "")
        tracker = Tracker(device, budget, backend=backend)
        children: tuple[Any, ...] = ()
        shows = _ranks.rank() in (None, 0)  # in a data-parallel job only rank 0 displays
        try:
            before: Bindings | None = Bindings(ns)
            from gpumagic.oom.context import rebound_bytes

            rebound = rebound_bytes(ns, self.shell.transform_cell(cell), device)
        except Exception:  # measuring must not break the cell: no release, a cruder estimate
            before, rebound = None, 0
        try:
            # child processes the cell starts (notebook_launcher, start_processes) measure themselves
            child_device = args.device if launcher else str(device)
            with distributed.propagate_to_children(child_device, budget) as reports_dir, tracker:
                try:
                    with orphans_dropped():
                        value = run_cell_source(self.shell, cell)
                finally:
                    children = distributed.collect_children(reports_dir)
        except BaseException as exc:
            report = tracker.finished_report
            if report is not None:
                report = distributed.with_children(report, children)
            if not shows:
                raise
            try:
                shown = isinstance(exc, Exception) and self.presenter.present(
                    exc, report=report, batch_size=tracker.last_batch_size, cell=cell,
                    bindings=before, measure=measure, input_batch=tracker.last_input_batch,
                    stepped=tracker.optimizer_names,
                )
            except Exception:  # advice must never replace the user's exception
                shown = False
            if not shown and report is not None and not args.quiet:
                display(report)
            raise
        report = distributed.with_children(tracker.report, children)
        self.presenter.completed(report, cell, rebound)
        if not args.quiet and shows and not self._shown_as_value(args):
            display(report)
        if args.output:
            return report
        return value

    def _shown_as_value(self, args: Any) -> bool:
        """With ``-o`` in a text-only shell the result is the cell's value, which IPython prints
        (``Out[N]:``), as ``%timeit -o`` does: displaying it first would print it twice."""
        return bool(args.output) and _text_only(self.shell)

    def _gpumem_planned(self, args: Any, cell: str) -> Any:
        """%%gpumem --dry-run, or --gpu NAME as a budget."""
        from gpumagic.dryrun import DryRunError
        from gpumagic.measure import track

        if not cell.strip():
            raise UsageError("%%gpumem needs a cell body to run")
        if args.free:
            raise UsageError("--free is for the line magic %gpumem, not for %%gpumem")
        if args.steps < 1:
            raise UsageError(f"--steps must be >= 1, got {args.steps}")
        if args.what_if:
            return self._gpumem_what_if(args, cell)
        try:
            if args.dry_run:
                tracker = track(args.device, args.budget, dry_run=True, gpu=args.gpu, steps=args.steps,
                                namespace=self.shell.user_ns)
            else:
                if args.budget is not None:
                    raise ValueError("give either --gpu or --budget, not both")
                from gpumagic.devices import resolve_device

                device = resolve_device(args.device, hints(self.shell.user_ns) if args.device is None else ())
                tracker = track(device, gpu=args.gpu)
        except ValueError as e:
            raise UsageError(_usage_message(e)) from None
        try:
            with tracker:
                value = run_cell_source(self.shell, cell)
        except DryRunError:
            raise
        except BaseException as exc:
            report = getattr(tracker, "_report", None)
            if not (isinstance(exc, Exception) and self.presenter.present(
                exc, report=report, batch_size=getattr(tracker, "_last_batch", None), cell=cell
            )) and report is not None and not args.quiet:
                display(report)
            raise
        report = tracker.report
        self.presenter.last_oom_cell = None  # this cell completed, planned or not: `%find_batch` alone re-runs it
        if not report.dry_run:
            self.presenter.last_report = report
            self.presenter.last_report_cell = cell
            self.presenter.last_report_key = self.presenter.key(cell)
        if not args.quiet and not self._shown_as_value(args):
            display(report)
        if args.output:
            return report
        return None if report.dry_run else value

    def _gpumem_what_if(self, args: Any, cell: str) -> Any:
        """%%gpumem --what-if: the plan as written and one per remedy (gpumagic.remedies)."""
        from gpumagic.devices import resolve_budget
        from gpumagic.dryrun import plan_target
        from gpumagic.remedies import plan_what_if

        try:
            budget = resolve_budget(args.budget, name="--budget")
            plan_target(args.device, args.gpu, budget)
        except ValueError as e:
            raise UsageError(_usage_message(e)) from None
        # the cell's own errors (and DryRunError) are the user's to see, as under --dry-run
        report = plan_what_if(lambda: run_cell_source(self.shell, cell), self.shell.user_ns, device=args.device,
                              gpu=args.gpu, budget=budget, steps=args.steps, source=cell)
        if not args.quiet:
            display(report)
        return report if args.output else None

    # -- %find_batch / %%find_batch ----------------------------------------------------------
    @magic_arguments.magic_arguments()
    @magic_arguments.argument("--var", default=None, help="Name of the batch-size variable the code reads.")
    @magic_arguments.argument(
        "--loader", default=None,
        help="Name of a DataLoader built earlier: each trial rebinds it to a copy with the trial batch size "
        "(same dataset, collate_fn, workers, pin_memory, drop_last) whose every batch holds the heaviest "
        "samples of the data set, and restores it after.",
    )
    @magic_arguments.argument(
        "--size-fn", dest="size_fn", default=None,
        help="With --loader: a cheaper measure of sample size than counting tensor elements: an expression "
        "giving a sequence of sizes per dataset index (a length column) or a function of the index.",
    )
    @magic_arguments.argument(
        "--eval", dest="evaluation", action="store_true",
        help="Evaluation batch: a trial is --steps forward calls of the outermost model (no backward, no "
        "optimizer step), for loops under torch.no_grad() or inference_mode.",
    )
    @magic_arguments.argument(
        "-d", "--device", default=None, help="cpu, cuda, cuda:N or mps (default as for %%%%gpumem)."
    )
    @magic_arguments.argument(
        "--budget", default=None, help="Simulated device capacity, e.g. 24GiB (see %%%%gpumem)."
    )
    @magic_arguments.argument(
        "--start", type=int, default=None,
        help="First batch size tried: 2, or the bound nearest to 2 when --min or --max exclude it.",
    )
    @magic_arguments.argument(
        "--min", dest="min_size", type=int, default=1, help="Smallest batch size allowed (default 1)."
    )
    @magic_arguments.argument("--max", dest="max_size", type=int, default=None, help="Largest batch size allowed.")
    @magic_arguments.argument(
        "--steps", type=int, default=3,
        help="Optimizer steps per trial (default 3: optimizer state exists from the first step; "
        "throughput is measured from the second).",
    )
    @magic_arguments.argument(
        "--margin", type=float, default=DEFAULT_MARGIN,
        help=f"Safety margin as a fraction of memory (default {DEFAULT_MARGIN}): the pick's predicted peak stays "
        "under capacity × (1 − margin).",
    )
    @magic_arguments.argument(
        "--pick", default="max", choices=PICKS,
        help=f"max: largest that fits with the margin; throughput: smallest within {THROUGHPUT_WITHIN * 100:.0f}%% "
        "of the best samples/s; pow2: largest power of two that fits.",
    )
    @magic_arguments.argument(
        "--effective", type=int, default=None,
        help="Target effective batch: returns the micro-batch and gradient-accumulation steps that reach it, "
        "with the learning-rate rule.",
    )
    @magic_arguments.argument(
        "--dry-run", action="store_true",
        help="Plan every trial on fake tensors (no data, no compute, no GPU needed); needs --gpu or --budget "
        "on a machine without that device. The result says 'planned'.",
    )
    @magic_arguments.argument(
        "--gpu", default=None,
        help="A GPU from the catalog (see %%%%gpumem): its usable memory is the capacity searched against.",
    )
    @magic_arguments.argument("-o", "--output", action="store_true", help="Return the BatchSearchResult.")
    @magic_arguments.argument(
        "-q", "--quiet", action="store_true", help="Do not display the result nor the progress of the trials."
    )
    @magic_arguments.argument(
        "statement", nargs="*",
        help="Line magic: the statement to run per trial, after `--`, e.g. "
        "%%find_batch --var bs -- train(model, make_loader(bs)). Without one, the cell that last ran out of "
        "memory is re-run if no %%%%gpumem cell ran after it, else the last %%%%gpumem cell.",
    )
    @no_var_expand
    @line_cell_magic
    def find_batch(self, line: str = "", cell: str | None = None) -> Any:
        """Find the largest (or fastest) batch size that fits the device, in a few trials.

        Runs the training code a few times at different batch sizes, stopping each trial after
        --steps optimizer steps, fits peak memory against batch size, and verifies the pick.
        Models, optimizers, schedulers, GradScalers, RNG states, the batch variable / loader and
        the plain values the code changed in the namespace are restored afterwards (files the
        code writes are not). Shows memory versus batch size with the fitted line and the pick.

        On cpu and cuda the search first plans the memory curve on fake tensors (no device
        memory) and spends real trials only to verify the plan: two when it agrees within 3%;
        otherwise real trials decide and the result says so. --dry-run plans every trial.

        Examples::

            %%find_batch --var batch_size --budget 24GiB
            loader = DataLoader(data, batch_size=batch_size, shuffle=True)
            for x, y in loader:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(); loss.backward(); opt.step()

            %find_batch --loader train_loader -- train(model, train_loader)
            %find_batch --var bs --effective 1024 -- train(model, make_loader(bs))
            %find_batch --dry-run --gpu T4 --var bs -- train(model, make_loader(bs))
        """
        if _asks_for_help(line):  # as `%find_batch?` / `%%find_batch?` do; the cell does not run
            self.shell.run_line_magic("pinfo", "%%find_batch" if cell is not None else "%find_batch")
            return None
        args = _parse(self.find_batch, line)
        _refuse_nesting("%%find_batch" if cell is not None else "%find_batch")

        from gpumagic.options import BadOptions, SearchOptions, parse_budget

        statement = " ".join(args.statement).strip() if args.statement else ""
        if cell is not None and statement:
            raise UsageError("give the code either as the cell body or after `--` on the line, not both")
        code: str | None = cell if cell is not None else statement
        if code is None or not code.strip():
            code = _cell_body(self.presenter.last_oom_cell) or last_gpumem_cell(self.shell)
            if code is None:
                raise UsageError(
                    "nothing to run: give a cell body, a statement after `--`, or run a %%gpumem cell first "
                    "(%find_batch then re-runs it, or the last cell that ran out of memory)"
                )
        # -q: the trials' own prints and displays are not shown either (they run many times)
        silenced = capture_output(stdout=True, stderr=False, display=True) if args.quiet else contextlib.nullcontext()
        bad: str | None = None
        try:
            opts = SearchOptions(
                device=args.device, budget=parse_budget(args.budget), gpu=args.gpu, start=args.start,
                min_size=args.min_size, max_size=args.max_size, steps=args.steps, margin=args.margin, pick=args.pick,
                effective=args.effective, evaluation=args.evaluation, dry_run=args.dry_run, plan_first=True,
            )
            with orphans_dropped(), silenced:
                result = find_batch_in_shell(self.shell, code, opts=opts, var=args.var, loader=args.loader,
                                             size_fn=args.size_fn, progress=search_progress(self.shell, args.quiet))
        except BadOptions as e:
            bad = _usage_message(e)
        if bad is not None:  # raised here, not in the except block: no context whose frames hold the search
            raise UsageError(bad)
        self.presenter.last_search = result
        self.presenter.last_search_code = code
        self.presenter.last_search_key = self.presenter.key(code)
        if not args.quiet and not self._shown_as_value(args):
            display(result)
        return result if args.output else None

    # -- %batch_sweep / %%batch_sweep --------------------------------------------------------
    @magic_arguments.magic_arguments()
    @magic_arguments.argument("--var", default=None, help="Name of the batch-size variable the code reads (required).")
    @magic_arguments.argument(
        "--sizes", default=None,
        help="Batch sizes to run, e.g. 16,64,256. Default: the largest that fits (found as %%find_batch does) "
        "and smaller powers of two about 4x apart, or the data set's size when it all fits in one batch.",
    )
    @magic_arguments.argument(
        "--samples", type=int, default=None,
        help="Each run stops after the step that reaches this many samples. Default: one pass over the "
        "DataLoader's data set; without one, as many as the smallest size's run sees to the loop's end.",
    )
    @magic_arguments.argument(
        "--seconds", type=float, default=None, help="Each run stops after this wall time instead."
    )
    @magic_arguments.argument(
        "--lr-rule", dest="lr_rule", default="auto", choices=("auto", "linear", "sqrt", "none"),
        help="How every optimizer's learning rate follows the batch, relative to the cell's rate and its --var "
        "value: auto (default) is sqrt for adaptive optimizers (Adam, AdamW, ...), linear for SGD-like ones.",
    )
    @magic_arguments.argument(
        "--val", default=None,
        help="A Python expression evaluated in the namespace after each run, e.g. 'evaluate(model, val_loader)': "
        "the recommendation then goes by it.",
    )
    @magic_arguments.argument(
        "--val-name", dest="val_name", default=None,
        help="What --val measures, e.g. accuracy (higher is better) or loss (lower is better, the default).",
    )
    @magic_arguments.argument(
        "--by", default="samples", choices=("samples", "time"),
        help="Compare the losses at equal samples (default) or at equal wall time.",
    )
    @magic_arguments.argument(
        "--noise-batches", dest="noise_batches", type=int, default=20,
        help="Gradients read per size for the noise scale (default 20 at the largest, 60 to 400 at the smallest).",
    )
    @magic_arguments.argument(
        "-d", "--device", default=None, help="cpu, cuda, cuda:N or mps (default as for %%%%gpumem)."
    )
    @magic_arguments.argument("--budget", default=None, help="Simulated device capacity, e.g. 24GiB (see %%%%gpumem).")
    @magic_arguments.argument("-o", "--output", action="store_true", help="Return the SweepResult.")
    @magic_arguments.argument(
        "-q", "--quiet", action="store_true", help="Do not display the result nor a line per run."
    )
    @magic_arguments.argument(
        "statement", nargs="*",
        help="Line magic: the statement to run per size, after `--`. Without one, the previous cell is swept.",
    )
    @no_var_expand
    @line_cell_magic
    def batch_sweep(self, line: str = "", cell: str | None = None) -> Any:
        """Which batch size trains best: one run per size from the same start, losses compared.

        Each size gets one run of the cell from the same state (models, optimizers, schedulers,
        RNG and namespace are put back between runs and afterwards), every run sees the same
        number of samples (or seconds), the learning rate follows the batch by --lr-rule, and
        the gradient noise scale (the critical batch size) is measured at the starting weights.
        Shows the loss curves against samples and time, and the size that trained best.

        Examples::

            %%batch_sweep --var batch_size --sizes 16,64,256 --samples 20000
            for x, y in DataLoader(data, batch_size=batch_size, shuffle=True):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(); loss.backward(); opt.step()

            %batch_sweep --var bs --val "evaluate(model, val_loader)" --val-name accuracy
        """
        if _asks_for_help(line):
            self.shell.run_line_magic("pinfo", "%%batch_sweep" if cell is not None else "%batch_sweep")
            return None
        args = _parse(self.batch_sweep, line)

        statement = " ".join(args.statement).strip() if args.statement else ""
        if cell is not None and statement:
            raise UsageError("give the code either as the cell body or after `--` on the line, not both")
        code: str | None = cell if cell is not None and cell.strip() else statement
        if not code:
            code = previous_cell(self.shell)
            if code is None:
                raise UsageError("nothing to sweep: give a cell body, a statement after `--`, or run the training "
                                 "cell first (%batch_sweep alone sweeps the previous cell)")
        if args.var is None:
            raise UsageError("--var NAME is required: the batch-size variable the code reads, e.g. --var batch_size")
        sizes = None
        if args.sizes is not None:
            try:
                sizes = [int(s) for s in args.sizes.replace(" ", "").split(",") if s]
            except ValueError:
                raise UsageError(f"--sizes must be integers separated by commas, e.g. 16,64,256; got {args.sizes!r}"
                                 ) from None
        val = args.val
        if val is not None and len(val) >= 2 and val[0] == val[-1] and val[0] in "'\"":
            val = val[1:-1]  # IPython's option parser keeps the quotes around an expression with spaces
        from gpumagic.options import BadOptions

        bad: str | None = None
        try:
            result = sweep_in_shell(
                self.shell, code, var=args.var, sizes=sizes, samples=args.samples, seconds=args.seconds,
                lr_rule=args.lr_rule, val=val, val_name=args.val_name, by=args.by, device=args.device,
                budget=args.budget, noise_batches=args.noise_batches,
                progress=None if args.quiet else _sweep_progress,
            )
        except BadOptions as e:
            bad = _usage_message(e)
        if bad is not None:  # raised here, not in the except block: no context whose frames hold the sweep
            raise UsageError(bad)
        if not args.quiet and not self._shown_as_value(args):
            display(result)
        return result if args.output else None

    # -- %gpumon -----------------------------------------------------------------------------
    @magic_arguments.magic_arguments()
    @magic_arguments.argument(
        "--interval", type=float, default=1.0, help="Seconds between samples (0.1 to 60, default 1)."
    )
    @magic_arguments.argument(
        "--sidebar", action="store_true", help="Open in JupyterLab's right sidebar (needs sidecar)."
    )
    @magic_arguments.argument("--stop", action="store_true", help="Stop every running monitor.")
    @line_magic
    def gpumon(self, line: str = "") -> Any:
        """A live panel of device memory and utilisation, updated in the background.

        Examples::

            %gpumon                  # inline, every second
            %gpumon --sidebar        # in JupyterLab's right sidebar
            %gpumon --stop
        """
        if _asks_for_help(line):  # as `%gpumon?` does
            self.shell.run_line_magic("pinfo", "%gpumon")
            return None
        args = _parse(self.gpumon, line)
        from gpumagic import monitor

        if args.stop:
            n = monitor.stop_all()
            print(f"stopped {n} monitor{'s' if n != 1 else ''}")
            return None
        try:
            mon = monitor.Monitor(interval=args.interval)
        except ValueError as e:
            raise UsageError(_usage_message(e)) from None
        if _text_only(self.shell):  # no widget to redraw: one text panel of the devices now
            from gpumagic.render.text import monitor_text

            print(monitor_text(mon.sample_now().devices))
            return None
        mon.start()
        show_monitor(mon, sidebar=args.sidebar)  # displays it; returning it would show it twice
        return None

    # -- %gpumagic -----------------------------------------------------------------------------
    @line_magic
    def gpumagic(self, line: str = "") -> None:
        """Settings: ``%gpumagic oom on|off`` translates out-of-memory errors in every cell (default on);
        ``%gpumagic status`` shows what is installed.
        """
        words = line.split()
        if words[:1] == ["oom"] and len(words) == 2 and words[1] in ("on", "off"):
            if words[1] == "on":
                self.oom_handler.install()
            else:
                self.oom_handler.uninstall()
            print(f"gpumagic: out-of-memory translation in every cell is {words[1]}")
            return
        if words == ["status"] or not words:
            from gpumagic._version import __version__

            state = "on" if self.oom_handler.installed else "off"
            print(f"gpumagic {__version__}: OOM translation in every cell {state}; "
                  f"magics %gpumem %%gpumem %find_batch %%find_batch %batch_sweep %%batch_sweep %gpumon %gpumagic")
            return
        raise UsageError(f"usage: %gpumagic oom on|off, or %gpumagic status; got {line!r}")


# ---------------------------------------------------------------------------------------------
# loading


def _registered(shell: InteractiveShell) -> GPUMagics | None:
    reg = shell.magics_manager.registry.get("GPUMagics")
    return reg if isinstance(reg, GPUMagics) else None


def _drop_left_filters(*_: Any) -> None:
    """After every cell: a Ctrl-C that landed while gpumagic took out a warnings filter it added
    must not leave warnings silenced for the rest of the session."""
    from gpumagic._quiet import forget_left_behind

    forget_left_behind()


def load(shell: InteractiveShell) -> None:
    """Register the magics; loading again replaces the previous registration cleanly."""
    if _registered(shell) is not None:
        unload(shell)
    magics = GPUMagics(shell)
    shell.register_magics(magics)
    shell.events.register("pre_run_cell", magics.presenter.before_cell)
    shell.events.register("post_run_cell", _drop_left_filters)
    if shell.display_formatter is not None:
        bundles = shell.display_formatter.mimebundle_formatter
        printer = _text_bundle(shell)
        for key in _RESULT_TYPES:
            magics.saved_printers[key] = bundles.pop(key, None)  # registered by type or by name
            bundles.for_type_by_name(*key.rsplit(".", 1), printer)
    if os.environ.get("GPUMAGIC_OOM", "on").lower() not in ("0", "off", "false", "no"):
        magics.oom_handler.install()


def unload(shell: InteractiveShell) -> None:
    """Remove the magics, the OOM handler, running monitors and any active tracking."""
    magics = _registered(shell)
    try:
        if magics is not None:
            magics.oom_handler.uninstall()
            with contextlib.suppress(ValueError):  # not registered
                shell.events.unregister("pre_run_cell", magics.presenter.before_cell)
            with contextlib.suppress(ValueError):
                shell.events.unregister("post_run_cell", _drop_left_filters)
            if shell.display_formatter is not None:
                bundles = shell.display_formatter.mimebundle_formatter
                for key, saved in magics.saved_printers.items():
                    bundles.pop(key, None)
                    if saved is not None:
                        bundles.for_type_by_name(*key.rsplit(".", 1), saved)
    finally:
        table: dict[str, dict[str, Any]] = shell.magics_manager.magics
        for kind, names in _MAGIC_NAMES.items():
            for name in names:
                fn = table[kind].get(name)
                if getattr(fn, "__self__", None) is magics or isinstance(getattr(fn, "__self__", None), GPUMagics):
                    del table[kind][name]
        shell.magics_manager.registry.pop("GPUMagics", None)
        monitor = sys.modules.get("gpumagic.monitor")
        if monitor is not None:
            monitor.stop_all()
        tracking = sys.modules.get("gpumagic.tracking")
        if tracking is not None:
            while (t := tracking.active_tracker()) is not None:
                t.close()
        _drop_left_filters()


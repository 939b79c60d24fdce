"""Progress of a batch-size search, as objects the search calls: ``progress(trial, index)`` after
each trial, ``progress.close()`` once at the end (also on errors), before the result is shown.

Kinds are registered with :func:`gpumagic.views.register_progress` and opened by the search in
one place (``find_batch(progress=...)``: ``True`` or ``"text"``, ``"widget"``, or a callable).
"text", here, is a tqdm line rewritten in place on a terminal and one line per trial in a log or
CI. "widget", a bar displayed in the running notebook cell, is registered by the IPython layer
(``gpumagic._shell``: displaying is its job) from :class:`gpumagic.render.widgets.WidgetProgress`.
The magics only say which kind their frontend gets (none with ``-q``).

>>> find_batch(train, budget="8GiB", progress="widget")                          # doctest: +SKIP
>>> find_batch(train, budget="8GiB", progress=text_progress(log_file))           # doctest: +SKIP
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from gpumagic.render.text import describe_trial
from gpumagic.views import register_progress

if TYPE_CHECKING:
    from gpumagic.report import Trial

__all__ = ["BarProgress", "LineProgress", "TrialProgress", "text_progress"]


class TrialProgress(Protocol):
    """What the search reports to: called after every trial, closed once at the end."""

    def __call__(self, trial: Trial, index: int) -> None: ...

    def close(self) -> None: ...


class LineProgress:
    """One line per trial, for logs and CI where a rewritten line would pile up its frames."""

    def __init__(self, stream: TextIO | None = None, label: str = "find_batch") -> None:
        self.stream = stream
        self.label = label

    def __call__(self, trial: Trial, index: int) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        print(f"{self.label}: trial {index + 1}: {describe_trial(trial)} ({trial.seconds:.2f} s)",
              file=stream, flush=True)

    def close(self) -> None:
        pass


class BarProgress:
    """A tqdm counter on a terminal, rewritten in place and erased on close (before the result)."""

    def __init__(self, stream: TextIO | None = None, label: str = "find_batch") -> None:
        from tqdm import tqdm  # lazy: only a terminal search needs it

        self._bar: Any = tqdm(
            total=None, desc=f"{label} trials", file=stream if stream is not None else sys.stderr, leave=False,
            bar_format="{desc}: {n_fmt}{postfix} [{elapsed}]", dynamic_ncols=True, mininterval=0,
        )

    def __call__(self, trial: Trial, index: int) -> None:
        self._bar.set_postfix_str(f"last {describe_trial(trial)}", refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def text_progress(stream: TextIO | None = None, label: str = "find_batch") -> TrialProgress:
    """A bar where ``stream`` (default stderr) is a terminal, else one line per trial."""
    stream = stream if stream is not None else sys.stderr
    try:
        tty = bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        tty = False
    return BarProgress(stream, label) if tty else LineProgress(stream, label)


register_progress("text", text_progress)

"""Frozen results of a batch-size sweep (``%%batch_sweep``, :func:`gpumagic.batch_sweep`).

One row model (:meth:`SweepResult.rows`) feeds the plain text and the HTML; the figure and
the widget come from the renderers registered for :class:`SweepResult` through
:mod:`gpumagic.views` (:mod:`gpumagic.render.sweep_widgets`), never imported from here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from gpumagic import views
from gpumagic.noise import NoiseScale
from gpumagic.units import format_number

if TYPE_CHECKING:
    import pandas

__all__ = ["NoiseScale", "SweepResult", "SweepRun", "smoothed"]

SweepRule = Literal["linear", "sqrt", "none"]
By = Literal["samples", "time"]


def smoothed(values: tuple[float | None, ...] | list[float | None], window: int | None = None) -> list[float | None]:
    """A trailing mean over ``window`` steps (default a tenth of the run, 1 to 50), skipping Nones.

    >>> smoothed([4.0, 2.0, 3.0, 1.0], window=2)
    [4.0, 3.0, 2.5, 2.0]
    """
    n = len(values)
    w = window or max(1, min(50, n // 10))
    out: list[float | None] = []
    for i in range(n):
        part = [v for v in values[max(0, i - w + 1): i + 1] if v is not None]
        out.append(sum(part) / len(part) if part else None)
    return out


@dataclass(frozen=True)
class SweepRun:
    """One batch size's run, from the sweep's common starting state.

    Per step: ``samples`` and ``seconds`` are cumulative, ``losses`` the loop's own loss values
    (as ``%%gpumem`` records them). ``lrs``: the learning rate of every parameter group of every
    optimizer the run stepped, as set by the rule. ``oom``: the out-of-memory message when this
    size did not fit (then the lists hold the steps before it).
    """

    batch_size: int
    lrs: tuple[float, ...]
    samples: tuple[int, ...]
    seconds: tuple[float, ...]
    losses: tuple[float | None, ...]
    val: float | None = None
    peak_bytes: int | None = None
    samples_per_second: float | None = None
    oom: str | None = None

    @property
    def steps(self) -> int:
        return len(self.samples)

    @property
    def total_samples(self) -> int:
        return self.samples[-1] if self.samples else 0

    @property
    def total_seconds(self) -> float:
        return self.seconds[-1] if self.seconds else 0.0

    def final_loss(self, until: float | None = None, by: By = "samples") -> float | None:
        """The smoothed loss at the last step (or the last step with ``samples``/``seconds`` ≤ ``until``)."""
        xs = self.samples if by == "samples" else self.seconds
        n = len(xs) if until is None else sum(1 for x in xs if x <= until * (1 + 1e-9))
        if n == 0:
            return None
        return smoothed(self.losses[:n])[-1]


@dataclass(frozen=True)
class SweepResult:
    """Which batch size trains best: one :class:`SweepRun` per size, the noise scale, a pick.

    >>> res = gpumagic.batch_sweep(lambda b: train(make_loader(b)), sizes=[16, 64, 256])   # doctest: +SKIP
    >>> res.recommended, res.why                                                          # doctest: +SKIP
    """

    runs: tuple[SweepRun, ...]
    recommended: int | None
    why: str
    lr_rule: SweepRule
    lr_rule_why: str
    base_batch_size: int | None
    noise_scale: NoiseScale | None
    noise_scale_why: str | None
    """Why the noise scale is None (when it is)."""
    by: By = "samples"
    samples_target: int | None = None
    seconds_target: float | None = None
    val_name: str | None = None
    val_higher_is_better: bool = False
    dataset_size: int | None = None
    full_batch: bool = False
    """The whole data set fits in one batch: its size is one of the runs."""
    device: str = ""
    notes: tuple[str, ...] = ()

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(r.batch_size for r in self.runs)

    def run(self, batch_size: int) -> SweepRun:
        for r in self.runs:
            if r.batch_size == batch_size:
                return r
        raise KeyError(f"no run at batch size {batch_size}; the sizes were {list(self.sizes)}")

    def to_dataframe(self) -> pandas.DataFrame:
        """One row per step of every run (batch_size, step, samples, seconds, loss, lr, val; needs pandas)."""
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("SweepResult.to_dataframe() needs pandas: pip install pandas") from e
        cols = ["batch_size", "step", "samples", "seconds", "loss", "lr", "val", "oom"]
        rows = [[r.batch_size, i, s, t, loss, r.lrs[0] if r.lrs else None, r.val, r.oom]
                for r in self.runs for i, (s, t, loss) in enumerate(zip(r.samples, r.seconds, r.losses, strict=True))]
        return pd.DataFrame(rows, columns=cols)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __repr__(self) -> str:
        return (f"<SweepResult recommended {self.recommended}; sizes {', '.join(map(str, self.sizes))}; "
                f"noise scale {format_number(self.noise_scale.value) if self.noise_scale else 'unknown'}; {self.why}>")

    to_text = views.to_text
    _repr_pretty_ = views.repr_pretty
    _repr_html_ = views.repr_html
    _repr_mimebundle_ = views.mimebundle

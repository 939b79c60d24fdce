"""Who this process is under torch.distributed, and one report made of every rank's summary.

Kept apart from :mod:`gpumagic.distributed` so that the tracker can gather without importing
the trial machinery (which imports the tracker).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gpumagic.report import MemoryReport, RankRecord

__all__ = ["gather_ranks", "initialized", "rank", "rank_record", "world_size"]


def initialized() -> bool:
    import torch.distributed as dist

    return bool(dist.is_available() and dist.is_initialized())


def rank() -> int | None:
    """This process's rank, or ``None`` without an initialised process group."""
    if not initialized():
        return None
    import torch.distributed as dist

    return int(dist.get_rank())


def world_size() -> int | None:
    if not initialized():
        return None
    import torch.distributed as dist

    return int(dist.get_world_size())


def rank_record(report: MemoryReport, r: int) -> RankRecord:
    return RankRecord(
        rank=r,
        device=report.device,
        peak_bytes=report.peak_bytes,
        peak_delta_bytes=report.peak_delta_bytes,
        reserved_peak_bytes=report.reserved_peak_bytes,
        steps=report.total_steps,
        wall_seconds=report.wall_seconds,
        budget_bytes=report.budget_bytes,
        capacity_bytes=report.capacity_bytes,
        error=report.error,
    )


def gather_ranks(report: MemoryReport, *, ended_by: BaseException | None = None) -> MemoryReport:
    """``report`` with every rank's summary in ``ranks`` (rank order) and ``world_size`` set.

    One ``all_gather_object`` on the default group. A rank whose block raised does not join
    (the others may be inside a collective of their own; joining could pair it with theirs):
    its report then holds itself only, with a note. Never raises: a failed gather is a note.
    """
    if not initialized():
        return report
    import torch.distributed as dist

    me, n = int(dist.get_rank()), int(dist.get_world_size())
    own = rank_record(report, me)
    if ended_by is not None:
        note = f"ranks not gathered: rank {me} ended by {type(ended_by).__name__}"
        return dataclasses.replace(report, ranks=(own,), world_size=n, notes=(*report.notes, note))
    try:
        got: list[Any] = [None] * n
        dist.all_gather_object(got, dataclasses.asdict(own))
        ranks = tuple(sorted((RankRecord(**g) for g in got), key=lambda r: r.rank))
    except Exception as e:  # a broken group degrades the report, never the user's block
        note = f"ranks not gathered ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        return dataclasses.replace(report, ranks=(own,), world_size=n, notes=(*report.notes, note))
    return dataclasses.replace(report, ranks=ranks, world_size=n)

"""Disk quota: can the next checkpoint fit, and what must go first? Pure, no I/O.

``max_bytes`` bounds a job's checkpoints; ``min_free`` keeps free space on the
filesystem. Before a save, its size is reserved. If the limits cannot be met, the
quota deletes what retention allows it to delete, oldest first, labelled ``quota``;
if even deleting all of that would not be enough, nothing is deleted and the save
fails early with ``no_space``: a save that cannot happen must not cost the
checkpoints that already exist.

Quota may override window rules (keep_last, milestones, hourly/daily, within) but
never the newest verified, pinned, in-flight, best-K or final checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ckptd.core.retention import Item, Verdict
from ckptd.core.units import format_bytes


@dataclass(frozen=True)
class Budget:
    """The numbers quota decides over, measured at the edge."""

    reserve: int  # bytes the next checkpoint needs
    used: int  # bytes of this job's checkpoints that remain after retention
    max_bytes: int | None = None
    free: int | None = None  # free bytes on the filesystem now
    min_free: int = 0


@dataclass(frozen=True)
class QuotaChoice:
    ok: bool
    delete: tuple[Item, ...] = field(default_factory=tuple)
    reason: str = ""


def shortfall(b: Budget, freed: int) -> int:
    """Bytes still missing after freeing ``freed`` bytes (0 when the save fits)."""
    short = 0
    if b.max_bytes is not None:
        short = max(short, b.used - freed + b.reserve - b.max_bytes)
    if b.free is not None:
        short = max(short, b.reserve + b.min_free - (b.free + freed))
    return max(0, short)


def never_fits(one_checkpoint: int, max_bytes: int | None) -> str | None:
    """Why no save can ever fit the job's ``max_bytes`` (one checkpoint alone is larger), or None."""
    if max_bytes is None or one_checkpoint <= max_bytes:
        return None
    return (
        f"max_bytes={format_bytes(max_bytes)} is smaller than one checkpoint of this job (about "
        f"{format_bytes(one_checkpoint)}; {format_bytes(one_checkpoint - max_bytes)} missing with no other "
        f"checkpoint kept): no save can ever fit; raise max_bytes"
    )


def choose(kept: Sequence[Verdict], budget: Budget) -> QuotaChoice:
    """Oldest-first deletions among the unprotected kept checkpoints, or a refusal."""
    if shortfall(budget, 0) == 0:
        return QuotaChoice(True)
    hopeless = never_fits(budget.reserve, budget.max_bytes)
    if hopeless:  # deleting every checkpoint would not help: said as it is
        return QuotaChoice(False, (), hopeless)
    candidates = sorted((v.item for v in kept if v.keep and not v.protected), key=lambda i: (i.step, i.created, i.id))
    chosen: list[Item] = []
    freed = 0
    for item in candidates:
        chosen.append(item)
        freed += item.bytes
        if shortfall(budget, freed) == 0:
            return QuotaChoice(True, tuple(chosen))
    missing = shortfall(budget, freed)
    return QuotaChoice(
        False,
        (),
        f"needs {budget.reserve} bytes; even after deleting every deletable "
        f"checkpoint {missing} bytes would be missing",
    )

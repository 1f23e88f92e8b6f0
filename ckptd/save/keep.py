"""Retention and quota over a job's real directory: the plan and retain stages of a save.

``retention.judge`` decides over plain items; this module builds those items from what the
directory holds (``items_from``), asks the remote tier's cached index what is already
remote (never the store itself: a slow or hung store must not delay a local save), and
applies the deletions through ``ckptd.disk.remove`` (one directory fd per deletion, no link
followed). ``reserve`` runs before a save writes, ``prune`` after it committed.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Collection, Sequence

from ckptd.core import quota as quota_mod
from ckptd.core import retention
from ckptd.core.format import FormatError, read_header
from ckptd.core.settings import Settings
from ckptd.core.vocab import FailReason, Problem, Reason, Rule
from ckptd.disk.opened import Opened
from ckptd.disk.persist import PersistError
from ckptd.disk.preflight import free_bytes, min_free_bytes
from ckptd.disk.refs import check_refs
from ckptd.disk.remove import Removal, apply
from ckptd.disk.scan import Checkpoint, scan
from ckptd.disk.target import Target
from ckptd.foreign import deepspeed as dsfmt

__all__ = ["Removed", "collect", "evaluate", "items_from", "make_room", "prune", "prune_tags", "reserve", "unresolved"]

log = logging.getLogger(__name__)
Removed = Callable[[list[Removal]], None]


def _ignore(_: list[Removal]) -> None:
    pass


def items_from(
    checkpoints: Sequence[Checkpoint], best_metric: str | None, replicated: Collection[str] | None = None
) -> list[retention.Item]:
    """Header facts -> retention items. A final name means verified at write time; a file that
    refers to tensors it does not store is verified only while those references resolve
    (``unresolved``), else it is "unverified": kept, but never the newest verified checkpoint,
    so retention cannot delete the one that is in its place.
    ``replicated``: with a remote tier, the file names verified there (anything else is pending)."""
    out = []
    broken = unresolved(checkpoints)
    for c in checkpoints:
        abandoned = c.fault == Problem.ABANDONED
        if c.path in broken:
            log.warning("ckptd: %s is not complete, so not counted as verified: %s", c.path, broken[c.path])
        out.append(
            retention.item_of(
                c.path,
                c.step,
                c.created,
                c.bytes,
                trigger=c.trigger,
                metrics=c.metrics,
                best_metric=best_metric,
                verified=c.ok and not c.pending and c.path not in broken,
                corrupt=not c.ok and not abandoned,
                partial=abandoned,
                in_flight=c.pending,
                pinned=c.pinned,
                remote_pending=replicated is not None and os.path.basename(c.path) not in replicated,
                refs=tuple(os.path.join(os.path.dirname(c.path), f) for f in c.refs),
            )
        )
    return out


def unresolved(checkpoints: Sequence[Checkpoint]) -> dict[str, str]:
    """Path -> why its references do not resolve, for each file that has any: a holder missing,
    not a regular file beside it, or not holding the tensor with that digest where the reference
    says (a reference cycle is that: neither file holds what the other points to). Headers only,
    read through the directory's fd without following a link; the bytes were verified when each
    file was written, as for any final name."""
    out: dict[str, str] = {}
    for c in checkpoints:
        if not c.refs or not c.ok or c.shards:
            continue
        try:
            with Opened.beside(c.path) as opened:
                f, size = opened.open(os.path.basename(c.path))
                with f:
                    meta = read_header(f, size).metadata
                problem = check_refs(meta, opened.open, full=False)
        except (OSError, FormatError) as exc:
            problem = f"cannot read it again: {getattr(exc, 'strerror', None) or exc}"
        if problem:
            out[c.path] = problem
    return out


def evaluate(
    directory: str, job: str | None, settings: Settings, now: float, fresh_remote: bool = False
) -> list[retention.Verdict]:
    """The verdicts for one job's directory (every checkpoint in it without ``job``).
    ``fresh_remote``: list the remote tier now (``ckptd gc``) instead of reading its cached index."""
    rules = retention.Rules.from_settings(settings.retention())
    replicated = _replicated(settings, job, directory, fresh_remote) if settings.remote and job else None
    return retention.judge(items_from(scan(directory, job), rules.best_metric, replicated), rules, now)


def _replicated(settings: Settings, job: str, directory: str, fresh: bool) -> set[str]:
    """The job's file names committed on its remote tier (under its own prefix); none while that
    is not known (so local retention keeps everything until it is: a store that is down never
    costs a copy)."""
    from ckptd.remote.layout import prefix_in
    from ckptd.remote.listing import INDEX

    return INDEX.names(settings.remote_url(), settings.remote_endpoint, prefix_in(settings, job, directory), wait=fresh)


def collect(
    directory: str,
    job: str | None,
    settings: Settings,
    now: float,
    roots: Sequence[str],
    dry_run: bool = False,
    fresh_remote: bool = False,
) -> tuple[list[retention.Verdict], list[Removal]]:
    """Retention for one job (or every checkpoint in a directory): plan, then act."""
    verdicts = evaluate(directory, job, settings, now, fresh_remote)
    return verdicts, apply(verdicts, roots, settings.quarantine_dir, dry_run)


def make_room(
    directory: str, job: str, settings: Settings, reserve: int, now: float, roots: Sequence[str]
) -> tuple[quota_mod.QuotaChoice, list[Removal]]:
    """Retention's deletions, then quota's oldest-first ones if the next save needs them."""
    verdicts, removals = collect(directory, job, settings, now, roots)
    kept = [v for v in verdicts if v.keep]
    budget = quota_mod.Budget(
        reserve=reserve,
        used=sum(v.item.bytes for v in kept),
        max_bytes=settings.max_bytes,
        free=free_bytes(directory),
        min_free=min_free_bytes(directory, settings.min_free),
    )
    decision = quota_mod.choose(kept, budget)
    if decision.ok and decision.delete:
        doomed = [retention.Verdict(i, False, (Reason(Rule.QUOTA),)) for i in decision.delete]
        for i in decision.delete:
            if i.remote_pending:
                log.warning("quota deletes %s before it reached the remote tier (the only copy)", i.id)
        removals += apply(doomed, roots, settings.quarantine_dir)
    return decision, removals


def reserve(
    t: Target,
    nbytes: int,
    step: int,
    on_removed: Removed = _ignore,
    *,
    what: str = "checkpoint",
    note: str = "",
    now: float | None = None,
) -> None:
    """Make room for ``nbytes``, or raise ``no_space`` having deleted nothing for it."""
    room, removed = make_room(t.directory, t.job, t.settings, nbytes, time.time() if now is None else now, t.guard)
    on_removed(removed)
    if not room.ok:
        raise PersistError(
            FailReason.NO_SPACE,
            f"{what} of step {step} does not fit in {t.directory}: "
            f"{room.reason}; {note}existing checkpoints were left alone",
        )


def prune(t: Target, on_removed: Removed = _ignore, now: float | None = None) -> None:
    """Retention once the new checkpoint is in place."""
    on_removed(collect(t.directory, t.job, t.settings, time.time() if now is None else now, t.guard)[1])


def prune_tags(t: Target, on_removed: Removed = _ignore, now: float | None = None) -> None:
    """Retention over a DeepSpeed engine job's committed tags (``ckptd.foreign.deepspeed``): the
    same rules and the same removal (no link followed) as for its files, each tag one unit."""
    rules = retention.Rules.from_settings(t.settings.retention())
    if not rules.any_window:
        return
    items = items_from(dsfmt.job_tags(t.directory, t.job), rules.best_metric)
    verdicts = retention.judge(items, rules, time.time() if now is None else now)
    on_removed(apply(verdicts, t.guard, t.settings.quarantine_dir))

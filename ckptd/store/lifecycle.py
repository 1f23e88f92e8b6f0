"""One save, from "it is due" to "it is on disk, verified, and retention has run".

The daemon's sessions, the hook's embedded worker and every rank of a sharded save
run the same stages, in this order; only where the bytes come from (a memfd received
over the socket, or the hook's own staging buffer) and who is told differ:

1. **reserve** (``reserve``): retention's own deletions (due anyway), then quota for
   the expected bytes, oldest first. If the checkpoint cannot fit even after every
   deletion quota may make, nothing is deleted and the save fails early with
   ``no_space``: a save that cannot happen must not cost the checkpoints that exist.
   A sharded save reserves once, on rank 0, for every rank's shard.
2. **write** (``ckptd.store.persist``): hash every tensor, temp file, fsync, read it
   back from disk, rename, fsync the directory. A final name means verified.
3. **written**: the caller's hook runs between write and prune: the daemon checks
   the header against the request and catalogues the file; a sharded rank agrees
   with its peers and rank 0 writes the manifest (``trainer_hooks.shards``).
4. **prune** (``prune``): retention again, now that the newest checkpoint is in place.

Any exception on the way becomes one ``PersistError`` with a reason from the fixed
set (``failure``), so training and the daemon both see "save failed (reason)" and go
on. ``newest_verified`` is the one resume search: newest first, the first that
verifies now.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterable, Mapping, Sequence, TypeVar

from ckptd.core import quota as quota_mod
from ckptd.core import retention
from ckptd.core.vocab import FailReason, Problem, Reason, Rule, Trigger
from ckptd.store.persist import Persisted, PersistError, persist, reason_for
from ckptd.store.preflight import free_bytes, min_free_bytes
from ckptd.store.remove import Removal, apply
from ckptd.store.safepath import OutsideRoots, open_dir
from ckptd.store.scan import Checkpoint, scan
from ckptd.store.verify import VerifyResult, verify_file

__all__ = ["Target", "collect", "evaluate", "failure", "first_verified", "items_from", "make_room", "newest_verified", "prune",
           "reserve", "save_unit"]

log = logging.getLogger("ckptd.store")
Removed = Callable[[list[Removal]], None]
T = TypeVar("T")


def _ignore(_: list[Removal]) -> None:
    pass


@dataclass(frozen=True)
class Target:
    """Where one job's checkpoints live and the settings retention and quota read."""

    directory: str
    job: str
    settings: Mapping[str, Any]
    roots: Sequence[str] = field(default_factory=tuple)
    owner: int | None = None  # the uid that must still own the directory at each save (unprivileged clients)

    @property
    def guard(self) -> Sequence[str]:
        """Deletions never leave these: the daemon's roots, or the job's own directory."""
        return self.roots or (self.directory,)


# -- retention and quota over a real directory -----------------------------------------------

def items_from(checkpoints: Sequence[Checkpoint], best_metric: str | None,
               replicated: Collection[str] | None = None) -> list[retention.Item]:
    """Header facts -> retention items. A final name means verified at write time.
    ``replicated``: with a remote tier, the file names verified there (anything else is pending)."""
    out = []
    for c in checkpoints:
        metric = c.metrics.get(best_metric) if best_metric else None
        abandoned = c.fault == Problem.ABANDONED
        out.append(retention.Item(c.path, c.step, c.created, c.bytes, verified=c.ok and not c.pending,
                                  corrupt=not c.ok and not abandoned, partial=abandoned, in_flight=c.pending,
                                  pinned=c.pinned, final=c.trigger == Trigger.FINAL,
                                  metric=float(metric) if isinstance(metric, (int, float)) else None,
                                  remote_pending=replicated is not None and os.path.basename(c.path) not in replicated))
    return out


def evaluate(directory: str, job: str | None, settings: Mapping[str, Any], now: float) -> list[retention.Verdict]:
    rules = retention.Rules.from_settings(settings)
    replicated = replicated_names(settings, job) if settings.get("remote") and job else None
    return retention.plan(items_from(scan(directory, job), rules.best_metric, replicated), rules, now)


def replicated_names(settings: Mapping[str, Any], job: str) -> set[str]:
    """The job's file names committed on its remote tier; none when the store cannot say (so
    local retention keeps everything until it can: a store that is down never costs a copy)."""
    from ckptd.store.remote import RemoteError, open_store
    from ckptd.store.replicate import committed

    try:
        return {c.name for c in committed(open_store(settings["remote"], settings.get("remote_endpoint")), job)}
    except RemoteError:
        return set()


def collect(directory: str, job: str | None, settings: Mapping[str, Any], now: float,
            roots: Sequence[str], dry_run: bool = False) -> tuple[list[retention.Verdict], list[Removal]]:
    """Retention for one job (or every checkpoint in a directory): plan, then act."""
    verdicts = evaluate(directory, job, settings, now)
    return verdicts, apply(verdicts, roots, settings.get("quarantine_dir"), dry_run)


def make_room(directory: str, job: str, settings: Mapping[str, Any], reserve: int, now: float,
              roots: Sequence[str]) -> tuple[quota_mod.QuotaPlan, list[Removal]]:
    """Retention's deletions, then quota's oldest-first ones if the next save needs them."""
    verdicts, removals = collect(directory, job, settings, now, roots)
    kept = [v for v in verdicts if v.keep]
    budget = quota_mod.Budget(reserve=reserve, used=sum(v.item.bytes for v in kept),
                              max_bytes=settings.get("max_bytes"), free=free_bytes(directory),
                              min_free=min_free_bytes(directory, settings.get("min_free")))
    decision = quota_mod.plan(kept, budget)
    if decision.ok and decision.delete:
        doomed = [retention.Verdict(i, False, (Reason(Rule.QUOTA),)) for i in decision.delete]
        for i in decision.delete:
            if i.remote_pending:
                log.warning("quota deletes %s before it reached the remote tier (the only copy)", i.id)
        removals += apply(doomed, roots, settings.get("quarantine_dir"))
    return decision, removals


# -- the stages ------------------------------------------------------------------------------

def reserve(t: Target, nbytes: int, step: int, on_removed: Removed = _ignore, *, what: str = "checkpoint",
            note: str = "", now: float | None = None) -> None:
    """Stage 1: make room for ``nbytes``, or raise ``no_space`` having deleted nothing for it."""
    room, removed = make_room(t.directory, t.job, t.settings, nbytes, time.time() if now is None else now, t.guard)
    on_removed(removed)
    if not room.ok:
        raise PersistError(FailReason.NO_SPACE, f"{what} of step {step} does not fit in {t.directory}: "
                                                f"{room.reason}; {note}existing checkpoints were left alone")


def prune(t: Target, on_removed: Removed = _ignore, now: float | None = None) -> None:
    """Stage 4: retention once the new checkpoint is in place."""
    on_removed(collect(t.directory, t.job, t.settings, time.time() if now is None else now, t.guard)[1])


def save_unit(t: Target, fd: int, length: int, filename: str, step: int, *, on_removed: Removed = _ignore,
              on_written: Callable[[Persisted], None] | None = None) -> Persisted:
    """Stages 1-4 for a single-file checkpoint whose image is in ``fd``."""
    reserve(t, length, step, on_removed)
    dfd = open_target(t)
    try:
        result = persist(fd, length, t.directory, filename, dir_fd=dfd,
                         expect={"ckptd.job": t.job, "ckptd.step": str(step)})
    finally:
        os.close(dfd)
    if on_written is not None:
        on_written(result)
    prune(t, on_removed)
    return result


def open_target(t: Target) -> int:
    """The job directory, reached from its root without following links, still owned as at hello.

    A client that swaps its directory (or one above it) for a symlink after ``hello``
    gets a refused save, not a file written wherever the link points.
    """
    try:
        dfd = open_dir(t.directory, t.guard)
    except OutsideRoots as exc:
        raise PersistError(FailReason.PERMISSION, str(exc)) from None
    except OSError as exc:
        raise PersistError(reason_for(exc) if exc.errno not in (errno.ELOOP, errno.ENOTDIR) else FailReason.PERMISSION,
                           f"cannot open checkpoint directory {t.directory} (no links are followed under the "
                           f"roots): {exc.strerror or exc}") from None
    owner = os.fstat(dfd).st_uid
    if t.owner is not None and owner != t.owner:
        os.close(dfd)
        raise PersistError(FailReason.PERMISSION, f"checkpoint directory {t.directory} is owned by uid {owner}, "
                                                  f"not by the job's uid {t.owner}")
    return dfd


def failure(exc: BaseException, step: int) -> PersistError:
    """Any error of a save as the one failure type; unexpected ones are logged with their traceback."""
    if isinstance(exc, PersistError):
        return exc
    if isinstance(exc, OSError):  # room-making and retention touch the disk too
        return PersistError(reason_for(exc), f"step {step}: {exc}")
    log.error("unexpected error saving step %d", step, exc_info=exc)
    return PersistError(FailReason.INTERNAL_ERROR, str(exc))


# -- resume ------------------------------------------------------------------------------------

def reread(c: Checkpoint) -> VerifyResult:
    """Every tensor read back from disk (a sharded unit: every shard's)."""
    return verify_file(c.path)


def first_verified(candidates: Iterable[T], check: Callable[[T], VerifyResult]) -> T | None:
    """The first candidate (callers pass them newest first) that verifies now."""
    for c in candidates:
        result = check(c)
        if result.ok:
            return c
        log.warning("ckptd: skipping %s: %s", result.path, result.reason)
    return None


def newest_verified(directory: str, job: str | None = None, *, units: bool = True,
                    check: Callable[[Checkpoint], VerifyResult] = reread) -> Checkpoint | None:
    """The newest checkpoint of ``job`` in ``directory`` that verifies now (None if none does).

    ``units=False`` skips sharded units (for readers that load a single file);
    ``check`` lets a sharded rank verify its own shard and agree with its peers (so
    every rank must see the same candidates: uncommitted units are checked, not skipped).
    """
    if not os.path.isdir(directory):
        return None
    return first_verified([c for c in reversed(scan(directory, job)) if units or not c.shards], check)

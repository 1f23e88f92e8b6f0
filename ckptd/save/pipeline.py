"""One save, from "it is due" to "it is on disk, verified, kept or pruned, and on its way off the host".

The daemon's sessions (``ckptd.daemon.session``), the hook's embedded worker
(``trainer_hooks._handoff.outlet``) and every rank of a sharded save run these stages, in this
order, through the functions below; only where the bytes come from and who is told differ:

1. **plan** (``keep.reserve``): retention's own deletions (due anyway), then quota for the
   bytes this save needs, oldest first. If it cannot fit even after every deletion quota
   may make, nothing is deleted and the save fails early with ``no_space``: a save that
   cannot happen must not cost the checkpoints that exist. A sharded save plans once, on
   rank 0, for every rank's shard, and clears a stale attempt at the same step.
2. **snapshot**: done before the pipeline, by the caller: the trainer copied its state
   into a memfd (``trainer_hooks._snapshot.staging``), handed over by fd (to the daemon) or kept
   (embedded, sharded). The pipeline reads it; it never touches the trainer's tensors.
3. **write** (``disk.target`` then ``disk.persist``): the job directory is opened through
   the guard (from a root, no link followed, still owned by the job's uid; a sharded
   unit's directory below it the same way), then digests, a temp file, fsync,
4. **verify**: every tensor read back from disk and checked, then the rename to the final
   name and the directory's fsync. A final name means verified.
5. **commit**: a single file is committed by its rename; the daemon checks the header
   against the request and catalogues it (``Hooks.committed``). A sharded save's ranks
   agree (``agree``) and rank 0 writes the manifest; the daemon, told by rank 0,
   re-checks the unit through the same guard and catalogues it (``commit_unit``).
6. **retain** (``keep.prune``): retention again, now that the newest checkpoint is in place.
7. **replicate** (``Hooks.replicate``): a job with a remote tier queues the checkpoint
   for the uploader (``ckptd.remote.uploader``), which never blocks the next save; across
   node-local disks each lead (or its daemon) queues its host's part (``ckptd.remote.upload``).

Any exception on the way becomes one ``PersistError`` with a reason from the fixed set
(``failure``), so training and the daemon both see "save failed (reason)" and go on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from ckptd.core.vocab import FailReason
from ckptd.disk import manifest as mf
from ckptd.disk.persist import Persisted, PersistError, persist, reason_for
from ckptd.disk.remove import Removal, remove
from ckptd.disk.scan import Checkpoint, read_info
from ckptd.disk.target import Target, open_target, opened_unit
from ckptd.disk.verify import verify_unit
from ckptd.foreign import deepspeed as dsfmt
from ckptd.save.agree import Agreement, commit_here, shard_outcome, uncommit
from ckptd.save.keep import prune, prune_tags, reserve

__all__ = ["Hooks", "StagedShard", "commit_tag", "commit_unit", "failure", "save_shard", "save_unit"]

log = logging.getLogger(__name__)


def _ignore(_: list[Removal]) -> None:
    pass


@dataclass(frozen=True)
class Hooks:
    """Who hears of a save's stages. Each is optional: an embedded save tells nobody but its caller."""

    removed: Callable[[list[Removal]], None] = field(default=_ignore)  # deletions of stages 1 and 6
    committed: Callable[[Persisted], None] | None = None  # stage 5: the daemon catalogues and counts
    replicate: Callable[[Persisted], None] | None = None  # stage 7


def save_unit(t: Target, fd: int, length: int, filename: str, step: int, hooks: Hooks = Hooks()) -> Persisted:
    """The stages for a single-file checkpoint whose image is in ``fd``."""
    reserve(t, length, step, hooks.removed)  # 1
    dfd = open_target(t)  # 3
    try:
        result = persist(
            fd,
            length,
            t.directory,
            filename,
            dir_fd=dfd,  # 3-4
            expect={"ckptd.job": t.job, "ckptd.step": str(step)},
            dedup=True,
            keep_fd=hooks.replicate is not None,
        )
    finally:
        os.close(dfd)
    try:
        if hooks.committed is not None:  # 5
            hooks.committed(result)
        prune(t, hooks.removed)  # 6
        if hooks.replicate is not None:  # 7: the uploader dups ``result.fd`` (what verified) if it keeps it
            hooks.replicate(result)
    finally:
        if result.fd is not None:
            os.close(result.fd)
    return result


@dataclass(frozen=True)
class StagedShard:
    """One rank's part of a sharded save: its staged image and where it goes."""

    fd: int
    length: int
    unit: str  # the unit's directory name in the job directory
    filename: str  # this rank's file in it (``rankR-of-W.safetensors``)
    step: int
    trigger: str
    stall: float = 0.0


def save_shard(
    group: Agreement, t: Target, shard: StagedShard, hooks: Hooks, report: Callable[[dict[str, Any]], bool]
) -> Persisted:
    """The stages on every rank of a sharded save. ``report`` hands a lead's outcome to its
    host's daemon (which then runs 5-7 for the unit, ``commit_unit``); False: there is none,
    and the lead retains (and, when the unit is whole on its disk, replicates) here."""
    reason, message = group.prepare(lambda: _prepare_unit(t, shard, group.here, hooks.removed))  # 1
    if reason:
        raise PersistError(FailReason(reason), message)
    path = os.path.join(t.directory, shard.unit)
    persisted, error = None, None
    try:
        persisted = _write_shard(t, shard, path)  # 3-4
    except (PersistError, OSError) as exc:
        error = exc
    problem = _commit(group, t, shard, persisted, error)  # 5
    failed = error.reason if isinstance(error, PersistError) else FailReason.UNCOMMITTED
    told = report(
        {
            "type": "committed",
            "step": shard.step,
            "path": path,
            "trigger": shard.trigger,
            "ok": not problem,
            "reason": failed,
            "error": problem,
            "stall": shard.stall,
            **(persisted.durations if persisted else {}),
        }
    )
    if problem:
        raise PersistError(failed, f"sharded checkpoint of step {shard.step} not committed: {problem}")
    assert persisted is not None
    result = Persisted(path, persisted.bytes, persisted.metadata, persisted.durations)
    if not told and group.lead:
        prune(t, hooks.removed)  # 6
        if hooks.replicate is not None:  # 7: across node-local disks, this host's part
            hooks.replicate(result)
    return result


def _commit(
    group: Agreement, t: Target, shard: StagedShard, persisted: Persisted | None, error: Exception | None
) -> str:
    """Stage 5 on every rank: "" when every disk committed. A lead whose disk committed while
    another's did not takes its manifest back, so that no disk holds a unit committed that the
    others lack (retention there would count it as the newest, resume skips it)."""
    wrote: list[bool] = []

    def here(outcomes: list[dict[str, Any]]) -> str:
        problem = commit_here(t, shard.unit, outcomes, group.world_size, group.disk)
        wrote.append(not problem)
        return problem

    spread = group.disks > 1  # the host and disk of each shard, in the manifest, only when they differ
    outcome = shard_outcome(group.rank, shard.step, persisted, error, group.host if spread else "", group.disk)
    problem = group.commit(outcome, here)
    if problem and any(wrote):
        uncommit(t, shard.unit)
    return problem


def _write_shard(t: Target, shard: StagedShard, path: str) -> Persisted:
    with opened_unit(t, shard.unit, create=True) as (_, ufd):
        return persist(shard.fd, shard.length, path, shard.filename, dir_fd=ufd)


def _prepare_unit(t: Target, shard: StagedShard, ranks: int, removed: Callable[[list[Removal]], None]) -> None:
    """A disk's lead, while the other ranks wait: room for its ``ranks``' shards, and a clean target."""
    reserve(t, shard.length * ranks, shard.step, removed, what="sharded checkpoint", note="no rank wrote its shard, ")
    path = os.path.join(t.directory, shard.unit)
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, mf.MANIFEST)):
        log.warning("ckptd: removing %s, an uncommitted earlier attempt at step %d", path, shard.step)
        remove(path, t.guard)


def commit_unit(t: Target, name: str, step: int, hooks: Hooks) -> Checkpoint:
    """Stages 5-7 as the daemon runs them for the unit ``name`` its trainer's ranks wrote and
    agreed on: through the same guard as a write (its directory in the job's, reached without
    a link, still the job uid's), then its manifest and every shard's size and header checked
    (their writers verified them from disk), then ``committed``, retention and replication."""
    path = os.path.join(t.directory, name)
    with opened_unit(t, name):
        pass
    result, info = verify_unit(path, full=()), read_info(path)
    if not result.ok or info.job != t.job or info.step != step:
        raise PersistError(
            FailReason.VERIFY_FAILED,
            f"sharded checkpoint {path}: {result.reason or 'job or step differ from the message'}",
        )
    persisted = Persisted(path, info.bytes, result.metadata)
    if hooks.committed is not None:
        hooks.committed(persisted)
    prune(t, hooks.removed)
    if hooks.replicate is not None:  # across node-local disks, this host's part
        hooks.replicate(persisted)
    return info


def commit_tag(t: Target, name: str, step: int, hooks: Hooks) -> Checkpoint:
    """Stages 5-6 as the daemon runs them for a DeepSpeed tag an engine job's ranks wrote,
    verified and agreed on, and its rank 0 committed (``trainer_hooks.deepspeed``): reached through
    the same guard as a unit (in the job's directory, no link, the job uid's), every entry a
    plain file (no link or FIFO to make the daemon read elsewhere), then every rank's file
    present and verified (``ckptd.foreign.deepspeed.verify``: zip CRCs, an inert load), then
    ``committed`` and retention over the job's tags. Not replicated: the remote tier takes
    ckptd's own files and units only."""
    path = os.path.join(t.directory, name)
    with opened_unit(t, name) as (_, ufd):
        hostile = dsfmt.not_plain(ufd)
    result = dsfmt.verify(path) if not hostile else None
    info = dsfmt.committed_info(path)
    if result is None or not result.ok or info.job != t.job or info.step != step:
        why = (
            hostile
            or (result.reason if result is not None and not result.ok else "")
            or "job or step differ from the message"
        )
        raise PersistError(FailReason.VERIFY_FAILED, f"DeepSpeed checkpoint {path}: {why}")
    if hooks.committed is not None:
        hooks.committed(Persisted(path, info.bytes, {}))
    prune_tags(t, hooks.removed)
    return info


def failure(exc: BaseException, step: int) -> PersistError:
    """Any error of a save as the one failure type; unexpected ones are logged with their traceback."""
    if isinstance(exc, PersistError):
        return exc
    if isinstance(exc, OSError):  # room-making and retention touch the disk too
        return PersistError(reason_for(exc), f"step {step}: {exc}")
    log.error("unexpected error saving step %d", step, exc_info=exc)
    return PersistError(FailReason.INTERNAL_ERROR, str(exc))

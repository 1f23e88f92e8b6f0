"""What the ranks of a sharded save agree on, and what each disk's lead rank commits.

The collectives themselves are the hook's (``trainer_hooks._ranks.shards.ShardGroup``, over
torch.distributed gloo groups of ckptd's own); everything they carry and decide is here,
torch-free: each rank's ``shard_outcome``, and ``commit_here``, which the lead rank of each
disk (the lowest rank writing to it: rank 0 alone when every rank shares one directory; one
per host with node-local directories) runs: it checks every shard on its disk against what
its rank reported and writes the manifest, the same on every disk, through the save's
guarded directory fds. ``Agreement`` is what the pipeline needs of the collectives.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Protocol

from ckptd.disk import manifest as mf
from ckptd.disk.persist import Persisted
from ckptd.disk.target import Target, opened_unit

__all__ = ["Agreement", "commit_here", "manifest_from", "shard_outcome", "uncommit"]

log = logging.getLogger(__name__)


class Agreement(Protocol):
    """The ranks of one sharded job, as the save pipeline uses them (``ShardGroup``)."""

    rank: int
    world_size: int
    lead: bool  # the lowest rank writing to this rank's disk: it prepares and commits there
    here: int  # how many ranks write to this rank's disk
    host: str
    disk: str  # ``manifest.DISK_ID`` of this rank's job directory
    disks: int  # how many disks the ranks write to (1: one host, or a shared filesystem)

    def prepare(self, on_lead: Callable[[], None]) -> tuple[str, str]:
        """Each lead runs ``on_lead`` while the others wait; every rank gets ``(reason, message)``."""
        ...

    def commit(self, outcome: dict[str, Any], on_lead: Callable[[list[dict[str, Any]]], str]) -> str:
        """Gather every rank's outcome; each lead commits them on its disk with ``on_lead``; ""
        = committed on every disk."""
        ...


def shard_outcome(
    rank: int,
    step: int,
    persisted: Persisted | None = None,
    error: Exception | None = None,
    host: str = "",
    disk: str = "",
) -> dict[str, Any]:
    """What one rank reports to the others about its shard (and where it wrote it)."""
    if persisted is None:
        return {"ok": False, "rank": rank, "step": step, "error": str(error)}
    meta = {k: v for k, v in persisted.metadata.items() if k != "ckptd.state"}  # the skeleton can be large
    return {
        "ok": True,
        "rank": rank,
        "step": step,
        "file": os.path.basename(persisted.path),
        "bytes": persisted.bytes,
        "meta": meta,
        "host": host,
        "disk": disk,
    }


def commit_here(t: Target, unit: str, outcomes: list[dict[str, Any]], world_size: int, disk: str = "") -> str:
    """Every rank verified the same step and each file on this disk is there, whole: write the
    manifest ("" when committed, else why not). Through the guard: the unit is reached from the
    job directory's fd. ``disk``: this directory's disk id; shards written to other disks
    (node-local directories) are their own lead's to check."""
    problem = mf.commit_problem(outcomes, world_size)
    if problem:
        return problem
    manifest = manifest_from(outcomes, world_size)
    try:
        with opened_unit(t, unit) as (dfd, ufd):
            return _check_and_write(ufd, dfd, os.path.join(t.directory, unit), manifest, disk)
    except Exception as exc:  # PersistError from the guard, OSError from the disk
        return f"committing {os.path.join(t.directory, unit)} failed: {getattr(exc, 'strerror', None) or exc}"


def uncommit(t: Target, unit: str) -> None:
    """Take this disk's manifest of ``unit`` back (another disk did not commit it): the unit is
    then an uncommitted attempt here too, removed as ``partial`` once a later save commits."""
    try:
        with opened_unit(t, unit) as (_, ufd):
            os.unlink(mf.MANIFEST, dir_fd=ufd)
            os.fsync(ufd)
    except FileNotFoundError:
        pass
    except Exception as exc:  # PersistError from the guard, OSError from the disk
        log.error("ckptd: %s: could not take back its manifest: %s", os.path.join(t.directory, unit), exc)


def _check_and_write(ufd: int, dfd: int, path: str, manifest: mf.Manifest, disk: str) -> str:
    here = [s for s in manifest.shards if not disk or s.disk == disk]  # node-local: the other leads check theirs
    for shard in here:  # a manifest never names a file of this disk that is not there, whole
        size = os.stat(shard.file, dir_fd=ufd, follow_symlinks=False).st_size
        if size != shard.bytes:
            return f"{shard.file} is {size} bytes on disk, rank {shard.rank} wrote {shard.bytes}"
    for name in mf.stale_entries(os.listdir(ufd), manifest):
        os.unlink(name, dir_fd=ufd)
    mf.write(path, manifest, dir_fd=ufd, parent_fd=dfd)
    return ""


def manifest_from(outcomes: list[dict[str, Any]], world_size: int) -> mf.Manifest:
    """Rank 0's header fields describe the whole checkpoint; every rank adds its shard."""
    head = next(o for o in outcomes if o["rank"] == 0)["meta"]
    shards = tuple(
        sorted(
            (
                mf.Shard(
                    o["rank"],
                    o["file"],
                    o["bytes"],
                    o["meta"]["ckptd.meta_digest"],
                    o.get("host", ""),
                    o.get("disk", ""),
                )
                for o in outcomes
            ),
            key=lambda s: s.rank,
        )
    )
    epoch = head.get("ckptd.epoch")
    return mf.Manifest(
        head["ckptd.job"],
        int(head["ckptd.step"]),
        world_size,
        shards,
        head.get("ckptd.created", ""),
        float(epoch) if epoch else None,
        head.get("ckptd.trigger", ""),
        head.get("ckptd.rule", ""),
        _json_dict(head.get("ckptd.metrics", "{}")),
        head.get("ckptd.layout", mf.PER_RANK),
    )


def _json_dict(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}

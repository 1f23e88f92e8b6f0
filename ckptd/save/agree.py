"""What the ranks of a sharded save agree on, and what rank 0 commits.

The collectives themselves are the hook's (``trainer_hooks._ranks.shards.ShardGroup``, over
torch.distributed gloo groups of ckptd's own); everything they carry and decide is here,
torch-free: each rank's ``shard_outcome``, and rank 0's ``commit_on_rank0``, which checks
every shard against what its rank reported and writes the manifest through the save's
guarded directory fds. ``Agreement`` is what the pipeline needs of the collectives.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Protocol

from ckptd.disk import manifest as mf
from ckptd.disk.persist import Persisted
from ckptd.disk.target import Target, open_target, open_unit

__all__ = ["Agreement", "commit_on_rank0", "manifest_from", "shard_outcome"]


class Agreement(Protocol):
    """The ranks of one sharded job, as the save pipeline uses them (``ShardGroup``)."""

    rank: int
    world_size: int

    def prepare(self, on_rank0: Callable[[], None]) -> tuple[str, str]:
        """Rank 0 runs ``on_rank0`` while the others wait; every rank gets ``(reason, message)``."""
        ...

    def commit(self, outcome: dict[str, Any], on_rank0: Callable[[list[dict[str, Any]]], str]) -> str:
        """Gather every rank's outcome; rank 0 commits them with ``on_rank0``; "" = committed."""
        ...


def shard_outcome(
    rank: int, step: int, persisted: Persisted | None = None, error: Exception | None = None
) -> dict[str, Any]:
    """What one rank reports to the others about its shard."""
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
    }


def commit_on_rank0(t: Target, unit: str, outcomes: list[dict[str, Any]], world_size: int) -> str:
    """Every rank verified the same step and its file is there, whole: write the manifest ("" when
    committed, else why not). Through the guard: the unit is reached from the job directory's fd."""
    problem = mf.commit_problem(outcomes, world_size)
    if problem:
        return problem
    manifest = manifest_from(outcomes, world_size)
    try:
        dfd = open_target(t)
        try:
            ufd = open_unit(t, dfd, unit, create=False)
            try:
                return _check_and_write(ufd, dfd, os.path.join(t.directory, unit), manifest)
            finally:
                os.close(ufd)
        finally:
            os.close(dfd)
    except Exception as exc:  # PersistError from the guard, OSError from the disk
        return f"committing {os.path.join(t.directory, unit)} failed: {getattr(exc, 'strerror', None) or exc}"


def _check_and_write(ufd: int, dfd: int, path: str, manifest: mf.Manifest) -> str:
    for shard in manifest.shards:  # a manifest never names a file that is not there, whole
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
            (mf.Shard(o["rank"], o["file"], o["bytes"], o["meta"]["ckptd.meta_digest"]) for o in outcomes),
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

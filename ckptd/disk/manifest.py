"""Sharded checkpoints: one directory, one shard per rank, and a manifest written last.

Layout of one sharded checkpoint (``sharded=True``)::

    DIR/job-step00000040/                      the unit: listed, kept, deleted as one
        rank00000-of-00004.safetensors         each rank's own state, an ordinary ckptd file
        ...
        rank00003-of-00004.safetensors
        ckptd-manifest.json                    written last: its presence is the commit

Two layouts: ``per-rank`` (each shard holds its rank's own state; it resumes on the same
number of ranks) and ``dcp`` (DTensor state, FSDP2: each shard holds the chunks
torch.distributed.checkpoint's planner gave its rank, named by their DCP keys with their
offsets, so it resumes on any number of ranks and opens with ``dcp.load``).

The manifest names every shard with its size and its header's ``ckptd.meta_digest``
(a digest over the metadata, which holds every tensor's xxh3-64), so a shard that is
swapped, truncated, or left over from another attempt does not pass for a member. It
is written only after every rank verified its own shard from disk and all ranks
agreed, by the same temp → fsync → rename → fsync-directory sequence as a shard: a
directory is a committed checkpoint if and only if it holds a manifest. One without
(a rank died, a disk filled) is never loaded, and is removed once a later save commits.

This module is the format only (no torch, no collectives): ``trainer_hooks._ranks.shards``
runs the agreement, ``ckptd.disk.verify.verify_unit`` checks a unit, ``ckptd.disk.scan`` lists them.
"""

from __future__ import annotations

import json
import os
import re
import stat
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Collection, Sequence

from ckptd.core.format import FORMAT_VERSION
from ckptd.disk.safepath import fsync_dir

MANIFEST = "ckptd-manifest.json"
DISK_RE = re.compile(r"[0-9a-f]{32}")
DISK_ID = ".ckptd-disk"  # in a job directory: which disk it is on (``disk_of``), so ranks tell node-local disks apart
MAX_MANIFEST_BYTES = 16 << 20
PER_RANK, DCP = "per-rank", "dcp"  # each rank its own state / chunks planned by DCP (trainer_hooks._ranks.dcpio)
SHARD_RE = re.compile(r"^rank(\d{5})-of-(\d{5})\.safetensors$")


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or inconsistent."""


class NotCommitted(ManifestError):
    """No manifest at all: the sharded save never committed (or is still committing)."""


def shard_name(rank: int, world_size: int) -> str:
    return f"rank{rank:05d}-of-{world_size:05d}.safetensors"


def unit_name(filename: str) -> str:
    """The unit directory of a sharded save: the single-file name without its suffix."""
    return filename[: -len(".safetensors")] if filename.endswith(".safetensors") else filename


@dataclass(frozen=True)
class Shard:
    rank: int
    file: str
    bytes: int
    meta_digest: str
    host: str = ""  # the host whose rank wrote it (for people: "rank 2 on gpu-b")
    disk: str = ""  # the id of the disk it was written to (``DISK_ID``); "" in manifests before node-local disks


@dataclass(frozen=True)
class Manifest:
    job: str
    step: int
    world_size: int
    shards: tuple[Shard, ...]
    created: str = ""
    epoch: float | None = None
    trigger: str = ""
    rule: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    layout: str = PER_RANK  # or "dcp": chunks planned by torch.distributed.checkpoint, reshardable

    def to_json(self) -> str:
        shards = [{k: v for k, v in asdict(s).items() if v != "" or k not in ("host", "disk")} for s in self.shards]
        body = {"ckptd.format": FORMAT_VERSION, **asdict(self), "shards": shards}  # one host: as before
        return json.dumps(body, indent=1, sort_keys=True)

    @classmethod
    def parse(cls, text: str) -> "Manifest":
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict) or raw.get("ckptd.format") != FORMAT_VERSION:
                raise ManifestError(f"not a ckptd manifest of format {FORMAT_VERSION}")
            shards = tuple(
                Shard(
                    int(s["rank"]),
                    str(s["file"]),
                    int(s["bytes"]),
                    str(s["meta_digest"]),
                    str(s.get("host", "")),
                    str(s.get("disk", "")),
                )
                for s in raw["shards"]
            )
            metrics = raw.get("metrics")
            m = cls(
                str(raw["job"]),
                int(raw["step"]),
                int(raw["world_size"]),
                shards,
                str(raw.get("created", "")),
                None if raw.get("epoch") is None else float(raw["epoch"]),
                str(raw.get("trigger", "")),
                str(raw.get("rule", "")),
                metrics if isinstance(metrics, dict) else {},
                str(raw.get("layout", PER_RANK)),
            )
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise ManifestError(f"unreadable manifest: {exc}") from None
        if sorted(s.rank for s in m.shards) != list(range(m.world_size)):
            raise ManifestError(
                f"manifest lists ranks {sorted(s.rank for s in m.shards)} for world size {m.world_size}"
            )
        if any(s.file != shard_name(s.rank, m.world_size) for s in m.shards):
            raise ManifestError("manifest names a shard file that does not match its rank")
        if any(s.disk and not DISK_RE.fullmatch(s.disk) for s in m.shards):
            raise ManifestError("manifest names a disk that is not a disk id (32 hex digits)")
        if any(len(s.host) > 255 or not s.host.isprintable() for s in m.shards):
            raise ManifestError("manifest names a host that is not a host name")
        return m


def away(m: Manifest, present: Collection[str]) -> set[int]:
    """The ranks whose shards this copy of the unit lacks because other hosts hold them
    (``present``: the file names it holds). With node-local directories each host's copy holds
    its own ranks' shards: the disk of this copy is the one its present shards were written to,
    and absent shards the manifest puts on other disks are their hosts'. Nothing is excused for
    a unit on one disk, one whose manifest predates disk ids, one with no shard here, or one
    whose present shards name two disks. The copy itself says where it is: no file beside it is
    trusted for that."""
    disks = {s.disk for s in m.shards}
    here = {s.disk for s in m.shards if s.file in present}
    if len(disks) < 2 or "" in disks or len(here) != 1:
        return set()
    return {s.rank for s in m.shards if s.disk not in here and s.file not in present}


def disk_of(directory_fd: int, create: bool) -> str:
    """The id of the disk a job directory is on: ``DISK_ID`` in it, read, or made once (a random
    id, written whole before it takes its name, so ranks racing to make it all read the same).
    Ranks that read the same id share the directory; ranks on node-local disks each read their
    own. "" when there is none and ``create`` is False."""
    try:
        return _read_disk(directory_fd)
    except FileNotFoundError:
        if not create:
            return ""
    tmp = f".{DISK_ID}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=directory_fd)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(uuid.uuid4().hex)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, DISK_ID, src_dir_fd=directory_fd, dst_dir_fd=directory_fd, follow_symlinks=False)
        except FileExistsError:  # another rank on this disk made it first: theirs counts
            pass
    finally:
        os.unlink(tmp, dir_fd=directory_fd)
    os.fsync(directory_fd)  # a crash must not leave the disk a new id next time
    return _read_disk(directory_fd)


def _read_disk(directory_fd: int) -> str:
    fd = os.open(DISK_ID, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=directory_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.fstat(directory_fd).st_uid:
            return ""  # a directory or FIFO at its name, or someone else's file: no id
        text = os.read(fd, 64).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    return text if DISK_RE.fullmatch(text) else ""


def is_unit(path: str) -> bool:
    """A directory that holds a manifest or rank shards (committed or not); never a symlink."""
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return MANIFEST in names or any(SHARD_RE.match(n) for n in names)


def read(unit: str) -> Manifest:
    path = os.path.join(unit, MANIFEST)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not block
    except FileNotFoundError:
        raise NotCommitted("no manifest: the sharded save never committed") from None
    except OSError as exc:
        raise ManifestError(f"cannot read the manifest: {exc.strerror or exc}") from None
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        regular = False
    if not regular:  # checked before fdopen, which raises on a directory and would leak the fd
        os.close(fd)
        raise ManifestError("the manifest is not a regular file")
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        return Manifest.parse(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ManifestError("manifest is not UTF-8") from None


def write(unit: str, manifest: Manifest, *, dir_fd: int | None = None, parent_fd: int | None = None) -> str:
    """Commit: temp → fsync → rename → fsync directory, so the manifest is all or nothing.
    ``dir_fd``/``parent_fd``: the unit and its job directory as the save's guard opened them
    (``ckptd.disk.target``); the caller keeps them. Without them the unit is opened by name."""
    dfd = dir_fd if dir_fd is not None else os.open(unit, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    tmp = f".{MANIFEST}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dfd)
        with os.fdopen(fd, "wb") as f:
            f.write(manifest.to_json().encode())
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, MANIFEST, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.fsync(dfd)
        if parent_fd is not None:  # the unit's own entry, made by the first rank
            os.fsync(parent_fd)
        else:
            fsync_dir(os.path.dirname(os.path.abspath(unit)))
    except OSError:
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
        raise
    finally:
        if dir_fd is None:
            os.close(dfd)
    return os.path.join(unit, MANIFEST)


def commit_problem(outcomes: Sequence[dict[str, Any]], world_size: int) -> str:
    """Why the gathered per-rank outcomes must not commit ("" when they may).

    Each outcome is what one rank reports after persisting its shard: ``ok``,
    ``step``, ``rank``, ``file``, ``bytes``, ``meta_digest``, or ``error``.
    """
    if len(outcomes) != world_size:
        return f"{len(outcomes)} of {world_size} ranks reported"
    failed = [o for o in outcomes if not o.get("ok")]
    if failed:
        return "; ".join(f"rank {o.get('rank')}: {o.get('error', 'failed')}" for o in failed)
    steps = {int(o.get("step", -1)) for o in outcomes}
    if len(steps) != 1:
        return f"ranks saved different steps {sorted(steps)}: a save must happen at the same step on every rank"
    if sorted(int(o.get("rank", -1)) for o in outcomes) != list(range(world_size)):
        return "ranks reported twice or not at all"
    return ""


def stale_entries(names: Sequence[str], manifest: Manifest) -> list[str]:
    """Shard files in a unit that the manifest does not list (an earlier attempt, another world size)."""
    listed = {s.file for s in manifest.shards}
    return [n for n in names if SHARD_RE.match(n) and n not in listed]

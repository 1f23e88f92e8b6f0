"""Uploading one verified local checkpoint, in order (SPEC §11):

1. A checkpoint is offered only once it verified locally, and what goes up is what verified:
   the fd the save verified through (``source``), or, when there is none (after a restart, a
   holder), the file opened once without following a link and verified again from that fd.
2. **Data**: the file goes to ``PREFIX/NAME`` (``PREFIX``: ``ckptd.remote.layout``, naming
   the job's owner and directory) (boto3's managed transfer for S3: multipart,
   parallel parts, read part by part; temp file + fsync + rename for ``file://``). A
   sharded unit goes as a directory of objects: every shard to ``JOB/UNIT/rankR-of-W``,
   then its manifest. A host's copy of a unit spread over node-local disks (SPEC §15) holds
   its own disk's shards only: the manifest goes first (every host's is the same, byte for
   byte; its presence says a host began, so remote retention waits for the others), then
   this disk's shards.
3. **Verify**: where the store keeps a checksum it validated on receipt (S3: SHA-256 per
   part, sent with the upload), it must equal the local file's, which verified tensor by
   tensor: the copy is the verified bytes, without a second transfer. Elsewhere the object
   is read back as a stream and checked like a local file (``ckptd.remote.verify``). A copy
   that does not verify is deleted.
4. **Commit**: a small JSON object ``PREFIX/NAME.commit.json`` (step, size, metadata digest,
   trigger, metrics, created, the owner's uid and the job directory; a unit's shard list and
   manifest digest) is written last. Data
   without one (an upload cut off at any point) is never listed, fetched or resumed from. A
   host's part of a spread unit ends in its part commit instead,
   ``PREFIX/UNIT/ckptd-part-DISK.json`` (the same fields, its own shards and its disk): the
   unit counts once every disk's part is there (``listing``), whichever host comes last, and
   no host writes for another. A part already committed with the same manifest is not sent again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import stat
import time
from typing import Any, Callable, Iterator, Sequence

import xxhash

from ckptd.core.format import FormatError, read_header
from ckptd.disk import manifest as mf
from ckptd.disk.owner import Identity, acting_as
from ckptd.disk.safepath import open_dir, open_regular
from ckptd.disk.scan import Checkpoint, read_info
from ckptd.disk.verify import VerifyResult, verify_open
from ckptd.remote.listing import COMMIT, FORMAT, RemoteCheckpoint, committed, parse_commit, part_key
from ckptd.remote.stores import RemoteError, Store
from ckptd.remote.verify import remote_manifest, verify_remote

__all__ = ["replicate"]


def replicate(
    store: Store,
    job: str,
    path: str,
    *,
    prefix: str | None = None,
    fd: int | None = None,
    owner_uid: int | None = None,
    guard: Sequence[str] | None = None,
) -> RemoteCheckpoint:
    """Steps 2-4 for one local checkpoint that verified; raises ``RemoteError`` on any failure.

    ``prefix``: the job's (``layout.job_prefix``; a bare job name is version 1's layout);
    ``fd``: the file as it verified at save time (read through ``/proc/self/fd``, the same
    inode whatever ``path`` names now); without it a single file is opened from ``guard`` (the
    roots, or its directory) without following links and verified again before a byte goes."""
    prefix = job if prefix is None else prefix
    if fd is None and not mf.is_unit(path):
        with _verified(path, guard or (os.path.dirname(path),), owner_uid) as opened:
            return replicate(store, job, path, prefix=prefix, fd=opened, owner_uid=owner_uid, guard=guard)
    local = path if fd is None else f"/proc/self/fd/{fd}"
    info = read_info(local)
    if info.problem:
        raise RemoteError(f"{path}: {info.problem}")
    key = f"{prefix}/{os.path.basename(path)}"
    directory = os.path.dirname(path)
    with contextlib.ExitStack() as held:  # a unit's fds, open until its upload is confirmed
        if info.shards:
            commit, pairs = _upload_unit(store, key, job, path, info, guard or (directory,), held)
        else:
            _holders_first(store, job, path, info.refs, prefix, owner_uid, guard)
            store.put_file(local, key)
            commit = RemoteCheckpoint(
                key,
                job,
                info.step,
                info.bytes,
                _meta_digest(local),
                info.created,
                info.trigger,
                info.metrics,
                refs=info.refs,
            )
            pairs = [(local, key)]
        commit = RemoteCheckpoint(**{**commit.__dict__, "owner_uid": owner_uid, "directory": directory})
        if not pairs:  # this host's part, committed before (a restart, or a resync)
            return commit
        result = _confirm(store, commit, pairs)
    if not result.ok:
        for k in commit.objects if not commit.disk else [k for _, k in pairs]:  # never another host's part
            _quietly(store.delete, k)
        raise RemoteError(f"{store.url}/{key} did not verify after the upload: {result.reason}")
    if commit.disk:  # other hosts' parts are waited for from the first part's upload, not from the save
        commit = dataclasses.replace(commit, uploaded=time.time())
    body = json.dumps({"ckptd.remote": FORMAT, **commit.__dict__}, sort_keys=True).encode()
    store.put_bytes(part_key(key, commit.disk) if commit.disk else key + COMMIT, body)
    return commit


@contextlib.contextmanager
def _verified(path: str, guard: Sequence[str], owner_uid: int | None) -> Iterator[int]:
    """``path`` opened once, with its owner's rights (``ckptd.disk.owner``: a root daemon opens
    nothing its owner could not): its directory reached from ``guard`` without a link, the file
    itself ``O_NOFOLLOW | O_NONBLOCK`` and regular, every tensor verified from that fd (which is
    then what is uploaded)."""
    try:
        with acting_as(Identity.of(owner_uid)) if owner_uid is not None else contextlib.nullcontext():
            dfd = open_dir(os.path.dirname(path), guard)
            try:
                fd = os.open(
                    os.path.basename(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd
                )
            finally:
                os.close(dfd)
    except OSError as exc:
        raise RemoteError(f"{path}: not uploaded: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RemoteError(f"{path}: not uploaded: not a regular file")
        os.set_blocking(fd, True)
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            result = verify_open(f, path)
        if not result.ok:
            raise RemoteError(f"{path}: not uploaded: it does not verify now: {result.reason}")
        yield fd
    finally:
        os.close(fd)


def _holders_first(
    store: Store,
    job: str,
    path: str,
    holders: tuple[str, ...],
    prefix: str,
    owner_uid: int | None,
    guard: Sequence[str] | None,
) -> None:
    """A checkpoint that refers to tensors another one holds (§13) is committed remotely only
    after that one is: a remote copy is never incomplete. (A holder refers to nothing itself.)"""
    if not holders:
        return
    there = {c.name for c in committed(store, prefix)}
    for name in holders:
        if name not in there:
            replicate(
                store, job, os.path.join(os.path.dirname(path), name), prefix=prefix, owner_uid=owner_uid, guard=guard
            )


def _confirm(store: Store, c: RemoteCheckpoint, pairs: list[tuple[str, str]]) -> VerifyResult:
    """Step 3 at upload: where the store keeps a checksum it validated on receipt (S3's SHA-256),
    it is compared with the local file's (``pairs``: what was read, and its key), which verified
    tensor by tensor: no second transfer. Elsewhere the object is read back and every tensor
    re-hashed (``verify_remote``)."""
    vouched = [store.matches(path, key) for path, key in pairs]
    label = f"{store.url}/{c.key}"
    if False in vouched:
        key = pairs[vouched.index(False)][1]
        return VerifyResult(label, False, f"the store's SHA-256 of {key} differs from the local file's")
    if None in vouched:
        return verify_remote(store, c)
    if c.shards:
        try:
            remote_manifest(store, c)
        except (RemoteError, mf.ManifestError, UnicodeDecodeError) as exc:
            return VerifyResult(label, False, f"manifest: {exc}")
    return VerifyResult(label, True, "", 0, c.bytes)


def _upload_unit(
    store: Store, key: str, job: str, unit: str, info: Checkpoint, guard: Sequence[str], held: contextlib.ExitStack
) -> tuple[RemoteCheckpoint, list[tuple[str, str]]]:
    """Every shard, then the manifest (as it is on disk: its digest goes in the commit object);
    a host's part of a spread unit: the manifest, then its own disk's shards (none when its part
    is committed already). The unit is reached from ``guard`` without a link and each file opened
    ``O_NOFOLLOW`` from its fd (kept in ``held`` until the upload is confirmed): a shard swapped
    for a link to another user's file is refused, not published."""
    try:
        dfd = open_dir(unit, guard)
    except OSError as exc:
        raise RemoteError(f"{unit}: not uploaded: {exc.strerror or exc}") from None
    held.callback(os.close, dfd)
    try:
        m = mf.read(f"/proc/self/fd/{dfd}")
    except mf.ManifestError as exc:
        raise RemoteError(f"{unit}: {exc}") from None
    with os.fdopen(os.dup(_open_at(dfd, mf.MANIFEST, unit, held)), "rb") as f:
        manifest = f.read(mf.MAX_MANIFEST_BYTES + 1)
    disk = _disk_of_part(m, os.listdir(dfd))
    shards = [s for s in m.shards if s.disk == disk] if disk else list(m.shards)
    commit = RemoteCheckpoint(
        key,
        job,
        m.step,
        sum(s.bytes for s in shards),
        xxhash.xxh3_64_hexdigest(manifest),
        info.created,
        m.trigger,
        m.metrics,
        tuple(s.file for s in shards),
        disk=disk,
    )
    if disk and _part_there(store, commit):
        return commit, []
    if disk:
        store.put_bytes(f"{key}/{mf.MANIFEST}", manifest)
    pairs = []
    for shard in shards:
        local = f"/proc/self/fd/{_open_at(dfd, shard.file, unit, held)}"
        store.put_file(local, f"{key}/{shard.file}")
        pairs.append((local, f"{key}/{shard.file}"))
    if not disk:
        store.put_bytes(f"{key}/{mf.MANIFEST}", manifest)
    return commit, pairs


def _disk_of_part(m: mf.Manifest, present: list[str]) -> str:
    """The disk whose part this copy is, when it is one host's part of a spread unit; "" when it
    holds the whole unit (one disk, or every shard here)."""
    if not mf.away(m, present):
        return ""
    return next(s.disk for s in m.shards if s.file in present)


def _part_there(store: Store, c: RemoteCheckpoint) -> bool:
    """Is this disk's part committed already, for the same manifest (by digest)?"""
    key = part_key(c.key, c.disk)
    try:
        return key in store.list(f"{c.key}/") and parse_commit(store, key).meta_digest == c.meta_digest
    except (RemoteError, ValueError, KeyError, TypeError):
        return False


def _open_at(dfd: int, name: str, unit: str, held: contextlib.ExitStack) -> int:
    """``name`` in the directory ``dfd``: not a link, a regular file; closed with ``held``."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except OSError as exc:
        raise RemoteError(f"{unit}/{name}: not uploaded: {exc.strerror or exc}") from None
    held.callback(os.close, fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise RemoteError(f"{unit}/{name}: not uploaded: not a regular file")
    os.set_blocking(fd, True)
    return fd


def _meta_digest(path: str) -> str:
    """From the header alone: a final name already means every tensor verified."""
    try:
        with open_regular(path) as f:
            return read_header(f, os.fstat(f.fileno()).st_size).metadata.get("ckptd.meta_digest", "")
    except (OSError, FormatError) as exc:
        raise RemoteError(f"{path}: cannot read its header: {exc}") from None


def _quietly(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except RemoteError:
        pass

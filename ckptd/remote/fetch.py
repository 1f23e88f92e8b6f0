"""Downloading the newest (or a given step's) committed remote checkpoint that verifies.

Streamed to a temp file (a sharded unit: a temp directory) in the target directory, verified
tensor by tensor there (the same read checks the commit's size and metadata digest), then
renamed to its final name and the directory fsynced: what ``resume()`` then finds is as good
as a checkpoint written on this host.

The bucket is not trusted: only checkpoint names are ever written (``listing.NAME_RE``; a
commit object naming ``.bashrc`` or ``../x`` is skipped when listed), every file is created
``O_EXCL | O_NOFOLLOW`` under a random temp name, and an object is read no further than the
size its commit object gave (plus one byte to see that it is longer): a 300 MiB object against
a 384-byte commit costs 385 bytes, not 300 MiB.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from dataclasses import replace
from typing import Callable, Collection

import xxhash

from ckptd.core.refs import REFS_KEY
from ckptd.disk import manifest as mf
from ckptd.disk.refs import check_refs, opener_at
from ckptd.disk.verify import verify_open, verify_unit
from ckptd.remote.listing import NAME_RE, RemoteCheckpoint, committed
from ckptd.remote.stores import RemoteError, Store

__all__ = ["fetch"]

log = logging.getLogger(__name__)
CHUNK = 8 << 20
NEW = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def fetch(
    store: Store,
    prefix: str,
    directory: str,
    step: int | None = None,
    check: Callable[[RemoteCheckpoint], bool] = lambda c: True,
    here: Collection[str] = (),
) -> str | None:
    """Download the newest committed checkpoint (or ``step``) under the job's ``prefix``
    (``layout.job_prefix``) that verifies into ``directory``; a unit named in ``here`` (what
    ``directory`` holds committed: a host's own part of a spread unit) whose manifest there is the
    one the store holds (by digest) is not downloaded again, and its local path is returned (the
    caller verifies it as any local checkpoint).

    Streams to a temp file there, verifies the local copy tensor by tensor (the same read
    checks the commit's size and metadata digest), then renames it to its final name and
    fsyncs the directory: what ``resume()`` then finds is as good as one written here.
    Returns the path, or None when the job has no remote checkpoint that verifies.
    """
    found = committed(store, prefix)
    for c in reversed(found):
        if (step is not None and c.step != step) or not check(c):
            continue
        if c.name in here and _same_unit_here(directory, c):
            return os.path.join(directory, c.name)
        if not _holders(store, c, found, directory):
            continue
        path = _download(store, c, directory)
        if path is not None:
            return path
    return None


def _holders(store: Store, c: RemoteCheckpoint, found: list[RemoteCheckpoint], directory: str) -> bool:
    """The checkpoints ``c`` refers to for tensors it does not hold (§13), fetched first unless a
    copy here verifies: a fetched checkpoint is complete the moment it has its final name."""
    by_name = {x.name: x for x in found}
    for name in c.refs:
        if _verifies_here(directory, name):
            continue
        if name not in by_name or _download(store, by_name[name], directory) is None:
            log.error("remote: %s/%s refers to %s, which cannot be fetched", store.url, c.key, name)
            return False
    return True


def _same_unit_here(directory: str, c: RemoteCheckpoint) -> bool:
    """Does ``directory`` hold the unit ``c`` committed with the very manifest the store holds? (A
    unit of the same name from another attempt at that step is not the same checkpoint.)"""
    if not c.shards:
        return False
    try:
        fd = os.open(
            os.path.join(directory, c.name, mf.MANIFEST), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        )
    except OSError:
        return False
    with os.fdopen(fd, "rb") as f:
        return (
            os.path.isfile(f"/proc/self/fd/{fd}")
            and xxhash.xxh3_64_hexdigest(f.read(mf.MAX_MANIFEST_BYTES + 1)) == c.meta_digest
        )


def _verifies_here(directory: str, name: str) -> bool:
    try:
        fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    with os.fdopen(fd, "rb", buffering=0) as f:
        return os.path.isfile(f"/proc/self/fd/{fd}") and verify_open(f, os.path.join(directory, name)).ok


def _download(store: Store, c: RemoteCheckpoint, directory: str) -> str | None:
    if not NAME_RE.match(c.name):  # ``committed`` skips these; a caller's own RemoteCheckpoint too
        log.error("remote: not fetching %s/%s: not a checkpoint's name", store.url, c.key)
        return None
    os.makedirs(directory, exist_ok=True)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if c.shards:
            return _download_unit(store, c, directory, dfd)
        return _download_file(store, c, directory, dfd)
    except RemoteError as exc:
        log.error("remote: not fetching %s/%s: %s", store.url, c.key, exc)
        return None
    finally:
        os.close(dfd)


def _download_file(store: Store, c: RemoteCheckpoint, directory: str, dfd: int) -> str | None:
    final = os.path.join(directory, c.name)
    tmp = f".{c.name}.ckptd-fetch.{secrets.token_hex(4)}"
    fd = os.open(tmp, NEW, 0o644, dir_fd=dfd)
    try:
        with os.fdopen(fd, "w+b", buffering=0) as f:
            _stream_into(store, c.key, f, c.bytes)
            f.seek(0)
            result = verify_open(f, final)
        if result.ok and REFS_KEY in result.metadata:  # complete only with every tensor it refers to
            problem = check_refs(result.metadata, opener_at(directory), full=True)
            result = replace(result, ok=not problem, reason=problem)
        if not result.ok or result.metadata.get("ckptd.meta_digest") != c.meta_digest:
            log.error("remote: %s/%s does not verify: %s", store.url, c.key, result.reason or "its digest differs")
            return None
        os.rename(tmp, c.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.fsync(dfd)
        return final
    finally:
        try:
            os.unlink(tmp, dir_fd=dfd)
        except FileNotFoundError:
            pass


def _download_unit(store: Store, c: RemoteCheckpoint, directory: str, dfd: int) -> str | None:
    """Every object into a temp directory, ``verify_unit`` on it (every shard re-read), then one rename."""
    final = os.path.join(directory, c.name)
    tmp_name = f".{c.name}.ckptd-fetch.{secrets.token_hex(4)}"
    os.mkdir(tmp_name, 0o755, dir_fd=dfd)
    tmp = os.path.join(directory, tmp_name)
    try:
        udfd = os.open(tmp_name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            for key in c.objects:
                name = key.rsplit("/", 1)[-1]
                limit = mf.MAX_MANIFEST_BYTES if name == mf.MANIFEST else c.bytes
                with os.fdopen(os.open(name, NEW, 0o644, dir_fd=udfd), "wb", buffering=0) as f:
                    _stream_into(store, key, f, limit, exact=False)
            os.fsync(udfd)
        finally:
            os.close(udfd)
        result = verify_unit(tmp, whole=True)  # every shard, whatever its manifest says of disks
        with open(os.path.join(tmp, mf.MANIFEST), "rb") as f:
            same = xxhash.xxh3_64_hexdigest(f.read()) == c.meta_digest
        if not result.ok or not same:
            log.error("remote: %s/%s does not verify: %s", store.url, c.key, result.reason or "manifest differs")
            return None
        if os.path.lexists(final):
            log.error("remote: not fetching %s/%s: %s is in the way (an uncommitted attempt?)", store.url, c.key, final)
            return None
        os.rename(tmp_name, c.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.fsync(dfd)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _stream_into(store: Store, key: str, f: object, limit: int, exact: bool = True) -> int:
    """One object into ``f``, fsynced, reading at most ``limit`` + 1 bytes: an object that is
    longer (or, ``exact``, of another size) than its commit says is refused, not downloaded."""
    body, size = store.open(key)
    got = 0
    try:
        if size > limit or (exact and size != limit):
            raise RemoteError(f"{key}: {size} bytes, its commit object says {limit}")
        while got <= limit and (chunk := body.read(min(CHUNK, limit + 1 - got))):
            got += len(chunk)
            if got > limit:
                raise RemoteError(f"{key}: longer than the {limit} bytes its commit object says")
            f.write(chunk)  # type: ignore[attr-defined]
        if exact and got != limit:
            raise RemoteError(f"{key}: {got} bytes, its commit object says {limit}")
        os.fsync(f.fileno())  # type: ignore[attr-defined]
    finally:
        body.close()
    return got

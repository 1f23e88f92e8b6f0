"""Downloading the newest (or a given step's) committed remote checkpoint that verifies.

Streamed to a temp file (a sharded unit: a temp directory) in the target directory, verified
tensor by tensor there (the same read checks the commit's size and metadata digest), then
renamed to its final name and the directory fsynced: what ``resume()`` then finds is as good
as a checkpoint written on this host.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from typing import Callable

import xxhash

from ckptd.disk import manifest as mf
from ckptd.disk.safepath import fsync_dir
from ckptd.disk.verify import verify_file, verify_unit
from ckptd.remote.listing import RemoteCheckpoint, committed
from ckptd.remote.stores import Store

__all__ = ["fetch"]

log = logging.getLogger("ckptd.store")


def fetch(store: Store, job: str, directory: str, step: int | None = None,
          check: Callable[[RemoteCheckpoint], bool] = lambda c: True) -> str | None:
    """Download the newest committed checkpoint (or ``step``) that verifies into ``directory``.

    Streams to a temp file there, verifies the local copy tensor by tensor (the same read
    checks the commit's size and metadata digest), then renames it to its final name and
    fsyncs the directory: what ``resume()`` then finds is as good as one written here.
    Returns the path, or None when the job has no remote checkpoint that verifies.
    """
    found = committed(store, job)
    for c in reversed(found):
        if (step is not None and c.step != step) or not check(c) or not _holders(store, c, found, directory):
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
        here = os.path.join(directory, name)
        if os.path.exists(here) and verify_file(here).ok:
            continue
        if name not in by_name or _download(store, by_name[name], directory) is None:
            log.error("remote: %s/%s refers to %s, which cannot be fetched", store.url, c.key, name)
            return False
    return True


def _download(store: Store, c: RemoteCheckpoint, directory: str) -> str | None:
    os.makedirs(directory, exist_ok=True)
    if c.shards:
        return _download_unit(store, c, directory)
    final = os.path.join(directory, c.name)
    tmp = os.path.join(directory, f".{c.name}.ckptd-fetch.{secrets.token_hex(4)}")
    try:
        size = _stream_to(store, c.key, tmp)
        result = verify_file(tmp)
        if not result.ok or size != c.bytes or result.metadata.get("ckptd.meta_digest") != c.meta_digest:
            log.error("remote: %s/%s does not verify: %s", store.url, c.key, result.reason or "size or digest differ")
            return None
        os.rename(tmp, final)
        fsync_dir(directory)
        return final
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _download_unit(store: Store, c: RemoteCheckpoint, directory: str) -> str | None:
    """Every object into a temp directory, ``verify_unit`` on it (every shard re-read), then one rename."""
    final = os.path.join(directory, c.name)
    tmp = os.path.join(directory, f".{c.name}.ckptd-fetch.{secrets.token_hex(4)}")
    os.mkdir(tmp)
    try:
        for key in c.objects:
            _stream_to(store, key, os.path.join(tmp, key.rsplit("/", 1)[-1]))
        fsync_dir(tmp)
        result = verify_unit(tmp)
        with open(os.path.join(tmp, mf.MANIFEST), "rb") as f:
            same = xxhash.xxh3_64_hexdigest(f.read()) == c.meta_digest
        if not result.ok or not same:
            log.error("remote: %s/%s does not verify: %s", store.url, c.key, result.reason or "manifest differs")
            return None
        if os.path.lexists(final):
            log.error("remote: not fetching %s/%s: %s is in the way (an uncommitted attempt?)", store.url, c.key, final)
            return None
        os.rename(tmp, final)
        fsync_dir(directory)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _stream_to(store: Store, key: str, path: str) -> int:
    """One object to a new local file, fsynced; returns the size the store gave."""
    body, size = store.open(key)
    try:
        with open(path, "xb") as f:
            while chunk := body.read(8 << 20):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    finally:
        body.close()
    return size

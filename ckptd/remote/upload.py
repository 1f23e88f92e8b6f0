"""Uploading one verified local checkpoint, in order (SPEC §11):

1. A checkpoint is offered only once it verified locally (its final name says so).
2. **Data**: the file goes to ``JOB/NAME`` (boto3's managed transfer for S3: multipart,
   parallel parts, read part by part; temp file + fsync + rename for ``file://``). A
   sharded unit goes as a directory of objects: every shard to ``JOB/UNIT/rankR-of-W``,
   then its manifest.
3. **Verify**: where the store keeps a checksum it validated on receipt (S3: SHA-256 per
   part, sent with the upload), it must equal the local file's, which verified tensor by
   tensor: the copy is the verified bytes, without a second transfer. Elsewhere the object
   is read back as a stream and checked like a local file (``ckptd.remote.verify``). A copy
   that does not verify is deleted.
4. **Commit**: a small JSON object ``JOB/NAME.commit.json`` (step, size, metadata digest,
   trigger, metrics, created; a unit's shard list and manifest digest) is written last. Data
   without one (an upload cut off at any point) is never listed, fetched or resumed from.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import xxhash

from ckptd.core.format import FormatError, read_header
from ckptd.disk import manifest as mf
from ckptd.disk.safepath import open_regular
from ckptd.disk.scan import Checkpoint, read_info
from ckptd.disk.verify import VerifyResult
from ckptd.remote.listing import COMMIT, FORMAT, RemoteCheckpoint, committed
from ckptd.remote.stores import RemoteError, Store
from ckptd.remote.verify import remote_manifest, verify_remote

__all__ = ["replicate"]


def replicate(store: Store, job: str, path: str) -> RemoteCheckpoint:
    """Steps 2-4 for one local checkpoint that verified; raises ``RemoteError`` on any failure."""
    info = read_info(path)
    if info.problem:
        raise RemoteError(f"{path}: {info.problem}")
    key = f"{job}/{os.path.basename(path)}"
    if info.shards:
        commit = _upload_unit(store, key, job, path, info)
    else:
        _holders_first(store, job, path, info.refs)
        store.put_file(path, key)
        commit = RemoteCheckpoint(key, job, info.step, info.bytes, _meta_digest(path), info.created, info.trigger,
                                  info.metrics, refs=info.refs)
    result = _confirm(store, commit, path)
    if not result.ok:
        for k in commit.objects:
            _quietly(store.delete, k)
        raise RemoteError(f"{store.url}/{key} did not verify after the upload: {result.reason}")
    store.put_bytes(key + COMMIT, json.dumps({"ckptd.remote": FORMAT, **commit.__dict__}, sort_keys=True).encode())
    return commit


def _holders_first(store: Store, job: str, path: str, holders: tuple[str, ...]) -> None:
    """A checkpoint that refers to tensors another one holds (§13) is committed remotely only
    after that one is: a remote copy is never incomplete. (A holder refers to nothing itself.)"""
    if not holders:
        return
    there = {c.name for c in committed(store, job)}
    for name in holders:
        if name not in there:
            replicate(store, job, os.path.join(os.path.dirname(path), name))


def _confirm(store: Store, c: RemoteCheckpoint, local: str) -> VerifyResult:
    """Step 3 at upload: where the store keeps a checksum it validated on receipt (S3's SHA-256),
    it is compared with the local file's, which verified tensor by tensor: no second transfer.
    Elsewhere the object is read back and every tensor re-hashed (``verify_remote``)."""
    pairs = [(local, c.key)] if not c.shards else [(os.path.join(local, f), f"{c.key}/{f}") for f in c.shards]
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


def _upload_unit(store: Store, key: str, job: str, unit: str, info: Checkpoint) -> RemoteCheckpoint:
    """Every shard, then the manifest (as it is on disk: its digest goes in the commit object)."""
    try:
        m = mf.read(unit)
    except mf.ManifestError as exc:
        raise RemoteError(f"{unit}: {exc}") from None
    for shard in m.shards:
        store.put_file(os.path.join(unit, shard.file), f"{key}/{shard.file}")
    manifest = _read_small(os.path.join(unit, mf.MANIFEST))
    store.put_bytes(f"{key}/{mf.MANIFEST}", manifest)
    return RemoteCheckpoint(key, job, m.step, sum(s.bytes for s in m.shards), xxhash.xxh3_64_hexdigest(manifest),
                            info.created, m.trigger, m.metrics, tuple(s.file for s in m.shards))


def _read_small(path: str) -> bytes:
    try:
        with open_regular(path) as f:
            return f.read(mf.MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise RemoteError(f"{path}: {exc.strerror or exc}") from None


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

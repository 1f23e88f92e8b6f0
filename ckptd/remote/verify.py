"""A remote copy checked as a reader checks it (``ckptd verify s3://...``, ``fetch``, ``resume()``):
commit object present, size equal, metadata digest equal, every tensor re-hashed from one
streamed read; a sharded unit's manifest by its digest, then every shard against it (a host's
part of a spread unit, as its uploader confirms it: its own disk's shards).
"""

from __future__ import annotations

from typing import BinaryIO, cast

import xxhash

from ckptd.core.refs import REFS_KEY
from ckptd.disk import manifest as mf
from ckptd.disk.refs import check_refs, holders
from ckptd.disk.verify import ForwardStream, VerifyResult, verify_stream
from ckptd.remote.listing import RemoteCheckpoint, committed, manifest_bytes
from ckptd.remote.stores import RemoteError, Store

__all__ = ["remote_manifest", "verify_remote"]


def verify_remote(store: Store, c: RemoteCheckpoint) -> VerifyResult:
    """Steps 3-4 as a reader repeats them: size, metadata digest, every tensor, from one streamed read."""
    if c.shards:
        return _verify_remote_unit(store, c)
    label = f"{store.url}/{c.key}"
    try:
        body, size = store.open(c.key)
    except RemoteError as exc:
        return VerifyResult(label, False, str(exc))
    try:
        if size != c.bytes:
            return VerifyResult(label, False, f"{size} bytes, the commit says {c.bytes}")
        result = verify_stream(body, size, label)
    finally:
        body.close()
    if result.ok and result.metadata.get("ckptd.meta_digest") != c.meta_digest:
        return VerifyResult(label, False, "not the checkpoint its commit names (metadata digest differs)")
    if result.ok and result.metadata.get("ckptd.step") != str(c.step):
        return VerifyResult(label, False, f"header says step {result.metadata.get('ckptd.step')}, the commit {c.step}")
    if result.ok and REFS_KEY in result.metadata:
        problem = _remote_refs(store, c, result.metadata)
        if problem:
            return VerifyResult(label, False, problem, result.tensors, result.bytes, result.metadata)
    return result


def _remote_refs(store: Store, c: RemoteCheckpoint, metadata: dict[str, str]) -> str:
    """A copy that refers to tensors (§13) is complete only if each holder is committed there and
    lists them, with their digests, where the reference says (its own tensors are verified when
    it is, being a committed checkpoint of the job itself)."""
    there = {x.name for x in committed(store, c.prefix)}
    missing = [h for h in holders(metadata) if h not in there]
    if missing:
        return f"referenced checkpoint {missing[0]} is not committed on the remote tier"

    def open_holder(name: str) -> tuple[BinaryIO, int]:
        try:
            body, size = store.open(f"{c.prefix}/{name}")
        except RemoteError as exc:
            raise OSError(str(exc)) from None
        return cast(BinaryIO, ForwardStream(body)), size

    return check_refs(metadata, open_holder, full=False)


def _verify_remote_unit(store: Store, c: RemoteCheckpoint) -> VerifyResult:
    """The manifest the commit names (by digest), then every shard against it, as ``verify_unit`` does."""
    label = f"{store.url}/{c.key}"
    try:
        m = remote_manifest(store, c)
    except (RemoteError, mf.ManifestError, UnicodeDecodeError) as exc:
        return VerifyResult(label, False, f"manifest: {exc}")
    shards = [s for s in m.shards if not c.disk or s.disk == c.disk]  # one host's part: its disk's
    if {s.file for s in shards} != set(c.shards):
        return VerifyResult(label, False, "its commit names other shards than its manifest")
    tensors = 0
    for shard in shards:
        one = verify_remote(
            store, RemoteCheckpoint(f"{c.key}/{shard.file}", c.job, m.step, shard.bytes, shard.meta_digest, c.created)
        )
        if not one.ok:
            return VerifyResult(label, False, f"shard {shard.file}: {one.reason}")
        tensors += one.tensors
    return VerifyResult(
        label,
        True,
        "",
        tensors,
        c.bytes,
        {"ckptd.job": m.job, "ckptd.step": str(m.step), "ckptd.world_size": str(m.world_size)},
    )


def remote_manifest(store: Store, c: RemoteCheckpoint) -> mf.Manifest:
    """A unit's manifest as stored, if it is the one its commit names (by digest)."""
    text = manifest_bytes(store, f"{c.key}/{mf.MANIFEST}")
    if xxhash.xxh3_64_hexdigest(text) != c.meta_digest:
        raise mf.ManifestError("not the manifest its commit names (digest differs)")
    return mf.Manifest.parse(text.decode("utf-8"))

"""Replication of verified checkpoints to a remote store, and what a reader checks (SPEC §11).

Lifecycle of one replicated checkpoint, in order:

1. A checkpoint is offered only once it verified locally (its final name says so).
2. **Data**: the file goes to ``JOB/NAME`` (boto3's managed transfer for S3: multipart,
   parallel parts, read part by part; temp file + fsync + rename for ``file://``).
3. **Verify**: where the store keeps a checksum it validated on receipt (S3: SHA-256 per
   part, sent with the upload), it must equal the local file's, which verified tensor by
   tensor: the copy is the verified bytes, without a second transfer. Elsewhere the object
   is read back as a stream and checked like a local file: its size, the header's
   metadata digest against the local one, and every tensor's xxh3-64 against the digests
   in its header. A copy that does not verify is deleted.
4. **Commit**: a small JSON object ``JOB/NAME.commit.json`` (step, size, metadata digest,
   trigger, metrics, created) is written last. A remote checkpoint counts only when its
   commit object exists; data without one (an upload cut off at any point) is never
   listed, fetched or resumed from, and remote retention removes it once a later
   checkpoint committed.
5. **Retention**: the ``remote_keep_*`` rules (SPEC §5's, with the prefix) over the
   committed checkpoints; a deletion removes the commit object first, then the data.

A reader (``ckptd verify``, ``ckptd fetch``, ``resume()``) trusts nothing but steps 3-4
again: commit object present, size equal, metadata digest equal, every tensor re-hashed.

A sharded unit goes the same way as a directory of objects: every shard to
``JOB/UNIT/rankR-of-W.safetensors``, then its manifest, each shard verified against the
manifest's size and metadata digest, and one commit object ``JOB/UNIT.commit.json`` (its
``shards`` list and the manifest's digest) last.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import xxhash

from ckptd.core import retention
from ckptd.core.format import FormatError, read_header
from ckptd.core.vocab import Trigger
from ckptd.store import manifest as mf
from ckptd.store.remote import RemoteError, Store
from ckptd.store.safepath import fsync_dir, open_regular
from ckptd.store.scan import SUFFIX, Checkpoint, read_info
from ckptd.store.verify import VerifyResult, verify_file, verify_stream, verify_unit

__all__ = ["COMMIT", "RemoteCheckpoint", "committed", "fetch", "remote_rules", "replicate", "uncommitted",
           "verify_remote", "prune_remote"]

log = logging.getLogger("ckptd.store")
COMMIT = ".commit.json"
FORMAT = "1"


@dataclass(frozen=True)
class RemoteCheckpoint:
    """One committed remote checkpoint, as its commit object describes it."""

    key: str
    job: str
    step: int
    bytes: int
    meta_digest: str
    created: float
    trigger: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    shards: tuple[str, ...] = ()  # a sharded unit: its shard files under KEY/ (and KEY/ckptd-manifest.json)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def objects(self) -> list[str]:
        """Every data object of this checkpoint (what a deletion removes after the commit object)."""
        if not self.shards:
            return [self.key]
        return [f"{self.key}/{f}" for f in (*self.shards, mf.MANIFEST)]


def replicate(store: Store, job: str, path: str) -> RemoteCheckpoint:
    """Steps 2-4 for one local checkpoint that verified; raises ``RemoteError`` on any failure."""
    info = read_info(path)
    if info.problem:
        raise RemoteError(f"{path}: {info.problem}")
    key = f"{job}/{os.path.basename(path)}"
    if info.shards:
        commit = _upload_unit(store, key, job, path, info)
    else:
        store.put_file(path, key)
        commit = RemoteCheckpoint(key, job, info.step, info.bytes, _meta_digest(path), info.created, info.trigger,
                                  info.metrics)
    result = _confirm(store, commit, path)
    if not result.ok:
        for k in commit.objects:
            _quietly(store.delete, k)
        raise RemoteError(f"{store.url}/{key} did not verify after the upload: {result.reason}")
    store.put_bytes(key + COMMIT, json.dumps({"ckptd.remote": FORMAT, **commit.__dict__}, sort_keys=True).encode())
    return commit


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
            _remote_manifest(store, c)
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
    return result


def _verify_remote_unit(store: Store, c: RemoteCheckpoint) -> VerifyResult:
    """The manifest the commit names (by digest), then every shard against it, as ``verify_unit`` does."""
    label = f"{store.url}/{c.key}"
    try:
        m = _remote_manifest(store, c)
    except (RemoteError, mf.ManifestError, UnicodeDecodeError) as exc:
        return VerifyResult(label, False, f"manifest: {exc}")
    tensors = 0
    for shard in m.shards:
        one = verify_remote(store, RemoteCheckpoint(f"{c.key}/{shard.file}", c.job, m.step, shard.bytes,
                                                    shard.meta_digest, c.created))
        if not one.ok:
            return VerifyResult(label, False, f"shard {shard.file}: {one.reason}")
        tensors += one.tensors
    return VerifyResult(label, True, "", tensors, c.bytes, {"ckptd.job": m.job, "ckptd.step": str(m.step),
                                                             "ckptd.world_size": str(m.world_size)})


def _remote_manifest(store: Store, c: RemoteCheckpoint) -> mf.Manifest:
    """A unit's manifest as stored, if it is the one its commit names (by digest)."""
    body, _ = store.open(f"{c.key}/{mf.MANIFEST}")
    try:
        text = body.read(mf.MAX_MANIFEST_BYTES + 1)
    finally:
        body.close()
    if xxhash.xxh3_64_hexdigest(text) != c.meta_digest:
        raise mf.ManifestError("not the manifest its commit names (digest differs)")
    return mf.Manifest.parse(text.decode("utf-8"))


def committed(store: Store, job: str, listing: Mapping[str, int] | None = None) -> list[RemoteCheckpoint]:
    """The job's committed remote checkpoints, oldest first (a commit object that does not parse is skipped)."""
    keys = store.list(f"{job}/") if listing is None else listing
    out = []
    for key in keys:
        if key.endswith(COMMIT) and key.startswith(f"{job}/") and "/" not in key[len(job) + 1:]:
            try:
                out.append(_parse_commit(store, key))
            except (ValueError, KeyError, TypeError, RemoteError) as exc:
                log.warning("remote: %s/%s: unreadable commit object (%s); ignored", store.url, key, exc)
    return sorted(out, key=lambda c: (c.step, c.created))


def _parse_commit(store: Store, key: str) -> RemoteCheckpoint:
    body, _ = store.open(key)
    try:
        doc = json.loads(body.read(1 << 20))
    finally:
        body.close()
    if doc.get("ckptd.remote") != FORMAT or doc["key"] + COMMIT != key:
        raise ValueError("not a ckptd commit object for this key")
    shards = tuple(str(f) for f in doc.get("shards") or ())
    if any(not mf.SHARD_RE.match(f) for f in shards):
        raise ValueError("a shard name that is not rankR-of-W.safetensors")
    return RemoteCheckpoint(str(doc["key"]), str(doc["job"]), int(doc["step"]), int(doc["bytes"]),
                            str(doc["meta_digest"]), float(doc["created"]), str(doc.get("trigger", "")),
                            dict(doc.get("metrics") or {}), shards)


def uncommitted(store: Store, job: str, listing: Mapping[str, int]) -> list[str]:
    """Data objects with no commit object: uploads cut off, or still in progress."""
    return [k for k in listing if k.startswith(f"{job}/") and not k.endswith(COMMIT)
            and (k.endswith(SUFFIX) or "/" in k[len(job) + 1:]) and _commit_key(job, k) not in listing]


def _commit_key(job: str, key: str) -> str:
    """``JOB/NAME.safetensors`` -> its commit object; ``JOB/UNIT/anything`` -> the unit's."""
    unit, sep, _ = key[len(job) + 1:].partition("/")
    return f"{job}/{unit}{COMMIT}" if sep else key + COMMIT


def remote_rules(settings: Mapping[str, Any]) -> retention.Rules:
    """The ``remote_keep_*`` keys read as §5's rules (``remote_keep_last`` -> ``keep_last``)."""
    local = {k[len("remote_"):]: v for k, v in settings.items() if k.startswith("remote_keep") and v is not None}
    if "keep_best" in local:
        local.update(best_metric=settings.get("best_metric"), best_mode=settings.get("best_mode", "min"))
    return retention.Rules.from_settings(local)


def prune_remote(store: Store, job: str, settings: Mapping[str, Any], now: float) -> list[retention.Verdict]:
    """Remote retention: commit object first, then data; plus leftovers of cut-off uploads
    older than the newest committed checkpoint. Local files are never touched here."""
    listing = store.list(f"{job}/")
    commits = committed(store, job, listing)
    rules = remote_rules(settings)
    items = [retention.Item(c.key, c.step, c.created, c.bytes, final=c.trigger == Trigger.FINAL,
                            metric=_metric(c.metrics.get(rules.best_metric or ""))) for c in commits]
    verdicts = retention.plan(items, rules, now)
    by_key = {c.key: c for c in commits}
    for v in verdicts:
        if not v.keep:
            store.delete(v.item.id + COMMIT)
            for key in by_key[v.item.id].objects:
                store.delete(key)
            log.info("remote: deleted %s/%s (%s)", store.url, v.item.id, v.reasons[0])
    newest = max((c.step for c in commits), default=None)
    for key in uncommitted(store, job, listing):
        info_step = _step_of(key)
        if newest is not None and info_step is not None and info_step < newest:
            store.delete(key)
            log.info("remote: deleted %s/%s (an upload that never committed)", store.url, key)
    return verdicts


def _metric(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _step_of(key: str) -> int | None:
    m = re.search(r"-step(\d+)", key)
    return int(m.group(1)) if m else None


def fetch(store: Store, job: str, directory: str, step: int | None = None,
          check: Callable[[RemoteCheckpoint], bool] = lambda c: True) -> str | None:
    """Download the newest committed checkpoint (or ``step``) that verifies into ``directory``.

    Streams to a temp file there, verifies the local copy tensor by tensor (the same read
    checks the commit's size and metadata digest), then renames it to its final name and
    fsyncs the directory: what ``resume()`` then finds is as good as one written here.
    Returns the path, or None when the job has no remote checkpoint that verifies.
    """
    for c in reversed(committed(store, job)):
        if (step is not None and c.step != step) or not check(c):
            continue
        path = _download(store, c, directory)
        if path is not None:
            return path
    return None


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


def _quietly(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except RemoteError:
        pass

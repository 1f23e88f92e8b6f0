"""What is committed on a job's remote tier, and a cached index of it.

A remote checkpoint counts only when its commit object ``PREFIX/NAME.commit.json`` exists
(written last by ``upload``; ``PREFIX`` is the job's, ``ckptd.remote.layout``); ``committed``
lists and parses those. A unit spread over node-local disks (SPEC §15) has no such object: each
host uploads its own shards, then a part commit ``PREFIX/UNIT/ckptd-part-DISK.json``, and no
host decides for the others. The unit counts when its manifest (the one every part names, by
digest) and a part of every disk the manifest names are present, each part naming exactly that
disk's shards; readers assemble it (``_assembled``) and then verify every shard as for any unit.
A commit object is the store's word, not ours: one whose name is not a
checkpoint's (``.bashrc``, ``../x``) or whose fields do not parse is skipped with a warning. Local retention needs
to know which local checkpoints are already remote (a checkpoint that is not must not be
deleted by a rule), but asking the store is network I/O: on the persist thread, a slow or
hung store would delay every local save. So the persist path reads ``INDEX`` instead, which
answers from memory. Its entries are refreshed off the persist thread (one background thread,
only after a reader found them stale) and updated by the uploader after each upload (the
only writer of the remote tier). An entry not known yet answers "nothing is remote": local
retention keeps everything until the index knows, which costs disk, never a copy.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Collection, Iterable, Mapping

import xxhash

from ckptd.disk import manifest as mf
from ckptd.disk.owner import start_thread
from ckptd.disk.scan import SUFFIX
from ckptd.remote.stores import RemoteError, Store, open_store

__all__ = [
    "COMMIT",
    "INDEX",
    "PART_RE",
    "RemoteCheckpoint",
    "Spread",
    "RemoteIndex",
    "committed",
    "manifest_bytes",
    "parse_commit",
    "part_key",
    "read_spread",
    "uncommitted",
]

log = logging.getLogger(__name__)
COMMIT = ".commit.json"
FORMAT = "1"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*-step\d+(\.safetensors)?$")  # a checkpoint's, nothing else
PART_RE = re.compile(r"^ckptd-part-([0-9a-f]{32})\.json$")  # one host's part of a spread unit, by its disk id
MAX_COMMIT_BYTES = 1 << 20


def part_key(unit_key: str, disk: str) -> str:
    """The part commit of the host whose disk is ``disk``, inside the unit's key."""
    return f"{unit_key}/ckptd-part-{disk}.json"


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
    refs: tuple[str, ...] = ()  # names of the job's checkpoints holding tensors it refers to (§13), committed first
    owner_uid: int | None = None  # who saved it (the uid its prefix names); None in a version-1 commit
    directory: str = ""  # the job directory it was saved in, on the host that saved it
    disk: str = ""  # one host's part of a spread unit (its disk id; ``shards``: that disk's); "" = the whole
    parts: tuple[str, ...] = ()  # a spread unit assembled from its hosts' part commits: their keys
    uploaded: float = 0.0  # a part commit: when it was written (remote retention waits for the others from it)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def prefix(self) -> str:
        """The job's key prefix: where its holders (§13) are too."""
        return self.key.rsplit("/", 1)[0]

    @property
    def objects(self) -> list[str]:
        """Every data object of this checkpoint (what a deletion removes after the commit object)."""
        if not self.shards:
            return [self.key]
        return [f"{self.key}/{f}" for f in (*self.shards, mf.MANIFEST)]

    @property
    def commits(self) -> list[str]:
        """What makes it count (what a deletion removes first): its commit object, or its parts'."""
        return list(self.parts) if self.parts else [self.key + COMMIT]


def committed(store: Store, prefix: str, listing: Mapping[str, int] | None = None) -> list[RemoteCheckpoint]:
    """The committed remote checkpoints under the job's ``prefix`` (``layout.job_prefix``, or a
    version-1 job name), oldest first (a commit object that does not parse is skipped)."""
    keys = store.list(f"{prefix}/") if listing is None else listing
    out = []
    for key in keys:
        if key.endswith(COMMIT) and key.startswith(f"{prefix}/") and "/" not in key[len(prefix) + 1 :]:
            try:
                out.append(parse_commit(store, key))
            except (ValueError, KeyError, TypeError, RemoteError) as exc:
                log.warning("remote: %s/%s: unreadable commit object (%s); ignored", store.url, key, exc)
    whole = {c.key for c in out}
    for unit in sorted(_spread_units(prefix, keys)):
        if unit not in whole and (assembled := _assembled(store, unit, keys)) is not None:
            out.append(assembled)
    return sorted(out, key=lambda c: (c.step, c.created))


def _spread_units(prefix: str, keys: Iterable[str]) -> set[str]:
    """The units under ``prefix`` with a part commit: spread over disks, uploaded host by host."""
    found = set()
    for key in keys:
        unit, _, name = key.rpartition("/")
        if PART_RE.match(name) and unit.startswith(f"{prefix}/") and "/" not in unit[len(prefix) + 1 :]:
            found.add(unit)
    return found


@dataclass(frozen=True)
class Spread:
    """What the store holds of one unit uploaded host by host: its manifest (None: absent or
    unreadable), and the part of each disk that manifest names (a part of any other disk is
    nobody's and is never read)."""

    manifest: mf.Manifest | None
    digest: str = ""
    parts: dict[str, RemoteCheckpoint] = field(default_factory=dict)  # disk -> its part, for this manifest
    unread: bool = False  # something there could not be read (the store failed, or it is no part): judge later

    @property
    def missing(self) -> set[str]:
        """The disks the manifest names whose part (for this manifest) is not there yet."""
        return {s.disk for s in self.manifest.shards} - set(self.parts) if self.manifest else set()


def read_spread(store: Store, unit: str, listing: Mapping[str, int]) -> Spread:
    """The manifest first, then only the parts of the disks it names: a part planted for another
    disk costs nothing and decides nothing. Objects are read no further than their bounds, and
    read again at each listing: a part rewritten by a later attempt at the same step may have the
    same size, so nothing listed can stand for what was read before."""
    key = f"{unit}/{mf.MANIFEST}"
    if key not in listing:
        return Spread(None)
    try:
        m, digest = _read_manifest(store, key)
    except (ValueError, KeyError, TypeError, RemoteError, UnicodeDecodeError) as exc:
        log.warning("remote: %s/%s: unreadable manifest (%s); not counted", store.url, key, exc)
        return Spread(None, unread=True)
    parts, unread = {}, False
    for disk in sorted({s.disk for s in m.shards}):
        pk = part_key(unit, disk)
        if pk not in listing:
            continue
        try:
            part = parse_commit(store, pk)
        except (ValueError, KeyError, TypeError, RemoteError) as exc:
            log.warning("remote: %s/%s: unreadable part commit (%s); not counted", store.url, pk, exc)
            unread = True
            continue
        if part.meta_digest == digest:  # (another digest: a part of an earlier attempt at this step)
            parts[disk] = part
    return Spread(m, digest, parts, unread)


def _assembled(store: Store, unit: str, listing: Mapping[str, int]) -> RemoteCheckpoint | None:
    """A spread unit, when its parts make it whole: every disk the manifest names has its part,
    each naming exactly the shards the manifest puts on its disk, all of the same step, owner and
    directory. Otherwise it is not committed (yet: another host may still be uploading)."""
    if not NAME_RE.match(unit.rsplit("/", 1)[-1]):
        return None
    got = read_spread(store, unit, listing)
    m, parts = got.manifest, list(got.parts.values())
    if m is None or got.unread or got.missing or not parts:
        return None
    first = parts[0]
    if any((p.owner_uid, p.directory, p.step) != (first.owner_uid, first.directory, m.step) for p in parts) or any(
        set(p.shards) != {s.file for s in m.shards if s.disk == d} for d, p in got.parts.items()
    ):
        log.warning(
            "remote: %s/%s: its hosts' parts disagree with each other or its manifest; not counted", store.url, unit
        )
        return None
    return RemoteCheckpoint(
        unit,
        m.job,
        m.step,
        sum(s.bytes for s in m.shards),
        got.digest,
        min(p.created for p in parts),
        m.trigger,
        m.metrics,
        tuple(s.file for s in m.shards),
        (),
        first.owner_uid,
        first.directory,
        parts=tuple(sorted(part_key(unit, d) for d in got.parts)),
        uploaded=min(p.uploaded for p in parts),
    )


def manifest_bytes(store: Store, key: str) -> bytes:
    """A unit's manifest as stored at ``key``, read no further than a manifest may be long."""
    body, _ = store.open(key)
    try:
        text = body.read(mf.MAX_MANIFEST_BYTES + 1)
    finally:
        body.close()
    if len(text) > mf.MAX_MANIFEST_BYTES:
        raise mf.ManifestError(f"larger than {mf.MAX_MANIFEST_BYTES} bytes")
    return text


def _read_manifest(store: Store, key: str) -> tuple[mf.Manifest, str]:
    text = manifest_bytes(store, key)
    return mf.Manifest.parse(text.decode("utf-8")), xxhash.xxh3_64_hexdigest(text)


def parse_commit(store: Store, key: str) -> RemoteCheckpoint:
    """One commit object (a checkpoint's, or one host's part of a spread unit), read no further
    than ``MAX_COMMIT_BYTES``; ``ValueError`` when it is not one for its key."""
    body, _ = store.open(key)
    try:
        doc = json.loads(body.read(MAX_COMMIT_BYTES))
    finally:
        body.close()
    unit, _, name = key.rpartition("/")
    part = PART_RE.match(name)
    if doc.get("ckptd.remote") != FORMAT or (doc["key"] + COMMIT != key and not (part and doc["key"] == unit)):
        raise ValueError("not a ckptd commit object for this key")
    if part and doc.get("disk") != part.group(1):
        raise ValueError("a part commit of another disk than its name says")
    if not NAME_RE.match((unit if part else key[: -len(COMMIT)]).rsplit("/", 1)[-1]):
        raise ValueError("not a checkpoint's name (JOB-stepN[.safetensors])")
    shards = tuple(str(f) for f in doc.get("shards") or ())
    if any(not mf.SHARD_RE.match(f) for f in shards):
        raise ValueError("a shard name that is not rankR-of-W.safetensors")
    refs = tuple(str(f) for f in doc.get("refs") or ())
    if any(not NAME_RE.match(f) or not f.endswith(SUFFIX) for f in refs):
        raise ValueError("a reference that is not a checkpoint of the same job")
    owner = doc.get("owner_uid")
    return RemoteCheckpoint(
        str(doc["key"]),
        str(doc["job"]),
        int(doc["step"]),
        int(doc["bytes"]),
        str(doc["meta_digest"]),
        float(doc["created"]),
        str(doc.get("trigger", "")),
        dict(doc.get("metrics") or {}),
        shards,
        refs,
        None if owner is None else int(owner),
        str(doc.get("directory") or ""),
        part.group(1) if part else "",
        uploaded=float(doc.get("uploaded") or 0.0),
    )


def uncommitted(listing: Mapping[str, int], prefix: str, whole: Collection[str]) -> dict[str, list[str]]:
    """Objects of checkpoints that are not committed (``whole``: the keys of those that are, as
    ``committed`` found them): uploads cut off, still in progress, or the parts of a spread unit
    whose other hosts have not uploaded theirs. By the checkpoint's key."""
    out: dict[str, list[str]] = {}
    for k in listing:
        if not k.startswith(f"{prefix}/") or k.endswith(COMMIT):
            continue
        unit, sep, _ = k[len(prefix) + 1 :].partition("/")
        key = f"{prefix}/{unit}" if sep else k
        if (sep or k.endswith(SUFFIX)) and key not in whole and key + COMMIT not in listing:
            out.setdefault(key, []).append(k)
    return out


Key = tuple[str, "str | None", str]  # (the remote URL as configured, its endpoint, the job's prefix)
STALE_AFTER = 60.0  # seconds after which a reader's look at an entry asks for a refresh


@dataclass
class RemoteIndex:
    """The names of each job's committed remote checkpoints, answered from memory.

    ``names`` never does network I/O unless asked to ``wait`` (``ckptd gc``, a one-shot
    command that wants the truth); a missing or stale entry is refreshed by one background
    thread, which exists only while there is something to refresh. ``update`` is how the
    uploader, which just listed the store after an upload, keeps the entry exact.
    """

    stale_after: float = STALE_AFTER
    _entries: dict[Key, tuple[float, frozenset[str]]] = field(default_factory=dict)
    _wanted: list[Key] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def names(self, url: str, endpoint: str | None, prefix: str, wait: bool = False) -> set[str]:
        key = (url, endpoint, prefix)
        if wait:
            return set(self.refresh(key))
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or time.monotonic() - entry[0] > self.stale_after:
                self._want(key)
        return set(entry[1]) if entry else set()

    def update(self, url: str, endpoint: str | None, prefix: str, names: Iterable[str]) -> None:
        with self._lock:
            self._entries[(url, endpoint, prefix)] = (time.monotonic(), frozenset(names))

    def refresh(self, key: Key) -> frozenset[str]:
        """List the store now (the caller's thread); on failure the entry stays as it was."""
        url, endpoint, prefix = key
        try:
            names = frozenset(c.name for c in committed(open_store(url, endpoint), prefix))
        except RemoteError as exc:
            log.debug("remote: cannot list %s/%s: %s", url, prefix, exc)
            with self._lock:
                entry = self._entries.get(key)
            return entry[1] if entry else frozenset()
        self.update(url, endpoint, prefix, names)
        return names

    def _want(self, key: Key) -> None:
        """Under the lock: queue ``key`` and make sure the refresher runs."""
        if key not in self._wanted:
            self._wanted.append(key)
        if self._thread is None:
            self._thread = threading.Thread(target=self._refresher, name="ckptd-remote-index", daemon=True)
            start_thread(self._thread)

    def _refresher(self) -> None:
        while True:
            with self._lock:
                if not self._wanted:
                    self._thread = None
                    return
                key = self._wanted[0]
            try:
                self.refresh(key)
            except Exception:  # never lose the refresher to one store's surprise
                log.exception("remote: refreshing the index of %s failed", key[0])
            with self._lock:
                self._wanted.remove(key)


INDEX = RemoteIndex()

"""What is committed on a job's remote tier, and a cached index of it.

A remote checkpoint counts only when its commit object ``PREFIX/NAME.commit.json`` exists
(written last by ``upload``; ``PREFIX`` is the job's, ``ckptd.remote.layout``); ``committed``
lists and parses those. A commit object is the store's word, not ours: one whose name is not a
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
from typing import Any, Iterable, Mapping

from ckptd.disk import manifest as mf
from ckptd.disk.owner import start_thread
from ckptd.disk.scan import SUFFIX
from ckptd.remote.stores import RemoteError, Store, open_store

__all__ = ["COMMIT", "INDEX", "RemoteCheckpoint", "RemoteIndex", "committed", "uncommitted"]

log = logging.getLogger(__name__)
COMMIT = ".commit.json"
FORMAT = "1"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*-step\d+(\.safetensors)?$")  # a checkpoint's, nothing else


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


def committed(store: Store, prefix: str, listing: Mapping[str, int] | None = None) -> list[RemoteCheckpoint]:
    """The committed remote checkpoints under the job's ``prefix`` (``layout.job_prefix``, or a
    version-1 job name), oldest first (a commit object that does not parse is skipped)."""
    keys = store.list(f"{prefix}/") if listing is None else listing
    out = []
    for key in keys:
        if key.endswith(COMMIT) and key.startswith(f"{prefix}/") and "/" not in key[len(prefix) + 1 :]:
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
    if not NAME_RE.match(key[: -len(COMMIT)].rsplit("/", 1)[-1]):
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
    )


def uncommitted(store: Store, prefix: str, listing: Mapping[str, int]) -> list[str]:
    """Data objects with no commit object: uploads cut off, or still in progress."""
    return [
        k
        for k in listing
        if k.startswith(f"{prefix}/")
        and not k.endswith(COMMIT)
        and (k.endswith(SUFFIX) or "/" in k[len(prefix) + 1 :])
        and _commit_key(prefix, k) not in listing
    ]


def _commit_key(prefix: str, key: str) -> str:
    """``PREFIX/NAME.safetensors`` -> its commit object; ``PREFIX/UNIT/anything`` -> the unit's."""
    unit, sep, _ = key[len(prefix) + 1 :].partition("/")
    return f"{prefix}/{unit}{COMMIT}" if sep else key + COMMIT


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

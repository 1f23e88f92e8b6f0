"""The background uploader: verified checkpoints to their job's remote tier, in order, forever.

Used by the daemon and by the hook in embedded mode alike. One thread, one upload at a
time (boto3 parallelises the parts of each): replication never competes with the next
save for more than a link's worth of bandwidth, and never blocks training, which only
ever enqueues. A store that is down or refuses is retried with exponential backoff (1 s
to 60 s) on the same checkpoint, and said once per change of state (failing, then
working again) with the store's own words, not once per try.

After each upload: remote retention for the job, the remote index (``listing.INDEX``) updated
with what is committed now, then local retention again (a local checkpoint kept only because
it was not yet remote may go now). On start, ``resync``
queues what a directory holds that the remote lacks: uploads survive restarts of the
daemon and of the trainer, because the truth is the store's listing, not a queue file.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ckptd.disk.scan import scan
from ckptd.remote.listing import INDEX, RemoteCheckpoint, committed
from ckptd.remote.prune import prune_remote
from ckptd.remote.stores import RemoteError, S3Store, Store, open_store
from ckptd.remote.upload import replicate

__all__ = ["Upload", "Uploader"]

log = logging.getLogger("ckptd.store")
BACKOFF = (1.0, 60.0)


@dataclass(frozen=True)
class Upload:
    job: str
    path: str
    settings: Mapping[str, Any]
    key: Any = None  # the caller's name for the job (the daemon's JobKey), handed back in callbacks
    after: Callable[[], None] | None = None  # local retention, once it is remote
    created: float = 0.0  # when the local checkpoint was taken (the replication lag counts from it)

    def store(self) -> Store:
        return open_store(self.settings["remote"], self.settings.get("remote_endpoint"))


Done = Callable[[Upload, RemoteCheckpoint, list[RemoteCheckpoint]], None]
Failed = Callable[[Upload, RemoteError], None]


class Uploader:
    def __init__(self, on_done: Done | None = None, on_failed: Failed | None = None,
                 name: str = "ckptd-replicate") -> None:
        self._on_done, self._on_failed = on_done, on_failed
        self._queue: queue.Queue[Upload | None] = queue.Queue()
        self._pending: list[Upload] = []  # queued or in progress, oldest first
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._failing: set[str] = set()  # stores (URLs) currently failing: said once
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._resyncs: list[threading.Thread] = []

    def submit(self, upload: Upload) -> None:
        with self._lock:
            if any(u.path == upload.path for u in self._pending):
                return
            self._pending.append(upload)
        self._queue.put(upload)

    def resync(self, job: str, directory: str, settings: Mapping[str, Any], key: Any = None,
               after: Callable[[], None] | None = None) -> None:
        """Queue the job's local checkpoints that its remote lacks (a restart, or a store that was down)."""
        def find() -> None:
            store = open_store(settings["remote"], settings.get("remote_endpoint"))
            if isinstance(store, S3Store) and store.abort_stale_uploads(f"{job}/"):
                log.info("remote: aborted multipart uploads a killed upload left under %s/%s/", store.url, job)
            done = {c.name for c in committed(store, job)}
            INDEX.update(settings["remote"], settings.get("remote_endpoint"), job, done)
            for c in scan(directory, job):
                if c.ok and not c.pending and os.path.basename(c.path) not in done:
                    self.submit(Upload(job, c.path, settings, key, after, c.created))
        t = threading.Thread(target=self._retrying, args=(find, settings["remote"]), name="ckptd-resync", daemon=True)
        self._resyncs.append(t)
        t.start()

    @property
    def pending(self) -> list[Upload]:
        with self._lock:
            return list(self._pending)

    def wait(self, timeout: float | None = None) -> list[Upload]:
        """Until nothing is pending (or ``timeout``); returns what is still pending."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._pending:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._idle.wait(left)
            return list(self._pending)

    def close(self, timeout: float | None = None) -> None:
        self._stop.set()
        self._queue.put(None)
        for t in [self._thread, *self._resyncs]:
            t.join(timeout)

    # -- the thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        while (u := self._queue.get()) is not None:
            try:
                self._retrying(functools.partial(self._one, u), u.settings["remote"])
            finally:
                with self._idle:
                    self._pending = [p for p in self._pending if p is not u]
                    self._idle.notify_all()

    def _retrying(self, work: Callable[[], None], url: str) -> None:
        delay = BACKOFF[0]
        while not self._stop.is_set():
            try:
                work()
            except RemoteError as exc:
                self._failed(url, exc)
                self._stop.wait(delay)
                delay = min(delay * 2, BACKOFF[1])
                continue
            except Exception:  # never lose the thread
                log.exception("remote: unexpected error replicating to %s", url)
                return
            if url in self._failing:
                self._failing.discard(url)
                log.warning("remote: %s works again", url)
            return

    def _failed(self, url: str, exc: RemoteError) -> None:
        if url not in self._failing:
            self._failing.add(url)
            log.error("remote: %s (retrying with backoff; training is not affected)", exc)

    def _one(self, u: Upload) -> None:
        if not os.path.exists(u.path):
            return  # deleted (by quota) before its turn: nothing to upload
        store = u.store()
        try:
            commit = replicate(store, u.job, u.path)
        except RemoteError as exc:
            if self._on_failed is not None:
                self._on_failed(u, exc)
            raise
        prune_remote(store, u.job, u.settings, time.time())
        remaining = committed(store, u.job)
        INDEX.update(u.settings["remote"], u.settings.get("remote_endpoint"), u.job, (c.name for c in remaining))
        log.info("remote: %s verified at %s/%s", u.path, store.url, commit.key)
        if self._on_done is not None:
            self._on_done(u, commit, remaining)
        if u.after is not None:
            u.after()

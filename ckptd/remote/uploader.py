"""The background uploader: verified checkpoints to their job's remote tier, newest first, forever.

Used by the daemon and by the hook in embedded mode alike. One lane per job (its store and its
key prefix), each with a thread of its own while it has work: one job's slow, hung or hostile
remote (a FIFO for a commit object, a bucket that never answers) holds that job's uploads and
nobody else's. Within a lane, one upload at a time (boto3 parallelises the parts of each), and
always the newest checkpoint waiting first: after an outage, what a lost host would resume from
is remote first, then the backlog, newest to oldest. Training never waits: it only enqueues. A
store that is down or refuses is retried with exponential backoff (1 s to 60 s), and said once
per change of state (failing, then working again) with the store's own words, not once per try.

What goes up is what verified: an upload carries the fd its save verified through (``fd``, the
uploader's to close; at most ``MAX_HELD_FDS`` are held, the rest reopen as below); without one
(after a restart, or past that bound) ``replicate`` opens the file without following a link and
verifies it again first.

After each upload: remote retention for the job, the remote index (``listing.INDEX``) updated
with what is committed now, then local retention again (a local checkpoint kept only because
it was not yet remote may go now). On start, ``resync``
queues what a directory holds that the remote lacks: uploads survive restarts of the
daemon and of the trainer, because the truth is the store's listing, not a queue file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ckptd.core.settings import Settings
from ckptd.disk.owner import start_thread
from ckptd.disk.scan import scan
from ckptd.remote.layout import job_prefix
from ckptd.remote.listing import INDEX, RemoteCheckpoint, committed
from ckptd.remote.prune import prune_remote
from ckptd.remote.stores import RemoteError, S3Store, Store, open_store
from ckptd.remote.upload import replicate

__all__ = ["Upload", "Uploader"]

log = logging.getLogger(__name__)
BACKOFF = (1.0, 60.0)
MAX_HELD_FDS = 256  # verified fds held for queued uploads; past it an upload reopens and verifies again


@dataclass(frozen=True)
class Upload:
    job: str
    path: str
    settings: Settings
    key: Any = None  # the caller's name for the job (the daemon's JobKey), handed back in callbacks
    after: Callable[[], None] | None = None  # local retention, once it is remote
    created: float = 0.0  # when the local checkpoint was taken (the replication lag counts from it)
    prefix: str = ""  # the job's key prefix (``layout.job_prefix``); "" = this process's uid and the path's directory
    owner_uid: int | None = None  # recorded in the commit object (None: this process's uid)
    guard: Sequence[str] = ()  # where the file may be reached from without a link (the daemon's roots)
    fd: int | None = None  # the file as it verified at save time; the uploader closes it

    @property
    def uid(self) -> int:
        return os.getuid() if self.owner_uid is None else self.owner_uid

    @property
    def where(self) -> str:
        return self.prefix or job_prefix(self.job, os.path.realpath(os.path.dirname(self.path)), self.uid)

    @property
    def lane(self) -> tuple[str, str | None, str]:
        return self.settings.remote_url(), self.settings.remote_endpoint, self.where

    def store(self) -> Store:
        return open_store(self.settings.remote_url(), self.settings.remote_endpoint)


Done = Callable[[Upload, RemoteCheckpoint, list[RemoteCheckpoint]], None]
Failed = Callable[[Upload, RemoteError], None]
Lane = tuple[str, "str | None", str]


class Uploader:
    def __init__(
        self, on_done: Done | None = None, on_failed: Failed | None = None, name: str = "ckptd-replicate"
    ) -> None:
        self._on_done, self._on_failed, self._name = on_done, on_failed, name
        self._pending: list[Upload] = []  # queued or in progress, in submission order
        self._running: dict[Lane, threading.Thread] = {}  # a thread per lane with work
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._failing: set[str] = set()  # stores (URLs) currently failing: said once
        self._resyncs: list[threading.Thread] = []

    def submit(self, upload: Upload) -> None:
        with self._lock:
            if any(u.path == upload.path for u in self._pending) or self._stop.is_set():
                _close(upload)
                return
            if upload.fd is not None and sum(u.fd is not None for u in self._pending) >= MAX_HELD_FDS:
                _close(upload)
                upload = dataclasses.replace(upload, fd=None)
            self._pending.append(upload)
            lane = upload.lane
            if lane not in self._running:
                t = threading.Thread(target=self._run, args=(lane,), name=f"{self._name}-{upload.job}", daemon=True)
                self._running[lane] = t
                start_thread(t)

    def resync(
        self,
        job: str,
        directory: str,
        settings: Settings,
        key: Any = None,
        after: Callable[[], None] | None = None,
        prefix: str = "",
        owner_uid: int | None = None,
        guard: Sequence[str] = (),
    ) -> None:
        """Queue the job's local checkpoints that its remote lacks (a restart, or a store that was down)."""
        where = prefix or job_prefix(job, os.path.realpath(directory), os.getuid() if owner_uid is None else owner_uid)

        def find() -> None:
            store = open_store(settings.remote_url(), settings.remote_endpoint)
            if isinstance(store, S3Store) and store.abort_stale_uploads(f"{where}/"):
                log.info("remote: aborted multipart uploads a killed upload left under %s/%s/", store.url, where)
            done = {c.name for c in committed(store, where)}
            INDEX.update(settings.remote_url(), settings.remote_endpoint, where, done)
            for c in scan(directory, job):
                if c.ok and not c.pending and os.path.basename(c.path) not in done:
                    self.submit(Upload(job, c.path, settings, key, after, c.created, where, owner_uid, guard))

        t = threading.Thread(target=self._retrying, args=(find, settings.remote), name="ckptd-resync", daemon=True)
        self._resyncs.append(t)
        start_thread(t)

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
        with self._lock:
            threads = [*self._running.values(), *self._resyncs]
        for t in threads:
            t.join(timeout)
        with self._lock:  # a lane still uploading (past ``timeout``) keeps its fds: the process is ending
            for u in self._pending:
                if u.lane not in self._running:
                    _close(u)

    # -- the lanes --------------------------------------------------------------------------------

    def _next(self, lane: Lane) -> Upload | None:
        """Under the lock: the lane's newest checkpoint waiting (what a lost host resumes from goes first)."""
        mine = [u for u in self._pending if u.lane == lane]
        return max(mine, key=lambda u: (u.created, u.path)) if mine else None

    def _run(self, lane: Lane) -> None:
        delay = BACKOFF[0]
        while not self._stop.is_set():
            with self._lock:
                u = self._next(lane)
                if u is None:
                    del self._running[lane]
                    return
            try:
                self._one(u)
            except RemoteError as exc:
                self._failed(lane[0], exc)
                self._stop.wait(delay)
                delay = min(delay * 2, BACKOFF[1])
                continue  # the newest waiting again: it may be another one now
            except Exception:  # never lose the lane to one checkpoint's surprise
                log.exception("remote: unexpected error replicating %s to %s", u.path, lane[0])
            else:
                delay = BACKOFF[0]
                self._works(lane[0])
            with self._idle:
                self._pending = [p for p in self._pending if p is not u]
                _close(u)
                self._idle.notify_all()
        with self._lock:
            self._running.pop(lane, None)

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
            self._works(url)
            return

    def _works(self, url: str) -> None:
        if url in self._failing:
            self._failing.discard(url)
            log.warning("remote: %s works again", url)

    def _failed(self, url: str, exc: RemoteError) -> None:
        if url not in self._failing:
            self._failing.add(url)
            log.error("remote: %s (retrying with backoff; training is not affected)", exc)

    def _one(self, u: Upload) -> None:
        if not os.path.lexists(u.path):
            return  # deleted (by quota) before its turn: nothing to upload
        store, where = u.store(), u.where
        try:
            commit = replicate(store, u.job, u.path, prefix=where, fd=u.fd, owner_uid=u.uid, guard=u.guard or None)
        except RemoteError as exc:
            if self._on_failed is not None:
                self._on_failed(u, exc)
            raise
        prune_remote(store, where, u.settings, time.time())
        remaining = committed(store, where)
        INDEX.update(u.settings.remote_url(), u.settings.remote_endpoint, where, (c.name for c in remaining))
        log.info("remote: %s verified at %s/%s", u.path, store.url, commit.key)
        if self._on_done is not None:
            self._on_done(u, commit, remaining)
        if u.after is not None:
            u.after()


def _close(u: Upload) -> None:
    if u.fd is not None:
        try:
            os.close(u.fd)
        except OSError:
            pass

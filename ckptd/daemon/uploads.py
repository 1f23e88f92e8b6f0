"""The daemon's side of the remote tier: which jobs' checkpoints it uploads, and what it says of them.

The uploading itself (a lane per job, retries, remote retention, then local retention again)
is ``ckptd.remote.uploader``, shared with the hook's embedded mode. Here: a job's verified
checkpoint is queued with the fd it verified through; at start, what catalogued jobs saved
and their remote lacks is queued again (a restart cut those uploads off), but only for
remotes ``[daemon] remote_allow`` names, with the daemon's own endpoint and each job's owner
as its catalogue says (never what a client once sent); each upload ends in a counter, the
remote gauges and a catalogue event; and at scrape time each job's replication lag is the
age of its oldest verified checkpoint not yet remote.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Sequence

from ckptd.core.settings import Settings
from ckptd.daemon.access import Access
from ckptd.daemon.catalog import Catalog
from ckptd.daemon.jobkey import JobKey
from ckptd.daemon.ledger import Ledger
from ckptd.daemon.metrics import Metrics
from ckptd.disk.owner import acting_as, as_daemon
from ckptd.disk.remove import Removal, inside
from ckptd.disk.target import Target
from ckptd.remote.layout import job_prefix
from ckptd.remote.listing import RemoteCheckpoint
from ckptd.remote.stores import RemoteError
from ckptd.remote.uploader import Upload, Uploader
from ckptd.save.keep import prune

__all__ = ["Uploads"]

log = logging.getLogger(__name__)


class Uploads:
    def __init__(
        self, metrics: Metrics, catalog: Catalog, ledger: Ledger, access: Access, roots: Sequence[str]
    ) -> None:
        self.metrics, self.catalog, self.ledger, self.access, self.roots = metrics, catalog, ledger, access, roots
        self.uploader = Uploader(self._replicated, self._failed)

    def submit(
        self, key: JobKey, settings: Settings, path: str, created: float, owner: int, fd: int | None = None
    ) -> None:
        """A verified save of a job with a remote tier: upload it (from ``fd``, what verified, dup'd
        here), then let local retention run again."""
        after = self._pruner(Target(key.directory, key.name, settings, self.roots), key)
        prefix = job_prefix(key.name, key.directory, owner)
        held = None if fd is None else os.dup(fd)
        self.uploader.submit(
            Upload(key.name, path, settings, key, after, created, prefix, owner, tuple(self.roots), held)
        )

    def resync(self) -> None:
        """At start: what catalogued jobs saved and their remote lacks (a restart cut an upload off)."""
        for key, _ in self.catalog.jobs():
            stored = self.catalog.job_settings(key)
            owner = self.catalog.job_owner(key)
            if (
                not stored.remote
                or owner is None
                or not inside(key.directory, self.roots)
                or not os.path.isdir(key.directory)
            ):
                continue
            try:
                endpoint = self.access.remote(stored.remote)
            except PermissionError as exc:
                log.warning("job %s: not resuming its uploads: %s", key, exc)
                continue
            prefix = job_prefix(key.name, key.directory, owner)
            settings = stored.but(remote_endpoint=endpoint, remote_prefix=prefix)
            self.uploader.resync(
                key.name,
                key.directory,
                settings,
                key,
                after=self._pruner(Target(key.directory, key.name, settings, self.roots), key),
                prefix=prefix,
                owner_uid=owner,
                guard=tuple(self.roots),
            )

    def lag(self, now: float) -> dict[JobKey, float]:
        """Per job with uploads waiting: the age of its oldest verified checkpoint not yet remote
        (a job that keeps saving through an outage shows the outage, not its last save's age)."""
        oldest: dict[JobKey, float] = {}
        for u in self.uploader.pending:
            oldest[u.key] = min(oldest.get(u.key, u.created), u.created)
        return {key: max(0.0, now - created) for key, created in oldest.items()}

    def pending_count(self, key: JobKey) -> int:
        """Verified checkpoints of ``key`` waiting to be remote (``ckptd status``)."""
        return sum(1 for u in self.uploader.pending if u.key == key)

    def close(self, timeout: float) -> None:
        self.uploader.close(timeout=timeout)  # an upload cut off here is resumed by the next start's resync

    def _pruner(self, target: Target, key: JobKey) -> Callable[[], None]:
        """Local retention for a job, once a checkpoint of it is remote: with the job owner's rights
        (``ckptd.disk.owner``), the catalogue with the daemon's."""

        def removed(removals: list[Removal]) -> None:
            with as_daemon():
                self.ledger.removed(key, removals)

        def after() -> None:
            who = self.catalog.owner(key, key.directory)
            with acting_as(who):
                prune(target, removed)

        return after

    def _replicated(self, u: Upload, commit: RemoteCheckpoint, remote: list[RemoteCheckpoint]) -> None:
        m, key = self.metrics, u.key
        m.remote_uploads.labels(*key, "ok").inc()
        m.remote_last_success.labels(*key).set(time.time())
        m.remote_checkpoints.labels(*key).set(len(remote))
        m.remote_bytes.labels(*key).set(sum(c.bytes for c in remote))
        self.catalog.event(key, "replicated", path=u.path, remote=f"{u.settings.remote}/{commit.key}")

    def _failed(self, u: Upload, exc: RemoteError) -> None:
        self.metrics.remote_uploads.labels(*u.key, "failed").inc()
        self.catalog.event(u.key, "replication_failed", path=u.path, error=str(exc))

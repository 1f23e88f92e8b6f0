"""Where a staged snapshot goes: the three ways a save leaves the trainer, behind one interface.

1. **daemon**: the snapshot's fd goes over the socket (``trainer_hooks.link``); the
   daemon runs the save lifecycle and replies ``saved``.
2. **embedded**: no daemon answers (or it went away with saves in flight): this
   process's persist thread (``trainer_hooks.worker``) runs the same lifecycle
   (``ckptd.store.lifecycle.save_unit``).
3. **sharded**: every rank's persist thread writes its own shard and the ranks commit
   together (``trainer_hooks.shards.save_shard``); rank 0 tells the daemon, if any.

Whichever it is, ``on_done`` hears of each save once: verified, or failed with a reason.
The staging buffer is reused, so one save is in flight at a time: ``busy``/``wait``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from ckptd.core.vocab import FailReason
from ckptd.store.lifecycle import Removed, Target, save_unit
from ckptd.store.persist import Persisted, PersistError
from trainer_hooks.link import Link
from trainer_hooks.shards import ShardGroup, save_shard
from trainer_hooks.worker import Done, SaveJob, Worker

log = logging.getLogger("ckptd.hook")


class Outlet:
    def __init__(self, target: Target, on_done: Done, on_removed: Removed, shards: ShardGroup | None = None) -> None:
        self.target, self.shards = target, shards
        self._on_done, self._on_removed = on_done, on_removed
        self._worker = Worker(self._persist_here, on_done)
        self.link: Link | None = None

    def connect(self, path: str, hello: Callable[[], dict[str, Any]], beat: Callable[[], dict[str, Any]],
                on_due: Callable[[str], None], retry_every: float) -> None:
        """Talk to the daemon at ``path`` (and keep trying to, every ``retry_every`` seconds)."""
        self.link = Link(path, hello, beat, self._daemon_saved, self._daemon_lost, retry_every, on_due=on_due)

    @property
    def mode(self) -> str:
        return "daemon" if self.link is not None and self.link.connected else "embedded"

    @property
    def busy(self) -> bool:
        return self._worker.busy or (self.link is not None and self.link.busy)

    def wait(self, timeout: float | None = None) -> bool:
        """Until the save in flight is verified or failed (by the daemon or here)."""
        if self.link is not None and not self.link.wait_idle(timeout):
            return False
        return self._worker.wait_idle(timeout)

    def submit(self, job: SaveJob, msg: dict[str, Any]) -> None:
        if self.shards is not None or self.link is None or not self.link.submit(job, msg):
            self._worker.submit(job)

    def notify(self, msg: dict[str, Any]) -> None:
        if self.link is not None:
            self.link.notify(msg)

    def close(self, end_step: int | None, timeout: float | None = None) -> None:
        if self.link is not None:
            self.link.close(end_step)
            self.link = None
        self._worker.close(timeout)

    # -- the persist thread ------------------------------------------------------------------

    def _persist_here(self, job: SaveJob) -> Persisted:
        if self.shards is not None:
            return save_shard(self.shards, self.target, job, self._on_removed, self._report_commit)
        return save_unit(self.target, job.fd, job.length, job.filename, job.step, on_removed=self._on_removed)

    def _report_commit(self, report: dict[str, Any]) -> bool:
        """Rank 0 of a sharded save tells the daemon, which catalogues and prunes; False: there is none."""
        if self.link is not None and self.link.connected:
            self.link.notify(report)
            return True
        return self.shards is not None and self.shards.rank != 0

    # -- the daemon's answers ------------------------------------------------------------------

    def _daemon_saved(self, job: SaveJob, reply: dict[str, Any]) -> None:
        if reply.get("ok"):
            self._on_done(job, Persisted(str(reply.get("path")), job.length, {}), None)
        else:
            self._on_done(job, None, PersistError(FailReason.of(reply.get("reason")), str(reply.get("error"))))

    def _daemon_lost(self, jobs: list[SaveJob]) -> None:
        for job in jobs:
            log.warning("ckptd: the daemon went away with step %d in flight; persisting it here", job.step)
            self._worker.submit(job)

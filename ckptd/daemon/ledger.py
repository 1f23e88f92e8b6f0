"""Outcomes into the record: each save, failure, miss, adoption and deletion becomes its
metric samples and its catalogue event, in one place.

Sessions, watchers and the tick report what happened here; none of them touches the
Prometheus registry or the events table itself. Job state (steps, flags) stays with the
job (``ckptd.daemon.jobstate.JobState``, under the daemon's lock); this is only the record.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ckptd.core.units import format_bytes
from ckptd.core.vocab import FailReason, MissedReason, Outcome, Trigger, delete_label
from ckptd.daemon.catalog import Catalog
from ckptd.daemon.jobkey import JobKey
from ckptd.daemon.metrics import Metrics
from ckptd.disk.persist import PersistError
from ckptd.disk.remove import Removal
from ckptd.disk.scan import Checkpoint

log = logging.getLogger("ckptd.daemon")


class Ledger:
    def __init__(self, metrics: Metrics, catalog: Catalog) -> None:
        self.metrics, self.catalog = metrics, catalog

    def saved(self, job: JobKey, trigger: str, info: Checkpoint, durations: dict[str, float],
              last_verified_step: int) -> None:
        m = self.metrics
        m.saves.labels(*job, trigger, "ok").inc()
        m.verify.labels(*job, Outcome.OK).inc()
        for phase, seconds in durations.items():
            m.duration.labels(*job, phase).observe(seconds)
        m.last_success.labels(*job).set(time.time())
        m.last_saved_step.labels(*job).set(last_verified_step)
        log.info("job %s: step %d saved and verified (%s, %s, %.2fs): %s", job, info.step, trigger,
                 format_bytes(info.bytes), sum(durations.values()), info.path)
        self.catalog.event(job, "saved", step=info.step, path=info.path, trigger=trigger)

    def remembered(self, job: JobKey, step: int, nbytes: int, seconds: float) -> None:
        """A memory-only save (``every_memory``): counted as a save of trigger ``memory``; no file,
        so neither the last success nor the last saved step moves (what is on disk is what counts)."""
        self.metrics.saves.labels(*job, "memory", "ok").inc()
        log.info("job %s: step %d kept in memory (%s, %.2fs)", job, step, format_bytes(nbytes), seconds)

    def failed(self, job: JobKey, trigger: str, exc: PersistError) -> None:
        log.error("job %s: save failed (%s): %s", job, exc.reason, exc)
        self.metrics.saves.labels(*job, trigger, "failed").inc()
        self.metrics.failures.labels(*job, exc.reason).inc()
        if exc.reason == FailReason.VERIFY_FAILED:
            self.metrics.verify.labels(*job, Outcome.CORRUPT).inc()
        self.catalog.event(job, "failed", reason=exc.reason, error=str(exc))

    def missed(self, job: JobKey, reason: MissedReason, **detail: Any) -> None:
        self.metrics.missed.labels(*job, reason).inc()
        self.catalog.event(job, "missed", reason=reason, **detail)

    def adopted(self, job: JobKey, info: Checkpoint, outcome: Outcome) -> None:
        """Watch mode judged a checkpoint another tool wrote."""
        ok = outcome == Outcome.OK
        self.metrics.verify.labels(*job, outcome).inc()
        self.metrics.saves.labels(*job, Trigger.WATCH, "ok" if ok else "failed").inc()
        self.catalog.event(job, "adopted", path=info.path, ok=ok, outcome=outcome)
        if not ok:
            self.metrics.failures.labels(*job, FailReason.VERIFY_FAILED).inc()

    def scrubbed_corrupt(self, job: JobKey, path: str, reason: str) -> None:
        log.error("scrub: %s no longer verifies: %s", path, reason)
        self.metrics.verify.labels(*job, Outcome.CORRUPT).inc()
        self.catalog.mark_unverified(path, reason)
        self.catalog.event(job, "scrub_corrupt", path=path, reason=reason)

    def scrubbed_missing(self, job: JobKey, path: str) -> None:
        """A catalogued checkpoint the scrub found gone (deleted meanwhile): forgotten, not corrupt."""
        log.info("scrub: %s is gone (deleted since it was catalogued); forgotten", path)
        self.catalog.forget([path])
        self.catalog.event(job, "scrub_missing", path=path)

    def removed(self, job: JobKey, removals: list[Removal]) -> None:
        """Deletions by retention or quota, for hook jobs and watched trees alike."""
        done = [r for r in removals if r.done]
        for r in done:
            log.info("job %s: deleted %s (%s)", job, r.verdict.item.id, r.verdict.rule)
            self.metrics.deleted.labels(*job, delete_label(r.verdict.rule)).inc()
            self.catalog.event(job, "deleted", path=r.verdict.item.id, rule=r.verdict.rule)
        for r in removals:
            if r.error:
                log.error("job %s: %s", job, r.error)
        self.catalog.forget(r.verdict.item.id for r in done)
        self.refresh(job)

    def refresh(self, job: JobKey) -> None:
        """The disk gauges of a job, from the catalogue (one read)."""
        rows = [r for r in self.catalog.checkpoints(*job) if r.verified]
        self.metrics.checkpoints.labels(*job).set(len(rows))
        self.metrics.checkpoint_bytes.labels(*job).set(sum(r.bytes for r in rows))
        if rows:
            self.metrics.last_saved_step.labels(*job).set(rows[-1].step)
            self.metrics.last_success.labels(*job).set(rows[-1].created)

    def refresh_all(self) -> None:
        for key in {r.key for r in self.catalog.checkpoints()}:
            self.refresh(key)

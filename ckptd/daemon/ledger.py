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

log = logging.getLogger(__name__)


class Ledger:
    def __init__(self, metrics: Metrics, catalog: Catalog) -> None:
        self.metrics, self.catalog = metrics, catalog

    def saved(
        self, job: JobKey, trigger: str, info: Checkpoint, durations: dict[str, float], last_verified_step: int
    ) -> None:
        m = self.metrics
        m.saves.labels(*job, trigger, "ok").inc()
        m.verify.labels(*job, Outcome.OK).inc()
        for phase, seconds in durations.items():
            m.duration.labels(*job, phase).observe(seconds)
        m.last_success.labels(*job).set(time.time())
        m.last_saved_step.labels(*job).set(last_verified_step)
        log.info(
            "job %s: step %d saved and verified (%s, %s, %.2fs): %s",
            job,
            info.step,
            trigger,
            format_bytes(info.bytes),
            sum(durations.values()),
            info.path,
        )
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
        self.metrics.last_failure.labels(*job, exc.reason).set(time.time())
        if exc.reason == FailReason.VERIFY_FAILED:
            self.metrics.verify.labels(*job, Outcome.CORRUPT).inc()
        self.catalog.event(job, "failed", reason=exc.reason, error=str(exc))

    def missed(self, job: JobKey, reason: MissedReason, **detail: Any) -> None:
        self.metrics.missed.labels(*job, reason).inc()
        self.metrics.last_missed.labels(*job, reason).set(time.time())
        self.catalog.event(job, "missed", reason=reason, **detail)

    def adopted(self, job: JobKey, info: Checkpoint, outcome: Outcome) -> None:
        """Watch mode judged a checkpoint another tool wrote."""
        ok = outcome == Outcome.OK
        self.metrics.verify.labels(*job, outcome).inc()
        self.metrics.saves.labels(*job, Trigger.WATCH, "ok" if ok else "failed").inc()
        self.catalog.event(job, "adopted", path=info.path, ok=ok, outcome=outcome)
        if not ok:
            self.metrics.failures.labels(*job, FailReason.VERIFY_FAILED).inc()
        self.refresh(job)  # the corrupt gauge: a foreign checkpoint that does not verify is on disk

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

    def unattended(self, job: JobKey, info: Checkpoint) -> None:
        """A checkpoint under the roots that no connected trainer handed the daemon (``sweep``): its
        trainer saves on its own (embedded mode: the daemon was down, or its socket refused it)."""
        log.warning(
            "job %s: step %d was saved without the daemon (a trainer in embedded mode?): %s", job, info.step, info.path
        )
        self.metrics.last_unattended.labels(*job).set(info.created)
        self.catalog.event(job, "unattended", step=info.step, path=info.path)
        self.refresh(job)

    def hook_version(self, job: JobKey, version: str) -> None:
        """The hook version a job's trainer said hello with (one series per job)."""
        self.metrics.hook_info.remove_by_labels({"training_job": job.name, "directory": job.directory})
        self.metrics.hook_info.labels(*job, version).set(1)

    def restore_failures(self, since: float) -> None:
        """At start: each job's last failed save after ``since``, from the catalogue's events, when
        no verified save came after it. A save that keeps failing stays failing across a daemon
        restart: its alert (last failure newer than last success) does not resolve because the
        daemon restarted, nor does an old one come back with every restart."""
        newest = {r.key: r.created for r in self.catalog.checkpoints() if r.verified}
        for key, _ in self.catalog.jobs():
            for at, _name, kind, detail in self.catalog.events(key.name, limit=200):
                if detail.get("directory") != key.directory or kind not in ("failed", "saved"):
                    continue
                if kind == "failed" and at > max(newest.get(key, 0.0), since):
                    self.metrics.last_failure.labels(*key, FailReason.of(detail.get("reason"))).set(at)
                break

    def refresh(self, job: JobKey) -> None:
        """The disk gauges of a job, from the catalogue (one read)."""
        every = self.catalog.checkpoints(*job)
        rows = [r for r in every if r.verified]
        self.metrics.corrupt.labels(*job).set(sum(1 for r in every if not r.verified and r.outcome == Outcome.CORRUPT))
        self.metrics.checkpoints.labels(*job).set(len(rows))
        self.metrics.checkpoint_bytes.labels(*job).set(sum(r.bytes for r in rows))
        if rows:
            self.metrics.last_saved_step.labels(*job).set(rows[-1].step)
            self.metrics.last_success.labels(*job).set(rows[-1].created)

    def refresh_all(self) -> None:
        for key in {r.key for r in self.catalog.checkpoints()}:
            self.refresh(key)

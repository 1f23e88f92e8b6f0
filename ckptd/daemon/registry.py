"""The jobs the daemon knows, and the one lock they change under.

A job's life, in order, as the registry carries it out:

1. ``register``: a trainer's hello. The catalogue adopts what it wrote while the daemon was
   away; the job starts from its newest verified checkpoint (a resumed run's saved grid
   steps are not counted as skipped); a ``cron`` rule gets its scheduler entry.
2. Each save's outcome: ``save_succeeded`` (the job is current again: no overdue page, no
   pending ``due``) or ``save_failed``; both recorded by the ledger, which pages.
3. The one-second tick (``tick``): a save that is overdue is a miss; a time rule that is due
   tells the trainer to save at its next step.
4. ``unregister``: the connection ended (``end``, ``disconnect`` or ``detached``, the
   daemon stopping under the trainer); the job's series stay ``ENDED_JOB_TTL``.
5. ``expire``: ended jobs older than that are forgotten.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from ckptd.core import missed
from ckptd.core.policy import SavePolicy
from ckptd.core.settings import Settings
from ckptd.core.vocab import MissedReason
from ckptd.daemon.catalog import Catalog
from ckptd.daemon.jobkey import JobKey
from ckptd.daemon.jobstate import JobState, Trainer
from ckptd.daemon.ledger import Ledger
from ckptd.daemon.metrics import Metrics
from ckptd.disk.persist import PersistError
from ckptd.disk.scan import Checkpoint

log = logging.getLogger(__name__)
ENDED_JOB_TTL = 3600.0  # seconds an ended job's series and state stay (a trainer restarting within it resumes them)


class Registry:
    """Every job the daemon knows, connected or ended within ``ENDED_JOB_TTL``.

    ``lock`` is the daemon's one lock: every ``JobState`` is mutated under it, and the
    daemon's own session set too, so that no reader sees a job half-changed."""

    def __init__(self, lock: threading.RLock, catalog: Catalog, metrics: Metrics, ledger: Ledger, scheduler: Any):
        self.lock = lock
        self.jobs: dict[JobKey, JobState] = {}
        self.catalog = catalog
        self.metrics = metrics
        self.ledger = ledger
        self.scheduler = scheduler  # APScheduler: a job's cron rule is one of its entries

    # -- step 1: register --------------------------------------------------------------

    def register(
        self,
        name: str,
        uid: int,
        pid: int,
        directory: str,
        settings: Settings,
        policy: SavePolicy,
        step: int,
        session: Trainer | None = None,
    ) -> JobState:
        key = JobKey(name, directory)
        if self.catalog.adopt(directory):
            log.info("job %s: catalogued the checkpoints it wrote while the daemon was away", name)
        rows = [r for r in self.catalog.checkpoints(*key) if r.verified]
        history = self.catalog.history(key) if policy.auto else (0.0, 0, 0)
        # the hook says hello before it resumes (step 0): a resumed run has saved what the catalogue
        # holds, so counting due steps from 0 would call every saved grid step skipped (missed.resumed_from)
        saved = missed.resumed_from(step, [r.step for r in rows])
        with self.lock:
            job = JobState(
                name,
                uid,
                directory,
                settings,
                policy,
                pid=pid,
                connected=True,
                step=step,
                last_saved_step=saved,
                last_verified_step=rows[-1].step if rows else 0,
                last_verified_at=rows[-1].created if rows else None,
                session=session,
                history=history,
            )
            self.jobs[key] = job
        if policy.cron:
            self._schedule_cron(key, policy.cron)
        self.catalog.upsert_job(key, uid, settings)
        self.catalog.event(key, "start", pid=pid, step=step)
        self.metrics.job_started(key)
        self.metrics.init_job(key)
        return job

    def _schedule_cron(self, key: JobKey, crontab: str) -> None:
        from apscheduler.triggers.cron import CronTrigger

        self.scheduler.add_job(
            self._cron_due, CronTrigger.from_crontab(crontab), args=[key], id=_cron_id(key), replace_existing=True
        )

    # -- step 2: a save's outcome --------------------------------------------------------

    def save_succeeded(
        self, job: JobState, trigger: str, info: Checkpoint, durations: dict[str, float], cost: float | None = None
    ) -> None:
        with self.lock:
            if info.step >= job.last_verified_step:
                job.last_verified_step, job.last_verified_at = info.step, info.created
            job.overdue_flagged = False
            job.due_sent = False
            job.measured(time.time(), durations, cost)
        self.ledger.saved(job.key, trigger, info, durations, job.last_verified_step)

    def save_failed(self, job: JobState, trigger: str, exc: PersistError) -> None:
        with self.lock:
            job.failed += 1
        self.ledger.failed(job.key, trigger, exc)

    # -- step 3: the tick ------------------------------------------------------------------

    def tick(self, now: float, overdue_grace: float) -> None:
        with self.lock:
            jobs = [j for j in self.jobs.values() if j.connected]
        for j in jobs:
            self._check_overdue(j, now, overdue_grace)
            self._time_rule_due(j, now)

    def _check_overdue(self, j: JobState, now: float, grace: float) -> None:
        with self.lock:
            late = j.overdue(now, grace)
        if late is not None:
            log.warning("job %s: no verified save for %.0fs (expected every %.0fs)", j.key, late[0], late[1])
            self.ledger.missed(j.key, MissedReason.TIME_OVERDUE)

    def _time_rule_due(self, j: JobState, now: float) -> None:
        """The ``every`` rule, and ``every="auto"``'s memory interval: tell the trainer a save is
        due (it saves at its next step)."""
        with self.lock:
            due = j.every_due(now)
            memory = not due and j.memory_due(now)  # a disk save refreshes the memory tier too
        if (due or memory) and j.session is not None:
            j.session.send({"type": "due", "rule": "every" if due else "memory"})

    def _cron_due(self, key: JobKey) -> None:
        with self.lock:
            j = self.jobs.get(key)
        if j is not None and j.connected and j.session is not None:
            j.session.send({"type": "due", "rule": "cron"})

    # -- step 4: unregister ----------------------------------------------------------------

    def unregister(self, job: JobState, ended: bool, stopping: bool) -> None:
        """``ended``: the trainer said goodbye; ``stopping``: the daemon is the one going."""
        with self.lock:
            job.connected = False
            job.session = None
            job.ended_at = time.time()
        if self.scheduler.get_job(_cron_id(job.key)) is not None:
            self.scheduler.remove_job(_cron_id(job.key))
        self.metrics.job_ended(job.key, time.time())
        # "detached": the daemon stopped under a running trainer, which is no crash of it (every="auto"
        # learns its MTBF from "disconnect"s, ``Catalog.history``); the run stays open until it reconnects
        kind = "end" if ended else "detached" if stopping else "disconnect"
        self.catalog.event(job.key, kind, step=job.step)

    # -- step 5: expire ----------------------------------------------------------------------

    def expire(self, now: float) -> None:
        with self.lock:
            for key in [
                k
                for k, j in self.jobs.items()
                if not j.connected and j.ended_at is not None and now - j.ended_at > ENDED_JOB_TTL
            ]:
                del self.jobs[key]

    # -- what others read ----------------------------------------------------------------------

    def live(self, uid: int, other_than: JobKey) -> int:
        """Jobs of ``uid`` connected or ended within ``ENDED_JOB_TTL`` (each is a set of metric series)."""
        now = time.time()
        with self.lock:
            return sum(
                1
                for k, j in self.jobs.items()
                if j.uid == uid and k != other_than and (j.connected or now - (j.ended_at or now) < ENDED_JOB_TTL)
            )

    def connected_directories(self) -> set[str]:
        with self.lock:
            return {j.directory for j in self.jobs.values() if j.connected}

    def gauges(
        self, now: float, lag: dict[JobKey, float], held: Callable[[JobKey], int]
    ) -> list[tuple[JobKey, dict[str, float]]]:
        """Scrape time: every known job's state gauges (``metrics.JobGauges``)."""
        with self.lock:
            return [(j.key, j.gauges(now, lag.get(j.key, 0.0), held(j.key))) for j in self.jobs.values()]

    def counts(self) -> tuple[int, int]:
        """(connected, known)."""
        with self.lock:
            return sum(j.connected for j in self.jobs.values()), len(self.jobs)


def _cron_id(key: JobKey) -> str:
    return f"cron:{key.name}:{key.directory}"

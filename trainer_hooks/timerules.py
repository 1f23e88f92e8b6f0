"""The hook's own clock for ``every`` and ``cron``, used only while no daemon owns the job.

Time rules fire from one place: with a daemon connected, its scheduler sends ``due``
(``ckptd.wire.protocol``, step 6) and this one stays silent; embedded (no daemon, or
the daemon went away) this one fires. Either way a firing only raises a flag: the save
happens at the next ``step()``. APScheduler is imported only when a time rule is set.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Any, Callable

from ckptd.core import policy as pol


class TimeRules:
    def __init__(self, policy: pol.SavePolicy, fire: Callable[[str], None], mine: Callable[[], bool]) -> None:
        self.policy = policy
        self._fire, self._mine = fire, mine
        self._sched: Any = None
        if not policy.has_time_rules:
            return
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.cron import CronTrigger

        logging.getLogger("apscheduler").setLevel(logging.WARNING)  # four INFO lines per save otherwise

        self._sched = BackgroundScheduler(daemon=True, job_defaults={"misfire_grace_time": None, "coalesce": True})
        if policy.cron:
            self._sched.add_job(self._fired, CronTrigger.from_crontab(policy.cron), args=["cron"], id="cron")
        self._sched.start()

    def saved_at(self, wall: float) -> None:
        """A save was taken at ``wall``: ``every`` counts from there."""
        due = pol.next_time_due(self.policy, wall)
        if due is not None and self._sched is not None:
            self._sched.add_job(self._fired, "date", run_date=datetime.fromtimestamp(due, timezone.utc),
                                args=["every"], id="every", replace_existing=True)

    def scheduled(self, rule: str) -> bool:
        return self._sched is not None and self._sched.get_job(rule) is not None

    def _fired(self, rule: str) -> None:
        if self._mine():
            self._fire(rule)
        elif rule == "every":  # the daemon's turn; keep a clock running should it go away
            self.saved_at(time.time())

    def close(self) -> None:
        if self._sched is not None:
            self._sched.shutdown(wait=False)
            self._sched = None

"""The hook's own clock for ``every`` and ``cron``, used only while no daemon owns the job.

Time rules fire from one place: with a daemon connected, its scheduler sends ``due``
(``ckptd.wire.protocol``, step 6) and this one stays silent; embedded (no daemon, or
the daemon went away) this one fires. Either way a firing only raises a flag: the save
happens at the next ``step()``. APScheduler is imported only when a time rule is set.

With ``every="auto"`` the interval is ``ckptd.core.autointerval``'s, from the stalls and
persist times this hook measured (a guess from the state's size before the first save)
and the configured ``mtbf`` or the prior: the hook has no history of the job's failures,
the daemon does, so with a daemon its estimate (from the catalogue) is the one that fires.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Any, Callable

from ckptd.core import policy as pol
from ckptd.core.autointerval import AutoInterval, CostSamples, auto_interval, estimate_mtbf, guess_cost

log = logging.getLogger(__name__)


class TimeRules:
    def __init__(
        self,
        policy: pol.SavePolicy,
        fire: Callable[[str], None],
        mine: Callable[[], bool],
        job: str = "",
        state_bytes: int = 0,
        every_memory: float | None = None,
    ) -> None:
        self.policy, self.job = policy, job
        self._fire, self._mine = fire, mine
        self._sched: Any = None
        self.costs = CostSamples()
        self._cost_guess = guess_cost(state_bytes)
        self._said: float | None = None  # the auto interval last logged
        if not policy.has_time_rules and not every_memory:
            return
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.cron import CronTrigger

        logging.getLogger("apscheduler").setLevel(logging.WARNING)  # four INFO lines per save otherwise

        self._sched = BackgroundScheduler(daemon=True, job_defaults={"misfire_grace_time": None, "coalesce": True})
        if policy.cron:
            self._sched.add_job(self._fired, CronTrigger.from_crontab(policy.cron), args=["cron"], id="cron")
        if every_memory:  # the memory tier's clock: only with a daemon, whose memory it is (SPEC §14)
            self._sched.add_job(self._fired, "interval", seconds=every_memory, args=["memory"], id="memory")
        self._sched.start()

    @property
    def auto(self) -> AutoInterval | None:
        """``every="auto"``'s interval now, with the rule that decided it (None without auto)."""
        if not self.policy.auto:
            return None
        return auto_interval(
            self.costs,
            estimate_mtbf(0, 0.0, self.policy.mtbf),
            self.policy.max_overhead,
            self.policy.min_interval,
            self._cost_guess,
        )

    def measured(self, stall: float | None = None, persist: float | None = None) -> None:
        """A save's stall (at the handoff) or persist time (handoff to verified), in seconds."""
        self.costs = self.costs.add(stall, persist)

    def saved_at(self, wall: float) -> None:
        """A save was taken at ``wall``: ``every`` counts from there."""
        auto = self.auto
        if auto is not None and (self._said is None or abs(auto.seconds - self._said) > 0.25 * self._said):
            self._said = auto.seconds
            log.info("ckptd: job %s: saving every %.3gs (%s, rule %s)", self.job, auto.seconds, auto.reason, auto.rule)
        due = pol.next_time_due(self.policy, wall, auto.seconds if auto else None)
        if due is not None and self._sched is not None:
            self._sched.add_job(
                self._fired,
                "date",
                run_date=datetime.fromtimestamp(due, timezone.utc),
                args=["every"],
                id="every",
                replace_existing=True,
            )

    def scheduled(self, rule: str) -> bool:
        return self._sched is not None and self._sched.get_job(rule) is not None

    def _fired(self, rule: str) -> None:
        if rule == "memory":
            if not self._mine():  # a daemon holds the job: the memory tier is there
                self._fire(rule)
        elif self._mine():
            self._fire(rule)
        elif rule == "every":  # the daemon's turn; keep a clock running should it go away
            self.saved_at(time.time())

    def close(self) -> None:
        if self._sched is not None:
            self._sched.shutdown(wait=False)
            self._sched = None

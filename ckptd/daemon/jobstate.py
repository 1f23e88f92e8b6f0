"""What the daemon knows of one job: its settings and policy, its progress, its saves' costs.

Mutated only under the daemon's lock (``Host.lock``); the tick, the sessions, the CLI's
requests and the scrape-time gauges all read it there. Its methods answer the questions
asked of a job (is a time rule due, is it overdue, what interval would ``every="auto"``
choose now) from plain data and the time passed in.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from ckptd.core import missed
from ckptd.core.autointerval import AutoInterval, CostSamples, auto_interval, estimate_mtbf, guess_cost, overhead_ratio
from ckptd.core.policy import SavePolicy, time_interval
from ckptd.daemon.jobkey import JobKey

__all__ = ["JobState", "Trainer"]


class Trainer(Protocol):
    """The connection a job's trainer is on (``ckptd.daemon.session.Session``): the daemon tells
    it a time rule is due."""

    def send(self, msg: dict[str, Any]) -> bool: ...


@dataclass
class JobState:
    """What the daemon knows of one job; mutated only under ``Daemon.lock``."""

    name: str
    uid: int
    directory: str
    settings: dict[str, Any]
    policy: SavePolicy
    pid: int = 0
    connected: bool = False
    step: int = 0
    started_at: float = field(default_factory=time.time)
    last_saved_step: int = 0
    last_verified_step: int = 0
    last_verified_at: float | None = None
    flagged_due: int = 0
    overdue_flagged: bool = False
    seconds_per_step: float | None = None
    last_beat: tuple[float, int] | None = None
    missed: int = 0
    failed: int = 0
    in_flight: int = 0
    due_sent: bool = False
    world_size: int = 1
    ended_at: float | None = None
    session: Trainer | None = None
    state_bytes: int = 0  # the hook's state size, from hello: auto's cost guess before a save was measured
    costs: CostSamples = field(default_factory=CostSamples)
    stalls: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=4096))  # (when, seconds)
    history: tuple[float, int] = (0.0, 0)  # earlier runs of the job: (seconds run, unclean exits), from the catalogue

    @property
    def key(self) -> JobKey:
        return JobKey(self.name, self.directory)

    def measured(self, at: float, durations: dict[str, float]) -> None:
        """A verified save's stall (reported by the hook) and persist time (measured here)."""
        stall = durations.get("stall")
        persist = sum(durations.get(k, 0.0) for k in ("persist", "verify"))
        self.costs = self.costs.add(stall, persist if persist > 0 else None)
        if stall is not None:
            self.stalls.append((at, stall))

    def auto(self, now: float) -> AutoInterval | None:
        """``every="auto"``'s interval now; the MTBF from this job's unclean exits on this host."""
        if not self.policy.auto:
            return None
        ran, exits = self.history
        mtbf = estimate_mtbf(exits, ran + max(0.0, now - self.started_at), self.policy.mtbf)
        return auto_interval(self.costs, mtbf, self.policy.max_overhead, self.policy.min_interval,
                             guess_cost(self.state_bytes))

    def interval(self, now: float, auto: AutoInterval | None = None) -> float | None:
        """Seconds between saves the policy implies now (``ckptd_expected_save_interval_seconds``);
        ``auto``: ``self.auto(now)`` when the caller has it already."""
        auto = auto or self.auto(now)
        return missed.expected_interval(self.policy, self.seconds_per_step, auto.seconds if auto else None)

    def gauges(self, now: float, remote_lag: float, memory: int = 0) -> dict[str, float]:
        """The job's gauges at scrape time (``ckptd.daemon.metrics.JOB_GAUGES``)."""
        auto = self.auto(now)
        interval = self.interval(now, auto)
        values = {"ckptd_job_up": float(self.connected),
                  "ckptd_unsaved_steps": float(missed.unsaved_at_exit(self.step, self.last_verified_step)),
                  "ckptd_quota_bytes": float(self.settings.get("max_bytes") or 0),
                  "ckptd_expected_loss_seconds": self.expected_loss(now),
                  "ckptd_save_overhead_ratio": self.overhead(now)}
        if interval is not None:  # never 0 for "unknown": CkptdCheckpointStale compares with 2x it
            values["ckptd_expected_save_interval_seconds"] = interval
        # 0 for a job without every=auto or a remote tier: a basic install's dashboard has its series
        values["ckptd_auto_interval_seconds"] = auto.seconds if auto is not None else 0.0
        values["ckptd_remote_lag_seconds"] = remote_lag if self.settings.get("remote") else 0.0
        values["ckptd_memory_bytes"] = float(memory)
        return values

    def overhead(self, now: float) -> float:
        """Stalled share of training over the last hour (up to the end, for a job that ended)."""
        return overhead_ratio(self.stalls, self.started_at, min(now, self.ended_at or now))

    def expected_loss(self, now: float) -> float:
        return missed.expected_loss(self.last_verified_at, self.started_at, now) if self.connected else 0.0

    # The tick's questions; asked under the daemon's lock, each answered once per occasion.

    def _since(self) -> float:
        """When the time rules count from: the newest verified save, or this run's start if later."""
        return max(self.last_verified_at or 0.0, self.started_at)

    def every_due(self, now: float) -> bool:
        """Has the ``every`` interval (auto's, with ``every="auto"``) passed since the last verified
        save (told once)? Counting from the verified save is what keeps auto free of backpressure."""
        last = self._since()
        auto = self.auto(now)
        every = time_interval(self.policy, auto.seconds if auto else None)
        due = every is not None and now - last >= every and not self.due_sent
        self.due_sent = self.due_sent or due
        return due

    def overdue(self, now: float, grace: float) -> tuple[float, float] | None:
        """(seconds since the last verified save, expected interval) the first time that is too long."""
        interval = self.interval(now)
        last = self._since()
        if self.overdue_flagged or not missed.time_overdue(interval, last, now, grace):
            return None
        self.overdue_flagged = True
        self.missed += 1
        return now - last, interval or 0.0

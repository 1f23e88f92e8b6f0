"""What the daemon knows of one job: its settings and policy, its progress, its saves' costs.

Mutated only under the daemon's lock (``Registry.lock``); the tick, the sessions, the CLI's
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
from ckptd.core.autointerval import AutoInterval, CostSamples, estimate_mtbf, guess_cost, overhead_ratio
from ckptd.core.multilevel import Coverage, MultiLevel, estimate_coverage, multilevel
from ckptd.core.policy import SavePolicy, time_interval
from ckptd.core.settings import Settings
from ckptd.daemon.jobkey import JobKey

__all__ = ["TICK", "JobState", "Trainer"]

TICK = 1.0  # seconds between the daemon's ticks, which ask every_due and memory_due: no interval is finer


class Trainer(Protocol):
    """The connection a job's trainer is on (``ckptd.daemon.session.Session``): the daemon tells
    it a time rule is due."""

    def send(self, msg: dict[str, Any]) -> bool: ...


@dataclass
class JobState:
    """What the daemon knows of one job; mutated only under ``Registry.lock``."""

    name: str
    uid: int
    directory: str
    settings: Settings
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
    in_flight: int = 0  # disk saves handed over and not yet answered
    in_flight_memory: int = 0  # memory-only saves (their own buffer in the hook)
    due_sent: bool = False
    world_size: int = 1
    sharded: bool = False  # every rank writes its part (the memory tier holds whole snapshots only)
    ended_at: float | None = None
    session: Trainer | None = None
    state_bytes: int = 0  # the hook's state size, from hello: auto's cost guess before a save was measured
    costs: CostSamples = field(default_factory=CostSamples)
    memory_costs: CostSamples = field(default_factory=CostSamples)  # memory-only saves: stall, then kept
    memory_budget: int = 0  # the daemon's memory tier (0: off), for every="auto"'s two-level plan
    last_memory_at: float | None = None  # the newest snapshot the memory tier took (of either kind)
    memory_due_sent: bool = False
    stalls: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=4096))  # (when, seconds)
    # earlier runs of the job, from the catalogue: (seconds run, trainer crashes, runs lost with the daemon)
    history: tuple[float, int, int] = (0.0, 0, 0)

    @property
    def key(self) -> JobKey:
        return JobKey(self.name, self.directory)

    def measured(self, at: float, durations: dict[str, float], cost: float | None = None) -> None:
        """A verified save's stall (reported by the hook) and persist time (measured here). What the
        save cost training is its stall, or the ``cost`` the hook reports when it was more (an
        overlapped copy on CPU): that is what every="auto" and the overhead ratio weigh."""
        stall = durations.get("stall") if cost is None else cost
        persist = sum(durations.get(k, 0.0) for k in ("persist", "verify"))
        self.costs = self.costs.add(stall, persist if persist > 0 else None)
        if stall is not None:
            self.stalls.append((at, stall))

    def plan(self, now: float) -> MultiLevel | None:
        """``every="auto"``'s two intervals now (``ckptd.core.multilevel``): the MTBF from this job's
        failures on this host, the memory tier's share of recoveries from which kind they were."""
        if not self.policy.auto:
            return None
        ran, crashes, losses = self.history
        mtbf = estimate_mtbf(crashes + losses, ran + max(0.0, now - self.started_at), self.policy.mtbf)
        coverage = estimate_coverage(crashes, losses) if self.memory_tier else Coverage(0.0, "none")
        return multilevel(
            self.costs,
            self.memory_costs,
            mtbf,
            coverage,
            self.policy.max_overhead,
            self.policy.min_interval,
            guess_cost(self.state_bytes),
            self.settings.every_memory,
            resolution=TICK,
        )

    @property
    def memory_tier(self) -> bool:
        """Can this job's snapshots be kept in the daemon's memory (so memory saves are worth planning)?"""
        fits = self.state_bytes <= self.memory_budget  # (0: not told; a snapshot too large is not kept)
        return self.memory_budget > 0 and fits and not self.sharded

    def auto(self, now: float) -> AutoInterval | None:
        """``every="auto"``'s disk interval now, with the rule that decided it."""
        plan = self.plan(now)
        return plan.disk if plan is not None else None

    def interval(self, now: float, auto: AutoInterval | None = None) -> float | None:
        """Seconds between saves the policy implies now (``ckptd_expected_save_interval_seconds``);
        ``auto``: ``self.auto(now)`` when the caller has it already."""
        auto = auto or self.auto(now)
        return missed.expected_interval(self.policy, self.seconds_per_step, auto.seconds if auto else None)

    def gauges(self, now: float, remote_lag: float, memory: int = 0) -> dict[str, float]:
        """The job's gauges at scrape time (``ckptd.daemon.metrics.JOB_GAUGES``)."""
        plan = self.plan(now)
        auto = plan.disk if plan is not None else None
        interval = self.interval(now, auto)
        values = {
            "ckptd_job_up": float(self.connected),
            "ckptd_unsaved_steps": float(missed.unsaved_at_exit(self.step, self.last_verified_step)),
            "ckptd_quota_bytes": float(self.settings.max_bytes or 0),
            "ckptd_expected_loss_seconds": self.expected_loss(now),
            "ckptd_save_overhead_ratio": self.overhead(now),
        }
        if interval is not None:  # never 0 for "unknown": CkptdCheckpointStale compares with 2x it
            values["ckptd_expected_save_interval_seconds"] = interval
        # 0 for a job without every=auto or a remote tier: a basic install's dashboard has its series
        values["ckptd_auto_interval_seconds"] = auto.seconds if auto is not None else 0.0
        values["ckptd_auto_memory_interval_seconds"] = (plan.memory or 0.0) if plan is not None else 0.0
        values["ckptd_remote_lag_seconds"] = remote_lag if self.settings.remote else 0.0
        values["ckptd_memory_bytes"] = float(memory)
        return values

    def overhead(self, now: float) -> float:
        """Stalled share of training over the last hour (up to the end, for a job that ended)."""
        return overhead_ratio(self.stalls, self.started_at, min(now, self.ended_at or now))

    def observe(self, step: int, now: float) -> None:
        """The trainer was at ``step`` at ``now`` (a heartbeat, or a save it handed over): the step
        time, smoothed, that a step rule's expected interval is made of. Saves count too: a fast
        trainer can save twice before its first heartbeat, and hang there (CkptdCheckpointStale
        needs the interval to compare with)."""
        if self.last_beat is not None and step > self.last_beat[1]:
            rate = (now - self.last_beat[0]) / (step - self.last_beat[1])
            self.seconds_per_step = rate if self.seconds_per_step is None else 0.8 * self.seconds_per_step + 0.2 * rate
        if self.last_beat is None or step > self.last_beat[1]:
            self.last_beat = (now, step)
        self.step = max(self.step, step)

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

    def memory_due(self, now: float) -> bool:
        """Has ``every="auto"``'s memory interval passed since the memory tier last took a snapshot
        (told once)? A fixed ``every_memory`` is the hook's own clock, not asked here."""
        plan = self.plan(now)
        if plan is None or plan.memory is None or plan.memory_rule == "fixed":
            return False
        last = max(self.last_memory_at or 0.0, self._since())
        due = now - last >= plan.memory and not self.memory_due_sent
        self.memory_due_sent = self.memory_due_sent or due
        return due

    def kept_in_memory(self, at: float, stall: float | None, seconds: float | None) -> None:
        """The memory tier took a snapshot (a memory-only save when ``seconds`` is its cost)."""
        self.last_memory_at, self.memory_due_sent = at, False
        if seconds is not None:
            self.memory_costs = self.memory_costs.add(stall, seconds)

    def overdue(self, now: float, grace: float) -> tuple[float, float] | None:
        """(seconds since the last verified save, expected interval) the first time that is too long."""
        interval = self.interval(now)
        last = self._since()
        if self.overdue_flagged or not missed.time_overdue(interval, last, now, grace):
            return None
        self.overdue_flagged = True
        self.missed += 1
        return now - last, interval or 0.0

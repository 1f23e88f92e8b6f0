"""What may make a save due, between two ``step()`` calls, and the policy's answer.

``step()`` must cost a few attribute reads when no save is due, so the trigger state is
kept in the form that answers "is anything due?" at once: ``next_due`` (the next step a
step rule or the final save wants) and ``attention`` (something else happened: a time
rule fired, a signal arrived, a best metric improved). Only when either says so does
the ``Checkpointer`` ask ``decide``, which asks the pure ``ckptd.core.policy.decide``.

Sharded runs cannot act on a trigger one rank saw alone (every rank must save at the
same step), so there the time, preemption and best flags are only *proposed* at each
exchange (``trainer_hooks._ranks.shards``) and what every rank acts on is the agreed result.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Mapping, Sequence

from ckptd.core import policy as pol
from trainer_hooks._ranks.shards import FLAG_BEST, FLAG_PREEMPT, FLAG_TIME, TIME_RULES, ShardGroup

log = logging.getLogger(__name__)

SCHEDULED = ("step", "time", "best")  # the triggers min_interval and on_busy="skip" apply to


def hook_policy(settings: Mapping[str, Any], saving: bool, sharded: bool, job: str) -> pol.SavePolicy:
    """The policy this process acts on: none on a rank that does not save (DDP's other ranks)."""
    if not saving:
        return pol.SavePolicy(save_final=False, on_preempt=False)
    policy = pol.SavePolicy.from_settings(settings)
    if sharded and policy.min_interval:
        # every rank must save at the same step, and the ranks' clocks differ by milliseconds
        log.warning("ckptd: sharded job %s: min_interval is not applied (ranks must agree on the step)", job)
        policy = replace(policy, min_interval=0.0)
    return policy


def warn_about_plan(policy: pol.SavePolicy, job: str) -> None:
    """What ``ckptd plan`` would warn about, said at construction when the run's length is known."""
    if policy.total_steps is not None:
        for warning in pol.longer_than_run(policy, policy.total_steps):
            log.warning("ckptd: job %s: %s", job, warning)


class Triggers:
    def __init__(self, policy: pol.SavePolicy, job: str, sharded: bool) -> None:
        self.policy, self.job, self.sharded = policy, job, sharded
        self.best_key = policy.best_metric
        self.last_saved_step = 0
        self.last_trigger = ""  # what the save of last_saved_step was ("": none in this run)
        self.last_sched_at: float | None = None
        self.best: float | None = None  # the best metric among saved checkpoints
        self.time_due: str | None = None  # "every" or "cron" once a time rule fired
        self.memory_due = False  # every_memory's clock fired: a save to the daemon's memory tier only
        self.attention = False  # something besides the step count may make a save due: ask the policy
        self.agreed = [0, 0, 0]  # sharded: the flags every rank acts on
        self._sent_preempt = False
        self._best_seen = False  # sharded: an improvement latched until the next exchange sends it
        self._best_steps: list[int] = []
        self._churn_warned = False
        self.next_due = pol.next_due_step(policy, 0)

    # -- what happened -------------------------------------------------------------------

    def metric_seen(self, value: float | None) -> bool:
        """The best_metric's new value: an improvement makes a save due (sharded: proposed at the
        next exchange). Returns whether it improved."""
        if self.best_key is None or not pol.improves(self.policy, value, self.best):
            return False
        self._best_seen = True
        self.attention = not self.sharded
        return True

    def time_fired(self, rule: str) -> None:
        if rule == "memory":
            self.memory_due = True
        else:
            self.time_due = rule
        # sharded: only what the ranks agreed on may send one rank into a save (its collectives
        # would pair with the others' training); the flag goes out at the next exchange
        self.attention = not self.sharded or rule == "memory"

    def raise_attention(self) -> None:
        self.attention = not self.sharded

    def exchange(self, shards: ShardGroup, signum: int | None, metric: float | None, now: float) -> None:
        """Sharded: send this step's own triggers once; act on what all ranks sent last time."""
        local = [0, 0, 0]
        local[FLAG_TIME] = TIME_RULES.index(self.time_due) if self.time_due in TIME_RULES else 0
        local[FLAG_PREEMPT] = int(signum is not None and signum > 0 and not self._sent_preempt)
        local[FLAG_BEST] = int(self._best_seen or pol.improves(self.policy, metric, self.best))
        self._best_seen = False
        self._sent_preempt = self._sent_preempt or bool(local[FLAG_PREEMPT])
        self.time_due = None  # sent: rank 0's timer fires once, the agreed flag comes back next time
        self.agreed = shards.exchange(local, now)
        self.attention = any(self.agreed)

    # -- the decision --------------------------------------------------------------------

    def decide(self, step: int, preempt_pending: bool, metric: float | None, now: float) -> pol.Decision:
        if self.sharded:
            a = self.agreed
            p = pol.Progress(
                step,
                self.last_saved_step,
                self.last_sched_at,
                TIME_RULES[a[FLAG_TIME]] or None,
                bool(a[FLAG_PREEMPT]),
                metric,
                self.best,
                best_due=bool(a[FLAG_BEST]),
            )
        else:
            p = pol.Progress(
                step, self.last_saved_step, self.last_sched_at, self.time_due, preempt_pending, metric, self.best
            )
        return pol.decide(self.policy, p, now)

    def decided(self, preempt_pending: bool) -> None:
        """After ``decide`` (and the save it asked for, if any): back to the fast path."""
        self.next_due = pol.next_due_step(self.policy, self.last_saved_step)
        self.agreed = [0, 0, 0]
        self.attention = not self.sharded and (self.time_due is not None or preempt_pending)

    def saved(self, step: int, trigger: str, metric: float | None, now: float) -> None:
        self.last_saved_step, self.last_trigger = step, trigger
        self.time_due = None
        if trigger in SCHEDULED:
            self.last_sched_at = now
        if pol.improves(self.policy, metric, self.best):
            self.best = metric

    def restart_at(self, step: int, saved_metrics: Sequence[float | None] = ()) -> None:
        """The run continues from ``step`` (a resume): nothing is due before the next rule; the
        best metric is the best among the checkpoints already saved."""
        self.last_saved_step, self.last_trigger = step, ""
        for v in saved_metrics:
            if pol.improves(self.policy, v, self.best):
                self.best = v
        self.next_due = pol.next_due_step(self.policy, step)

    def churn(self, step: int) -> None:
        """A best metric fed to every ``step()`` (a training loss) saves at almost every step: say so once."""
        self._best_steps = (self._best_steps + [step])[-5:]
        if not self._churn_warned and len(self._best_steps) == 5 and self._best_steps[-1] - self._best_steps[0] <= 8:
            self._churn_warned = True
            log.warning(
                "ckptd: job %s: best_metric %r improved and saved at 5 of the last %d steps; pass "
                "evaluation metrics with ckpt.report(...) instead of step(metrics=...), or set min_interval",
                self.job,
                self.best_key,
                self._best_steps[-1] - self._best_steps[0] + 1,
            )

"""When a save is due: one pure module shared by the hook, the daemon and ``ckptd plan``.

Everything here is plain data in, a decision out. The current time is an argument,
never read here, and every decision names the rule that made it, so ``ckptd plan``,
the hook and the daemon cannot disagree and a user can always ask "why did (or
didn't) it save at step 1578?".

Step numbering follows HF's ``global_step``: step ``s`` means ``s`` optimizer steps
are complete. ``every_steps`` fires on a grid anchored at 0 (``s % interval == 0``), so
step saves line up with retention milestones. Rules given in fractions of an epoch
(``saves_per_epoch``, ``every_epochs``) fire at the k-th multiple of the exact fraction,
rounded *down* (``floor(k * steps_per_epoch / saves_per_epoch)``): each epoch's fractions
are anchored to its start, so the end of an epoch is a save point (789 and 1578 for two
epochs of 789 with ``saves_per_epoch=2``), no save is ever past the point it stands for,
and rounding never accumulates. Rounding up is how a 1578-step run ended with no
checkpoint after step 1185 (SPEC §1.1). The final step is its own rule, so an interval
longer than the run still ends with a save (SPEC §1.2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Mapping

from ckptd.core.vocab import NEVER


class PolicyError(ValueError):
    """A policy that cannot work, named by its key."""


@dataclass(frozen=True)
class SavePolicy:
    """The save-decision keys of SPEC §4; durations are seconds."""

    every_steps: int | None = None
    saves_per_epoch: int | None = None
    steps_per_epoch: int | None = None
    every_epochs: float | None = None
    every: float | None = None
    cron: str | None = None
    auto: bool = False  # every="auto": the interval comes from ``ckptd.core.autointerval``
    mtbf: float | None = None
    max_overhead: float = 0.02
    start_after: int = 0
    total_steps: int | None = None
    save_final: bool = True
    on_preempt: bool = True
    best_metric: str | None = None
    best_mode: str = "min"
    min_interval: float = 0.0
    on_busy: str = "wait"

    def __post_init__(self) -> None:
        if (self.saves_per_epoch or self.every_epochs) and not self.steps_per_epoch:
            key = "saves_per_epoch" if self.saves_per_epoch else "every_epochs"
            raise PolicyError(f"{key} needs steps_per_epoch (how many optimizer steps make an epoch)")
        if self.best_mode not in ("min", "max"):
            raise PolicyError(f"best_mode must be 'min' or 'max', got {self.best_mode!r}")
        if self.every is not None and self.every <= 0:
            raise PolicyError("every must be a positive duration")
        if not 0 < self.max_overhead < 1:
            raise PolicyError(f"max_overhead must be a fraction between 0 and 1, got {self.max_overhead!r}")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "SavePolicy":
        names = cls.__dataclass_fields__
        values = {k: v for k, v in settings.items() if k in names and v is not None}
        if values.get("every") == "auto":
            values.update(every=None, auto=True)
        return cls(**values)

    def step_rules(self) -> tuple[tuple[str, int], ...]:
        """(rule, interval in steps, rounded down) for every configured step trigger."""
        return tuple((rule, max(1, math.floor(exact))) for rule, exact in self.exact_step_rules())

    def exact_step_rules(self) -> tuple[tuple[str, Fraction], ...]:
        """(rule, exact interval in steps): the k-th save of a rule is at ``floor(k * interval)``."""
        rules: list[tuple[str, Fraction]] = []
        if self.every_steps:
            rules.append(("every_steps", Fraction(self.every_steps)))
        if self.saves_per_epoch and self.steps_per_epoch:
            rules.append(("saves_per_epoch", max(Fraction(1), Fraction(self.steps_per_epoch, self.saves_per_epoch))))
        if self.every_epochs and self.steps_per_epoch:
            exact = Fraction(str(self.every_epochs)) * self.steps_per_epoch
            rules.append(("every_epochs", max(Fraction(1), exact)))
        return tuple(rules)

    @property
    def has_time_rules(self) -> bool:
        return self.every is not None or self.cron is not None or self.auto


@dataclass(frozen=True)
class Decision:
    """Whether to save now, as what (trigger), and which rule said so."""

    save: bool
    trigger: str = ""
    rule: str = ""
    reason: str = ""


NO_SAVE = Decision(False)


@dataclass(frozen=True)
class Progress:
    """What the run has done so far; all the state ``decide`` needs."""

    step: int
    last_saved_step: int = 0
    last_scheduled_save_at: float | None = None
    time_due: str | None = None  # "every" or "cron" once a time trigger has fired
    preempt: bool = False
    metric: float | None = None
    best: float | None = None  # best metric among saved checkpoints
    best_due: bool | None = None  # sharded runs: the ranks' agreed "metric improved" (None: judge ``metric``)


def next_scheduled_step(policy: SavePolicy, after: int) -> tuple[int, str] | None:
    """The first step > ``after`` where a step rule fires (start_after and total_steps applied)."""
    lo = max(after + 1, policy.start_after, 1)
    best: tuple[int, str] | None = None
    for rule, interval in policy.exact_step_rules():
        s = math.floor(math.ceil(lo / interval) * interval)  # the first floor(k * interval) >= lo
        if policy.total_steps is not None and s > policy.total_steps:
            continue
        if best is None or s < best[0]:
            best = (s, rule)
    return best


def next_due_step(policy: SavePolicy, after: int) -> int:
    """The step at which the hook must next leave its fast path (step rules or the final)."""
    candidates = [math.inf]
    nxt = next_scheduled_step(policy, after)
    if nxt:
        candidates.append(nxt[0])
    if policy.save_final and policy.total_steps is not None and after < policy.total_steps:
        candidates.append(policy.total_steps)
    return int(min(candidates)) if min(candidates) != math.inf else NEVER


def improves(policy: SavePolicy, metric: float | None, best: float | None) -> bool:
    """Strictly better than the best saved so far (NaN never is)."""
    if metric is None or metric != metric:
        return False
    if best is None:
        return True
    return metric < best if policy.best_mode == "min" else metric > best


def decide(policy: SavePolicy, p: Progress, now: float) -> Decision:
    """Save now? Preemption first, then the final step, then scheduled rules.

    Scheduled saves (step, time, best) are held back before ``start_after`` and
    within ``min_interval`` of the previous scheduled save; a held-back step or time
    save stays due and fires as soon as it is allowed, so a gate delays a save but
    never loses one.
    """
    if p.preempt and policy.on_preempt:
        return Decision(True, "preempt", "on_preempt")
    if (
        policy.save_final
        and policy.total_steps is not None
        and p.step >= policy.total_steps
        and p.last_saved_step < p.step
    ):
        return Decision(True, "final", "save_final")
    wanted = _scheduled(policy, p)
    if not wanted.save:
        return wanted
    if p.step < policy.start_after:
        return Decision(False, "", "start_after", f"step {p.step} is before start_after={policy.start_after}")
    if (
        policy.min_interval
        and p.last_scheduled_save_at is not None
        and now - p.last_scheduled_save_at < policy.min_interval
    ):
        return Decision(
            False,
            "",
            "min_interval",
            f"{now - p.last_scheduled_save_at:.1f}s since the last save, min_interval={policy.min_interval:g}s",
        )
    if policy.save_final and policy.total_steps is not None and p.step >= policy.total_steps:
        # the run's last state: a best save here (an evaluation after the last step) is the final one too
        return Decision(True, "final", wanted.rule)
    return wanted


def _scheduled(policy: SavePolicy, p: Progress) -> Decision:
    nxt = next_scheduled_step(policy, p.last_saved_step)
    if nxt is not None and nxt[0] <= p.step:
        return Decision(True, "step", nxt[1])
    if p.time_due and p.step > p.last_saved_step:
        return Decision(True, "time", p.time_due)
    if policy.best_metric and (improves(policy, p.metric, p.best) if p.best_due is None else p.best_due):
        return Decision(True, "best", "best_metric")
    return NO_SAVE


def next_time_due(policy: SavePolicy, last_save_at: float, auto_seconds: float | None = None) -> float | None:
    """When the ``every`` rule next fires: that long after the last save (or run start).
    With ``every="auto"`` the interval is ``auto_seconds`` (``ckptd.core.autointerval``)."""
    interval = time_interval(policy, auto_seconds)
    return None if interval is None else last_save_at + interval


def time_interval(policy: SavePolicy, auto_seconds: float | None = None) -> float | None:
    """The ``every`` interval in seconds: the fixed one, or auto's current one."""
    if policy.auto:
        return auto_seconds
    return policy.every


# --- planning ---------------------------------------------------------------


@dataclass(frozen=True)
class PlannedSave:
    step: int
    trigger: str
    rule: str


@dataclass(frozen=True)
class Plan:
    saves: tuple[PlannedSave, ...]
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def steps(self) -> list[int]:
        return [s.step for s in self.saves]


MAX_PLANNED = 1_000_000


def plan(policy: SavePolicy, total_steps: int | None = None) -> Plan:
    """The step-triggered saves of a whole run, by walking ``next_scheduled_step``.

    Uses the same function ``decide`` uses, so the plan is what the hook will do when
    no time, best-metric, preemption or ``min_interval`` gate intervenes. Time and
    best-metric saves depend on the run and are reported as a note, not planned.
    """
    total = total_steps if total_steps is not None else policy.total_steps
    if total is None:
        raise PolicyError("plan needs total_steps")
    if total != policy.total_steps:
        policy = SavePolicy(**{**policy.__dict__, "total_steps": total})
    saves: list[PlannedSave] = []
    nxt = next_scheduled_step(policy, 0)
    while nxt is not None and len(saves) < MAX_PLANNED:
        step, rule = nxt
        if step == total and policy.save_final:
            break
        saves.append(PlannedSave(step, "step", rule))
        nxt = next_scheduled_step(policy, step)
    if policy.save_final:
        saves.append(PlannedSave(total, "final", "save_final"))
    return Plan(tuple(saves), tuple(plan_warnings(policy, total, saves)))


def longer_than_run(policy: SavePolicy, total: int) -> list[str]:
    """Step rules that never fire in a run of ``total`` steps, when nothing else saves before its end
    (a time rule does: then the warning would be false). The hook says these at construction."""
    if policy.has_time_rules:
        return []
    return [
        f"{rule} gives an interval of {interval} steps, longer than the run ({total} steps): only the "
        f"final save will happen"
        for rule, interval in policy.step_rules()
        if interval > total
    ]


def plan_warnings(policy: SavePolicy, total: int, saves: list[PlannedSave]) -> list[str]:
    """Schedules that will surprise someone, said plainly."""
    out = longer_than_run(policy, total)
    scheduled = [s for s in saves if s.trigger == "step"]
    if scheduled and scheduled[0].step > 0.9 * total:
        out.append(f"the first scheduled save is at step {scheduled[0].step}, after 90% of the run")
    if not policy.step_rules() and not policy.has_time_rules and not policy.best_metric:
        out.append("no save rule is configured: only the final save will happen")
    if not policy.save_final:
        out.append("save_final is off: the end of the run may not be saved")
    if len(saves) > 1000:
        out.append(f"{len(saves)} saves planned (more than 1000): is the interval what you meant?")
    if policy.has_time_rules:
        out.append("time-based saves (every/cron) happen in addition and depend on step speed")
    return out

"""Which checkpoints to keep, and which rule keeps each: a pure function over plain data.

Like restic's ``forget`` and borg's ``prune``, a checkpoint is kept if *any* rule
keeps it, and every verdict names its rules ("keep_last #2", "keep_daily #3"), so
``ckptd gc --dry-run`` can say exactly why each file stays or goes. Time is an
argument. Guarantees (property-tested):

- the newest verified checkpoint is never deleted, whatever the rules;
- pinned and in-flight checkpoints are never deleted, nor are checkpoints that have
  not been judged yet (unverified is not corrupt);
- corrupt checkpoints and abandoned partial files always go;
- with no keep rule configured at all, nothing verified is deleted;
- the result does not depend on the order of the input.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

# Rules that only express "a window of recent history"; quota may override them.
WINDOW_RULES = ("keep_last", "keep_every_steps", "keep_hourly", "keep_daily", "keep_within")
PROTECTED = ("in_flight", "unverified", "newest_verified", "pinned", "keep_best", "keep_final")


@dataclass(frozen=True)
class Item:
    """One checkpoint as retention sees it."""

    id: str
    step: int
    created: float
    bytes: int = 0
    verified: bool = True
    corrupt: bool = False
    partial: bool = False
    in_flight: bool = False
    pinned: bool = False
    final: bool = False
    metric: float | None = None


@dataclass(frozen=True)
class Rules:
    keep_last: int | None = None
    keep_best: int | None = None
    best_metric: str | None = None
    best_mode: str = "min"
    keep_every_steps: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_within: float | None = None
    keep_final: bool = True

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "Rules":
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in settings.items() if k in names and v is not None})

    @property
    def any_window(self) -> bool:
        return any(getattr(self, r) is not None for r in WINDOW_RULES) or bool(self.keep_best)


@dataclass(frozen=True)
class Verdict:
    item: Item
    keep: bool
    reasons: tuple[str, ...] = field(default_factory=tuple)

    @property
    def rule(self) -> str:
        return self.reasons[0] if self.reasons else ("keep" if self.keep else "no rule keeps it")

    @property
    def protected(self) -> bool:
        """Kept by a rule that quota must respect too."""
        return any(r.split(" ")[0] in PROTECTED for r in self.reasons)


def _order(items: Iterable[Item]) -> list[Item]:
    """Newest first: by step, then creation time, then id (total order, input-independent)."""
    return sorted(items, key=lambda i: (i.step, i.created, i.id), reverse=True)


def plan(items: Sequence[Item], rules: Rules, now: float) -> list[Verdict]:
    """A verdict for every item, newest first."""
    ordered = _order(items)
    reasons: dict[str, list[str]] = {i.id: [] for i in ordered}
    good = [i for i in ordered if i.verified and not i.corrupt and not i.partial and not i.in_flight]
    for i in ordered:
        if i.in_flight:
            reasons[i.id].append("in_flight")
        elif i.corrupt or i.partial:
            continue
        elif not i.verified:
            reasons[i.id].append("unverified")
    if good:
        reasons[good[0].id].append("newest_verified")
    for i in good:
        if i.pinned:
            reasons[i.id].append("pinned")
        if i.final and rules.keep_final:
            reasons[i.id].append("keep_final")
    _rank(reasons, "keep_best", _best(good, rules))
    _rank(reasons, "keep_last", good[: rules.keep_last or 0])
    if rules.keep_every_steps:
        for i in good:
            if i.step % rules.keep_every_steps == 0:
                reasons[i.id].append("keep_every_steps")
    if rules.keep_within is not None:
        for i in good:
            if i.created >= now - rules.keep_within:
                reasons[i.id].append("keep_within")
    _rank(reasons, "keep_hourly", _buckets(good, rules.keep_hourly, lambda t: math.floor(t / 3600)))
    _rank(reasons, "keep_daily", _buckets(good, rules.keep_daily, _utc_day))
    if not rules.any_window:
        for i in good:
            reasons[i.id].append("no_retention_rules")
    return [Verdict(i, bool(reasons[i.id]), tuple(reasons[i.id]) if reasons[i.id] else (_why_delete(i),))
            for i in ordered]


def _why_delete(i: Item) -> str:
    return "corrupt" if i.corrupt else "partial" if i.partial else "no rule keeps it"


def _rank(reasons: dict[str, list[str]], rule: str, chosen: Iterable[Item]) -> None:
    for n, i in enumerate(chosen, start=1):
        reasons[i.id].append(f"{rule} #{n}")


def _best(good: list[Item], rules: Rules) -> list[Item]:
    if not rules.keep_best:
        return []
    scored = [i for i in good if i.metric is not None and i.metric == i.metric]
    sign = 1 if rules.best_mode == "min" else -1
    scored.sort(key=lambda i: (sign * (i.metric or 0.0), -i.step, -i.created, i.id))
    return scored[: rules.keep_best]


def _utc_day(t: float) -> int:
    return math.floor(t / 86400)


def _buckets(good: list[Item], n: int | None, bucket: Callable[[float], int]) -> list[Item]:
    """restic-style: walking newest to oldest, the newest item of each of the first n buckets."""
    if not n:
        return []
    chosen: list[Item] = []
    last: int | None = None
    for i in sorted(good, key=lambda i: (i.created, i.step, i.id), reverse=True):
        b = bucket(i.created)
        if b != last:
            chosen.append(i)
            last = b
            if len(chosen) == n:
                break
    return chosen


def to_delete(verdicts: Sequence[Verdict]) -> list[Item]:
    return [v.item for v in verdicts if not v.keep]


def now() -> float:
    """The wall clock, read at the edge (callers pass it into ``plan``)."""
    return time.time()

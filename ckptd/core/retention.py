"""Which checkpoints to keep, and which rule keeps each: a pure function over plain data.

Like restic's ``forget`` and borg's ``prune``, a checkpoint is kept if *any* rule
keeps it, and every verdict names its rules ("keep_last #2", "keep_daily #3"), so
``ckptd gc --dry-run`` can say exactly why each file stays or goes. Time is an
argument. Guarantees (property-tested):

- the newest verified checkpoint is never deleted, whatever the rules; one that refers to a
  holder that is not itself verified does not count as verified;
- pinned and in-flight checkpoints are never deleted, nor are checkpoints that have
  not been judged yet (unverified is not corrupt);
- corrupt checkpoints and abandoned partial files always go;
- with no keep rule configured at all, nothing verified is deleted;
- the result does not depend on the order of the input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from ckptd.core.vocab import PROTECTED, WINDOW_RULES, Reason, Rule, Trigger

__all__ = ["Item", "Removal", "Rules", "Verdict", "carry_out", "item_of", "judge", "to_delete", "verdict_row"]


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
    remote_pending: bool = False  # a remote tier is set and this one is not verified there yet
    refs: tuple[str, ...] = ()  # ids of the items holding tensors this one refers to instead of storing (§13)


def item_of(
    id: str,
    step: int,
    created: float,
    nbytes: int,
    *,
    trigger: str = "",
    metrics: Mapping[str, Any] | None = None,
    best_metric: str | None = None,
    refs: tuple[str, ...] = (),
    **state: bool,
) -> Item:
    """The one way a tree (local, watched, remote) describes a checkpoint to retention: the
    final flag from its trigger, the metric ``keep_best`` ranks by, and its state flags."""
    value = (metrics or {}).get(best_metric) if best_metric else None
    metric = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return Item(id, step, created, nbytes, final=trigger == Trigger.FINAL, metric=metric, refs=refs, **state)


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
    reasons: tuple[Reason, ...] = field(default_factory=tuple)

    @property
    def rule(self) -> Reason:
        """The first rule that decided (what a log line or a metric names)."""
        return self.reasons[0] if self.reasons else Reason(Rule.NO_RULE)

    @property
    def protected(self) -> bool:
        """Kept by a rule that quota must respect too."""
        return any(r.rule in PROTECTED for r in self.reasons)


def _order(items: Iterable[Item]) -> list[Item]:
    """Newest first: by step, then creation time, then id (total order, input-independent)."""
    return sorted(items, key=lambda i: (i.step, i.created, i.id), reverse=True)


def judge(items: Sequence[Item], rules: Rules, now: float) -> list[Verdict]:
    """A verdict for every item, newest first. The rules apply in a fixed order, which is the
    order of the reasons a verdict lists: what is unfinished, the newest verified one, what the
    user protected, the windows, then what a kept checkpoint refers to."""
    ordered = _order(items)
    reasons: dict[str, list[Reason]] = {i.id: [] for i in ordered}
    good = _complete([i for i in ordered if i.verified and not i.corrupt and not i.partial and not i.in_flight])
    _hold_unfinished(ordered, {i.id for i in good}, reasons)
    if good:
        reasons[good[0].id].append(Reason(Rule.NEWEST_VERIFIED))
    _protect(good, rules, reasons)
    _windows(good, rules, now, reasons)
    _keep_referenced(ordered, reasons)
    return [
        Verdict(i, bool(reasons[i.id]), tuple(reasons[i.id]) if reasons[i.id] else (_why_delete(i),)) for i in ordered
    ]


def _hold_unfinished(ordered: list[Item], good: set[str], reasons: dict[str, list[Reason]]) -> None:
    """A save still in flight, and one not (or not completely) verified, is never deleted by a rule:
    it may yet verify. Corrupt and partial ones get no reason, so they go."""
    for i in ordered:
        if i.in_flight:
            reasons[i.id].append(Reason(Rule.IN_FLIGHT))
        elif i.corrupt or i.partial:
            continue
        elif not i.verified or i.id not in good:
            reasons[i.id].append(Reason(Rule.UNVERIFIED))


def _protect(good: list[Item], rules: Rules, reasons: dict[str, list[Reason]]) -> None:
    """What the user or the remote tier protected: pinned, not yet uploaded, the final save."""
    for i in good:
        if i.pinned:
            reasons[i.id].append(Reason(Rule.PINNED))
        if i.remote_pending:
            reasons[i.id].append(Reason(Rule.REMOTE_PENDING))
        if i.final and rules.keep_final:
            reasons[i.id].append(Reason(Rule.KEEP_FINAL))


def _windows(good: list[Item], rules: Rules, now: float, reasons: dict[str, list[Reason]]) -> None:
    """The retention windows over the verified items (restic's forget, in this order)."""
    _rank(reasons, Rule.KEEP_BEST, _best(good, rules))
    _rank(reasons, Rule.KEEP_LAST, good[: rules.keep_last or 0])
    if rules.keep_every_steps:
        _mark(reasons, Rule.KEEP_EVERY_STEPS, [i for i in good if i.step % rules.keep_every_steps == 0])
    if rules.keep_within is not None:
        _mark(reasons, Rule.KEEP_WITHIN, [i for i in good if i.created >= now - rules.keep_within])
    _rank(reasons, Rule.KEEP_HOURLY, _buckets(good, rules.keep_hourly, lambda t: math.floor(t / 3600)))
    _rank(reasons, Rule.KEEP_DAILY, _buckets(good, rules.keep_daily, _utc_day))
    if not rules.any_window:
        _mark(reasons, Rule.NO_RETENTION_RULES, good)


def _complete(good: list[Item]) -> list[Item]:
    """The good items whose holders are good too, transitively: one that refers to a holder that is
    gone, corrupt, partial or itself incomplete is not verified (SPEC §13: complete only when every
    tensor it references is present and verified), so it is never the newest verified one."""
    while True:
        ids = {i.id for i in good}
        kept = [i for i in good if all(h in ids for h in i.refs)]
        if len(kept) == len(good):
            return kept
        good = kept


def _keep_referenced(ordered: list[Item], reasons: dict[str, list[Reason]]) -> None:
    """A kept checkpoint's references keep what they point to ("referenced by step N"), until
    nothing changes: deleting a holder would leave a kept checkpoint incomplete."""
    changed = True
    while changed:
        changed = False
        for i in ordered:  # newest first: a holder names the newest checkpoint that needs it
            if not reasons[i.id] or i.corrupt or i.partial:
                continue
            for h in i.refs:
                if h in reasons and not any(r.rule == Rule.REFERENCED for r in reasons[h]):
                    reasons[h].append(Reason(Rule.REFERENCED, i.step))
                    changed = True


def _why_delete(i: Item) -> Reason:
    return Reason(Rule.CORRUPT if i.corrupt else Rule.PARTIAL if i.partial else Rule.NO_RULE)


def _rank(reasons: dict[str, list[Reason]], rule: Rule, chosen: Iterable[Item]) -> None:
    """Each chosen item kept by ``rule``, with its rank in the window (best #1, last #2, ...)."""
    for n, i in enumerate(chosen, start=1):
        reasons[i.id].append(Reason(rule, n))


def _mark(reasons: dict[str, list[Reason]], rule: Rule, chosen: Iterable[Item]) -> None:
    """Each chosen item kept by ``rule``, which has no ranks."""
    for i in chosen:
        reasons[i.id].append(Reason(rule))


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


@dataclass(frozen=True)
class Removal:
    """What became of one deletion a verdict asked for."""

    verdict: Verdict
    done: bool
    error: str = ""


def carry_out(
    verdicts: Sequence[Verdict],
    delete: Callable[[Item], None],
    dry_run: bool = False,
    skip: Callable[[Item], bool] = lambda item: False,
) -> list[Removal]:
    """The one place the verdicts' deletions are applied, whatever the tree: ``delete`` is its edge
    (a local unlink through a directory fd, a quarantine move, a store's commit-then-data
    deletion). A failure is reported in its ``Removal``, never raised: one file that cannot go
    must not stop retention from judging the rest. ``skip``: looked again, and no longer doomed."""
    out = []
    for v in verdicts:
        if v.keep:
            continue
        if dry_run:
            out.append(Removal(v, False))
            continue
        if skip(v.item):
            continue
        try:
            delete(v.item)
            out.append(Removal(v, True))
        except Exception as exc:  # the edge's own error type (RemovalError, RemoteError, OSError)
            out.append(Removal(v, False, str(exc)))
    return out


def to_delete(verdicts: Sequence[Verdict]) -> list[Item]:
    return [v.item for v in verdicts if not v.keep]


def verdict_row(
    v: Verdict, job: str | None, *, directory: str | None = None, error: str | None = None
) -> dict[str, Any]:
    """One verdict as ``ckptd gc`` reports it (its ``--json`` rows, the daemon's reply to a gc):
    one shape wherever retention is judged. ``directory`` (the daemon's, which serves several) and
    ``error`` (what a deletion met) appear only when given."""
    row: dict[str, Any] = {"job": job}
    if directory is not None:
        row["directory"] = directory
    row.update(path=v.item.id, step=v.item.step, keep=v.keep, reasons=list(v.reasons))
    if error is not None:
        row["error"] = error
    return row

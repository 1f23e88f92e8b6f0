"""The words ckptd decides and reports in: triggers, reasons, rules, outcomes.

Every one of them is also a label value of a metric (SPEC §8) or a field of a reply,
so they are closed sets: a client cannot grow a series by inventing a reason, and no
module recovers a reason by parsing a sentence. ``StrEnum`` members compare equal to
their text, so JSON, SQLite rows and Prometheus labels carry the plain words.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

__all__ = [
    "NEVER",
    "DeleteRule",
    "FailReason",
    "MissedReason",
    "Outcome",
    "Problem",
    "Reason",
    "Rule",
    "Trigger",
    "PROTECTED",
    "WINDOW_RULES",
    "delete_label",
]

NEVER = 2**62  # a step that is never reached: "no step rule is due"
E = TypeVar("E", bound=StrEnum)


def _member(enum: type[E], text: object, default: E) -> E:
    """The member named ``text`` by a client, or ``default``: label values stay a closed set."""
    return enum(text) if isinstance(text, str) and text in enum._value2member_map_ else default


class Trigger(StrEnum):
    """Why a save was taken (``ckptd_saves_total{trigger}``)."""

    STEP = "step"
    TIME = "time"
    BEST = "best"
    FINAL = "final"
    PREEMPT = "preempt"
    MANUAL = "manual"
    WATCH = "watch"
    MEMORY = "memory"  # a save that only refreshes the daemon's memory tier (every_memory, SPEC §14)

    @classmethod
    def of(cls, text: object) -> "Trigger":
        """A trigger named by a client; anything unknown counts as manual (bounded labels)."""
        return _member(cls, text, cls.MANUAL)


class FailReason(StrEnum):
    """Why a save failed (``ckptd_save_failures_total{reason}``)."""

    NO_SPACE = "no_space"
    READ_ONLY = "read_only"
    PERMISSION = "permission"
    TARGET_MISSING = "target_missing"
    IO_ERROR = "io_error"
    VERIFY_FAILED = "verify_failed"
    INVALID_SNAPSHOT = "invalid_snapshot"
    INTERNAL_ERROR = "internal_error"
    INVALID_TARGET = "invalid_target"
    UNCOMMITTED = "uncommitted"  # a sharded save whose ranks did not all verify

    @classmethod
    def of(cls, text: object) -> "FailReason":
        """A reason reported by a client; anything unknown is an internal error (bounded labels)."""
        return _member(cls, text, cls.INTERNAL_ERROR)


class MissedReason(StrEnum):
    """Why a save that should have happened did not (``ckptd_missed_saves_total{reason}``)."""

    STEP_SKIPPED = "step_skipped"
    TIME_OVERDUE = "time_overdue"
    FINAL_MISSING = "final_missing"
    TRAINER_EXIT_UNSAVED = "trainer_exit_unsaved"
    BACKPRESSURE = "backpressure"


class Outcome(StrEnum):
    """The result of verifying one checkpoint (``ckptd_verify_total{outcome}``)."""

    OK = "ok"
    CORRUPT = "corrupt"
    UNSAFE = "unsafe"  # a pickle that would need code execution: never loaded, never deleted by rules


class Problem(StrEnum):
    """Why a checkpoint found on disk is not a good one (beside the reader's own message)."""

    NONE = ""
    UNREADABLE = "unreadable"  # its header (or manifest) does not parse
    ABANDONED = "abandoned"  # a sharded unit without manifest, and a later save committed


class Rule(StrEnum):
    """The retention rule behind a keep or delete verdict (borg's "keep_daily #3")."""

    IN_FLIGHT = "in_flight"
    UNVERIFIED = "unverified"
    NEWEST_VERIFIED = "newest_verified"
    PINNED = "pinned"
    KEEP_FINAL = "keep_final"
    KEEP_BEST = "keep_best"
    KEEP_LAST = "keep_last"
    KEEP_EVERY_STEPS = "keep_every_steps"
    KEEP_WITHIN = "keep_within"
    KEEP_HOURLY = "keep_hourly"
    KEEP_DAILY = "keep_daily"
    NO_RETENTION_RULES = "no_retention_rules"
    REMOTE_PENDING = "remote_pending"  # not yet verified on the remote tier: retention waits, quota may not
    REFERENCED = "referenced"  # holds tensors a kept checkpoint refers to instead of storing them again (§13)
    # delete verdicts
    NO_RULE = "no rule keeps it"
    CORRUPT = "corrupt"
    PARTIAL = "partial"
    QUOTA = "quota"


# Rules that quota must respect too; the rest only express "a window of recent history".
PROTECTED = frozenset(
    {
        Rule.IN_FLIGHT,
        Rule.UNVERIFIED,
        Rule.NEWEST_VERIFIED,
        Rule.PINNED,
        Rule.KEEP_BEST,
        Rule.KEEP_FINAL,
        Rule.REFERENCED,
    }
)
WINDOW_RULES = ("keep_last", "keep_every_steps", "keep_hourly", "keep_daily", "keep_within")


class Reason(str):
    """One rule's verdict on one checkpoint, ranked where the rule ranks ("keep_last #2").

    A ``str`` for what prints and serialises it, with the typed ``rule`` and ``rank``
    for what decides on it: nothing splits the text to find the rule.
    """

    rule: Rule
    rank: int | None

    def __new__(cls, rule: Rule, rank: int | None = None) -> "Reason":
        """``rank``: where the rule ranks it; for ``referenced``, the step of the checkpoint that refers to it."""
        text = rule.value if rank is None else f"{rule.value} #{rank}"
        if rule == Rule.REFERENCED and rank is not None:
            text = f"{rule.value} by step {rank}"
        obj = super().__new__(cls, text)
        obj.rule, obj.rank = rule, rank
        return obj

    def __reduce__(self) -> tuple[type["Reason"], tuple[Rule, int | None]]:
        return (Reason, (self.rule, self.rank))


class DeleteRule(StrEnum):
    """The ``rule`` label of ``ckptd_deleted_total``."""

    RETENTION = "retention"
    CORRUPT = "corrupt"
    PARTIAL = "partial"
    QUOTA = "quota"


def delete_label(reason: Reason) -> DeleteRule:
    """A delete verdict's metric label: every window rule's "no" is ``retention``."""
    return DeleteRule(reason.rule.value) if reason.rule.value in DeleteRule._value2member_map_ else DeleteRule.RETENTION

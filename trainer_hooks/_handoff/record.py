"""What became of a Checkpointer's saves: counters, one record per save, the last outcome.

Written by the persist side (the worker thread, or the link's reader when the daemon
replies) and read by the training thread and by tests: plain counters and appends, each
a single bytecode-level operation, so no lock is needed for what they are used for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ckptd.core.retention import Removal
from ckptd.disk.persist import Persisted, PersistError
from trainer_hooks._handoff.worker import StagedSave

log = logging.getLogger(__name__)


def _counters() -> dict[str, int]:
    return {"saves": 0, "verified": 0, "failed": 0, "skipped": 0, "stall_ns": 0, "deleted": 0, "memory": 0}


@dataclass
class SaveRecord:
    stats: dict[str, int] = field(default_factory=_counters)
    saved: list[dict[str, Any]] = field(default_factory=list)
    last_verified: str | None = None  # the path of the newest save that verified
    last_verified_step: int = -1
    last_error: PersistError | None = None

    def persisted(self, staged: StagedSave, result: Persisted | None, error: PersistError | None) -> None:
        """One save's outcome, said in the log: verified, or failed with its reason (training goes on)."""
        if result is not None:
            self.stats["verified"] += 1
            self.last_verified = result.path
            self.last_verified_step = max(self.last_verified_step, staged.step)
            self.saved.append({"path": result.path, "step": staged.step, "trigger": staged.trigger, "ok": True})
            log.info("ckptd: step %d saved and verified: %s (%s)", staged.step, result.path, staged.trigger)
            return
        assert error is not None
        self.stats["failed"] += 1
        self.last_error = error
        self.saved.append(
            {
                "path": None,
                "step": staged.step,
                "trigger": staged.trigger,
                "ok": False,
                "reason": error.reason,
                "error": str(error),
            }
        )
        log.error("ckptd: save of step %d failed (%s): %s; training continues", staged.step, error.reason, error)

    def ended(self, job: str, step: int) -> None:
        """The run ended: if its final step is not verified, its last line says so (exit 0 or not)."""
        if self.last_verified_step != step:
            why = f"{self.last_error.reason}: {self.last_error}" if self.last_error else "not verified"
            log.error(
                "ckptd: job %s: the final save of step %d FAILED (%s); the newest verified checkpoint is step %d",
                job,
                step,
                why,
                self.last_verified_step,
            )

    def failed_early(self, step: int, exc: Exception) -> None:
        """A save that failed before it was handed over (composing or copying its snapshot)."""
        self.stats["failed"] += 1
        log.error("ckptd: save at step %d failed before it reached the disk: %s", step, exc)

    def skipped(self, trigger: str, step: int) -> None:
        self.stats["skipped"] += 1
        log.warning(
            "ckptd: %s save at step %d skipped: the previous save is still being written (missed, reason=backpressure)",
            trigger,
            step,
        )

    def removed(self, removals: list[Removal]) -> None:
        for r in removals:
            if r.done:
                self.stats["deleted"] += 1
                log.info("ckptd: deleted %s (%s)", r.verdict.item.id, r.verdict.rule)
            else:
                log.error("ckptd: %s", r.error)

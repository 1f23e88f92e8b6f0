"""Missed-save detection: pure rules over what the daemon has seen of a run.

Each returns whether (and why) a save that should have happened did not, so the
daemon only counts and logs. Reasons are the ``reason`` label of
``ckptd_missed_saves_total``.
"""

from __future__ import annotations

from ckptd.core.policy import SavePolicy, next_scheduled_step, time_interval


def skipped_step(policy: SavePolicy, last_saved_step: int, reported_step: int, flagged: int) -> int | None:
    """A due step the trainer has gone past with no save sent for it (``step_skipped``).

    The hook sends a save before ``step()`` returns, so by the time a heartbeat
    reports a later step, the save must have arrived. ``min_interval`` legitimately
    defers saves, so it disables this check. ``flagged`` is the last due step already
    reported, so each is counted once.
    """
    if policy.min_interval:
        return None
    due = next_scheduled_step(policy, max(last_saved_step, flagged))
    if due is not None and due[0] < reported_step:
        return due[0]
    return None


def resumed_from(hello_step: int, saved_steps: list[int]) -> int:
    """The step a (re)connecting run's due steps count from: the newest saved step of the job
    (a resumed run, after a crash or a preemption save, has those) or the step it says it is at.

    The hook says hello before ``resume()`` loads a checkpoint, at step 0; counting from 0 would
    report every grid step already saved as ``step_skipped`` until the first new save.
    """
    return max([hello_step, *saved_steps])


def time_overdue(expected_interval: float | None, last_success_at: float, now: float, grace: float) -> bool:
    """No verified save within the expected interval plus a grace period (``time_overdue``)."""
    return expected_interval is not None and now - last_success_at > expected_interval + grace


def final_missing(policy: SavePolicy, end_step: int, last_verified_step: int) -> bool:
    """The run ended and its last step has no verified checkpoint (``final_missing``)."""
    return policy.save_final and end_step > 0 and last_verified_step != end_step


def unsaved_at_exit(step: int, last_verified_step: int) -> int:
    """Steps lost if the trainer vanished now (``trainer_exit_unsaved`` when > 0)."""
    return max(0, step - last_verified_step)


def expected_loss(last_verified_at: float | None, started_at: float, now: float) -> float:
    """Training seconds lost if the job died now: since the newest verified save, or since
    this run started (what came before it is in that save)."""
    return max(0.0, now - max(last_verified_at or started_at, started_at))


def expected_interval(
    policy: SavePolicy, seconds_per_step: float | None, auto_seconds: float | None = None
) -> float | None:
    """Seconds between saves the policy implies: ``every`` (auto's current interval with
    ``every="auto"``), or step interval × step time."""
    candidates = []
    every = time_interval(policy, auto_seconds)
    if every:
        candidates.append(every)
    steps = [k for _, k in policy.step_rules()]
    if steps and seconds_per_step:
        candidates.append(min(steps) * seconds_per_step)
    return min(candidates) if candidates else None

"""The daemon's view of one job: the step time a step rule's expected interval is made of
(``ckptd_expected_save_interval_seconds``, which CkptdCheckpointStale compares with)."""

from __future__ import annotations

import pytest

from ckptd.core.policy import SavePolicy
from ckptd.core.settings import Settings
from ckptd.daemon.jobstate import JobState


def _job() -> JobState:
    return JobState(
        "j", 1000, "/tmp/j", Settings(), SavePolicy.from_settings({"every_steps": 20}), connected=True, started_at=0.0
    )


def test_two_saves_before_any_heartbeat_give_the_interval() -> None:
    # a fast trainer saves at 20 and 40 within its first second, then hangs: no heartbeat came
    j = _job()
    assert "ckptd_expected_save_interval_seconds" not in j.gauges(1.0, 0.0)
    j.observe(20, 10.0)
    j.observe(40, 10.5)
    assert j.seconds_per_step == pytest.approx(0.025)
    assert j.gauges(11.0, 0.0)["ckptd_expected_save_interval_seconds"] == pytest.approx(0.5)
    assert j.step == 40


def test_a_slow_step_is_timed_from_when_it_was_first_seen() -> None:
    # the heartbeat and the save of one step, a second apart, do not make a 10 s step look like 1 s
    j = _job()
    j.observe(1, 0.0)
    j.observe(1, 9.0)
    j.observe(2, 10.0)
    assert j.seconds_per_step == pytest.approx(10.0)
    j.observe(1, 11.0)  # an older step reported late changes nothing
    assert j.step == 2 and j.last_beat == (10.0, 2)

"""The save policy: SPEC §1 regressions by name, and properties over random schedules."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptd.core.policy import (
    Decision,
    PolicyError,
    Progress,
    SavePolicy,
    decide,
    next_due_step,
    plan,
)
from ckptd.core.settings import SettingsError, parse_table


def test_spec1_1_fractional_interval_rounds_down_and_final_step_saved() -> None:
    """1578 steps, 2 epochs, saves_per_epoch=2: rounding up gave 395/790/1185/1580 and no final.
    Fractions round down within each epoch, anchored to its start: the end of epoch 1 (789) is a
    save point too (issue 36 #4; a grid of 394 from 0 gave 394/788/1182/1576 + 1578)."""
    p = SavePolicy(saves_per_epoch=2, steps_per_epoch=789, total_steps=1578)
    assert p.step_rules() == (("saves_per_epoch", 394),)
    assert plan(p).steps == [394, 789, 1183, 1578]
    assert plan(p).saves[-1].trigger == "final"
    assert all(s <= 1578 for s in plan(SavePolicy(saves_per_epoch=2, steps_per_epoch=789), 1577).steps)


def test_fractions_of_an_epoch_are_anchored_to_each_epoch_start() -> None:
    assert plan(SavePolicy(saves_per_epoch=3, steps_per_epoch=11), 33).steps == [3, 7, 11, 14, 18, 22, 25, 29, 33]
    assert plan(SavePolicy(every_epochs=0.5, steps_per_epoch=789), 1578).steps == [394, 789, 1183, 1578]
    assert plan(SavePolicy(every_epochs=1.5, steps_per_epoch=10), 40).steps == [15, 30, 40]


def test_spec1_2_interval_longer_than_half_the_run_still_saves_the_end() -> None:
    p = SavePolicy(every_steps=20000, total_steps=39998)
    result = plan(p)
    assert result.steps == [20000, 39998]
    big = plan(SavePolicy(every_steps=50000, total_steps=39998))
    assert big.steps == [39998]
    assert any("longer than the run" in w for w in big.warnings)


def test_spec1_4_start_after_suppresses_early_saves_but_not_final_or_preempt() -> None:
    p = SavePolicy(every_steps=1, start_after=100, total_steps=120)
    assert plan(p).steps[0] == 100
    assert not decide(p, Progress(step=1), now=0).save
    assert decide(p, Progress(step=1), now=0).rule == ""
    short = SavePolicy(every_steps=10, start_after=1000, total_steps=50)
    assert plan(short).steps == [50]
    assert decide(short, Progress(step=3, preempt=True), 0) == Decision(True, "preempt", "on_preempt")


def test_every_epochs_float_rounds_down_exactly() -> None:
    assert SavePolicy(every_epochs=0.29, steps_per_epoch=100).step_rules() == (("every_epochs", 29),)
    assert SavePolicy(every_epochs=0.25, steps_per_epoch=30).step_rules() == (("every_epochs", 7),)
    assert SavePolicy(every_epochs=0.001, steps_per_epoch=30).step_rules() == (("every_epochs", 1),)


def test_saves_per_epoch_needs_steps_per_epoch() -> None:
    with pytest.raises(PolicyError, match="steps_per_epoch"):
        SavePolicy(saves_per_epoch=2)


def test_min_interval_defers_but_never_loses_a_step_save() -> None:
    p = SavePolicy(every_steps=10, min_interval=60)
    held = decide(p, Progress(step=10, last_saved_step=0, last_scheduled_save_at=1000.0), now=1030.0)
    assert not held.save and held.rule == "min_interval"
    later = decide(p, Progress(step=13, last_saved_step=0, last_scheduled_save_at=1000.0), now=1061.0)
    assert later == Decision(True, "step", "every_steps")


def test_time_trigger_and_best_metric() -> None:
    p = SavePolicy(every=1800, best_metric="loss", best_mode="min")
    assert decide(p, Progress(step=5, time_due="every"), 0) == Decision(True, "time", "every")
    assert decide(p, Progress(step=5, metric=0.5, best=0.6), 0) == Decision(True, "best", "best_metric")
    assert not decide(p, Progress(step=5, metric=0.7, best=0.6), 0).save
    assert not decide(p, Progress(step=5, metric=float("nan"), best=0.6), 0).save
    maxp = SavePolicy(best_metric="acc", best_mode="max")
    assert decide(maxp, Progress(step=5, metric=0.7, best=0.6), 0).trigger == "best"


def test_final_fires_when_a_step_jumps_past_total() -> None:
    p = SavePolicy(total_steps=100)
    assert decide(p, Progress(step=103, last_saved_step=90), 0) == Decision(True, "final", "save_final")
    assert not decide(SavePolicy(total_steps=100, save_final=False), Progress(step=100), 0).save


def test_settings_errors_name_the_key() -> None:
    with pytest.raises(SettingsError, match="every_steps: must be at least 1"):
        parse_table({"every_steps": 0}, "test")
    with pytest.raises(SettingsError, match="did you mean 'every_steps'"):
        parse_table({"evry_steps": 3}, "test")
    with pytest.raises(SettingsError, match="every: expected a duration"):
        parse_table({"every": "soon"}, "test")
    with pytest.raises(SettingsError, match="cron: not a valid cron"):
        parse_table({"cron": "61 * * * *"}, "test")
    assert parse_table({"every": "30m", "min_interval": "90s", "cron": "0 * * * *"}, "t")["every"] == 1800.0


policies = st.builds(
    SavePolicy,
    every_steps=st.one_of(st.none(), st.integers(1, 5000)),
    saves_per_epoch=st.one_of(st.none(), st.integers(1, 50)),
    steps_per_epoch=st.integers(1, 3000),
    every_epochs=st.one_of(st.none(), st.floats(0.01, 5.0).map(lambda f: round(f, 3))),
    start_after=st.integers(0, 3000),
)


@settings(max_examples=400, deadline=None)
@given(policies, st.integers(1, 20000))
def test_plan_properties(p: SavePolicy, total: int) -> None:
    steps = plan(p, total).steps
    assert steps[-1] == total  # the final step is always saved
    assert all(0 < s <= total for s in steps)
    assert steps == sorted(set(steps))
    scheduled = steps[:-1]
    assert all(s >= p.start_after for s in scheduled)
    intervals = [math.ceil(k) for _, k in p.exact_step_rules()]
    if intervals:
        k = min(intervals)  # the k-th save at floor(k * exact): a gap is at most the exact interval, rounded up
        # no gap between consecutive saves (after start_after) exceeds the configured interval
        anchored = [s for s in steps if s >= p.start_after]
        first_due = max(p.start_after, k)
        if anchored:
            assert anchored[0] <= max(first_due + k, total)
        for a, b in zip(anchored, anchored[1:]):
            assert b - a <= k


@settings(max_examples=200, deadline=None)
@given(policies, st.integers(1, 600))
def test_plan_agrees_with_step_by_step_decisions(p: SavePolicy, total: int) -> None:
    """What ``ckptd plan`` prints is exactly what the hook does, step by step."""
    p = SavePolicy(**{**p.__dict__, "total_steps": total})
    saved, last = [], 0
    nxt = next_due_step(p, 0)
    for step in range(1, total + 1):
        d = decide(p, Progress(step=step, last_saved_step=last), now=0.0)
        assert d.save == (step >= nxt) or d.trigger == "final"
        if d.save:
            saved.append(step)
            last = step
            nxt = next_due_step(p, last)
    assert saved == plan(p).steps


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 50), st.floats(1, 100), st.lists(st.floats(0.01, 30), min_size=1, max_size=200))
def test_min_interval_is_respected(every: int, min_interval: float, durations: list[float]) -> None:
    p = SavePolicy(every_steps=every, min_interval=min_interval)
    now, last_at, last_step, times = 0.0, None, 0, []
    for step, d in enumerate(durations, start=1):
        now += d
        dec = decide(p, Progress(step=step, last_saved_step=last_step, last_scheduled_save_at=last_at), now)
        if dec.save:
            times.append(now)
            last_at, last_step = now, step
    assert all(b - a >= min_interval for a, b in zip(times, times[1:]))

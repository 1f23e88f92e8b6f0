"""every="auto" over two tiers (issue 28, SPEC §14), the pure plan of memory and disk intervals."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptd.core.autointerval import CostSamples, Mtbf, auto_interval, young_daly
from ckptd.core.multilevel import MAX_K, PRIOR_SHARE, Coverage, estimate_coverage, multilevel, waste
from ckptd.core.policy import SavePolicy
from ckptd.core.settings import Settings
from ckptd.daemon.catalog import Catalog
from ckptd.daemon.jobkey import JobKey
from ckptd.daemon.jobstate import JobState

DAY = 86400.0


PRIOR = estimate_coverage(0, 0)


def plan(
    stall: float,
    persist: float,
    mtbf: float = DAY,
    share: float = PRIOR_SHARE,
    overhead: float = 0.02,
    min_interval: float = 0.0,
    mem_stall: float | None = None,
    mem_persist: float | None = None,
):  # type: ignore[no-untyped-def]
    memory = CostSamples().add(mem_stall, mem_persist)
    return multilevel(
        CostSamples((stall,), (persist,)), memory, Mtbf(mtbf, "mtbf"), Coverage(share, "given"), overhead, min_interval
    )


def test_equal_stalls_and_a_quick_disk_need_no_memory_saves() -> None:
    """The same snapshot stalls the same whichever tier it goes to: with nothing in the way every
    save may as well be a disk save, and the plan is every="auto"'s single level, unchanged."""
    ml = plan(0.8, 20.0)
    single = auto_interval(CostSamples((0.8,), (20.0,)), Mtbf(DAY, "mtbf"))
    assert ml.memory is None and ml.memory_rule == "disk_covers" and ml.k == 1
    assert ml.disk == single and ml.disk.seconds == pytest.approx(372.1, abs=0.5)
    assert "no separate saves" in ml.reason


def test_a_disk_slower_than_the_failures_allow_brings_memory_saves() -> None:
    """Overlapped snapshots stall 10 ms, but writing and verifying the disk copy takes 120 s:
    Young/Daly wants a save every 42 s, the disk can take one every 120 s. Memory saves fill in."""
    ml = plan(0.01, 120.0)
    assert ml.k == 3 and ml.memory == pytest.approx(40.0, rel=1e-3) and ml.memory_rule == "persist"
    assert ml.disk.seconds == pytest.approx(120.0, rel=1e-3) and ml.disk.rule == "persist"
    assert ml.waste < ml.single_waste  # 0.060% of training against 0.078% with the disk alone
    assert ml.waste == pytest.approx(waste(40.0, 3, 0.01, 0.01, 0.75, DAY), rel=1e-3)
    assert "a save every 40s (rule persist), one in 3 to disk" in ml.reason and "(prior)" not in ml.reason


def test_no_memory_tier_or_no_failure_it_recovers_means_one_level() -> None:
    for share in (0.0,):
        ml = plan(0.01, 120.0, share=share)
        assert ml.memory is None and ml.k == 1 and ml.disk.rule == "persist"


def test_memory_saves_respect_min_interval_and_their_own_keeping_time() -> None:
    ml = plan(0.01, 120.0, min_interval=60.0)
    assert ml.memory is None or ml.memory >= 60.0
    ml = plan(0.01, 600.0, mem_stall=0.01, mem_persist=90.0)  # keeping a copy takes 90 s: never sooner
    assert ml.memory is not None and ml.memory >= 90.01 and ml.disk.seconds >= 600.0


@settings(max_examples=150, deadline=None)
@given(
    stall=st.floats(1e-4, 30.0),
    persist=st.floats(0.0, 3600.0),
    mtbf=st.floats(600.0, 30 * DAY),
    share=st.floats(0.0, 0.99),
    overhead=st.floats(0.005, 0.5),
    floor=st.floats(0.0, 600.0),
    mem_factor=st.floats(0.2, 2.0),
    mem_persist=st.floats(0.0, 60.0),
)
def test_the_plan_is_the_least_waste_within_every_bound(
    stall: float,
    persist: float,
    mtbf: float,
    share: float,
    overhead: float,
    floor: float,
    mem_factor: float,
    mem_persist: float,
) -> None:
    """Against brute force: no (period, k) that keeps the bounds loses less than the plan does,
    and the plan keeps them all (memory saves after the previous was kept, disk saves after the
    previous verified, min_interval for both, max_overhead for the stalls together)."""
    c_mem = stall * mem_factor
    ml = plan(stall, persist, mtbf, share, overhead, floor, c_mem, mem_persist)
    assert ml.waste <= ml.single_waste + 1e-12
    assert ml.disk.seconds >= stall + persist - 1e-9 and ml.disk.seconds >= floor - 1e-9
    if ml.memory is None:
        return
    assert ml.memory >= max(c_mem + mem_persist, floor) - 1e-9 and 2 <= ml.k <= MAX_K
    assert ml.disk.seconds == pytest.approx(ml.k * ml.memory)
    stalled = (c_mem * (ml.k - 1) + stall) / (ml.k * ml.memory)
    assert stalled <= overhead * (1 + 1e-9)
    for k in range(2, MAX_K + 1):
        lowest = max(c_mem + mem_persist, (stall + persist) / k, floor, (c_mem * (k - 1) + stall) / (k * overhead))
        for f in (1.0, 1.01, 1.1, 1.5, 2.0, 4.0, 16.0):
            assert waste(lowest * f, k, c_mem, stall, share, mtbf) >= ml.waste * (1 - 1e-9)


def test_the_share_memory_recovers_starts_at_dlrovers_and_follows_the_job() -> None:
    assert estimate_coverage(0, 0) == Coverage(0.75, "prior")
    c = estimate_coverage(3, 0)  # three trainer crashes, the daemon alive each time
    assert c.source == "history" and c.share == pytest.approx(3.75 / 4)
    assert estimate_coverage(0, 3).share == pytest.approx(0.75 / 4)  # three runs lost with the host
    assert estimate_coverage(-1, -5) == Coverage(0.75, "prior")


def test_a_fixed_every_memory_leaves_the_disk_the_failures_memory_cannot_take() -> None:
    ml = multilevel(CostSamples((0.05,), (1.0,)), CostSamples(), Mtbf(DAY, "mtbf"), PRIOR, 0.02, fixed_memory=30.0)
    assert ml.memory == 30.0 and ml.memory_rule == "fixed"
    assert ml.disk.seconds == pytest.approx(young_daly(0.05, 4 * DAY))  # M / (1 - 0.75)
    assert ml.k == round(ml.disk.seconds / 30.0)
    assert ml.waste == pytest.approx(waste(30.0, ml.k, 0.05, 0.05, 0.75, DAY))
    measured = multilevel(
        CostSamples((0.05,), (1.0,)), CostSamples((0.5,), (0.6,)), Mtbf(DAY, "mtbf"), PRIOR, 0.02, fixed_memory=30.0
    )  # memory saves measured at 0.5 s each: their stalls are counted
    assert measured.waste == pytest.approx(waste(30.0, measured.k, 0.5, 0.05, 0.75, DAY)) and measured.waste > ml.waste


def _job(budget: int, sharded: bool = False, every_memory: float | None = None) -> JobState:
    policy = SavePolicy.from_settings({"every": "auto", "mtbf": DAY, "max_overhead": 0.02})
    j = JobState(
        "j",
        1000,
        "/tmp/j",
        Settings(every_memory=every_memory),
        policy,
        connected=True,
        started_at=0.0,
        memory_budget=budget,
        sharded=sharded,
        state_bytes=1 << 20,
    )
    j.costs = CostSamples((0.01,), (120.0,))
    return j


def test_the_daemon_asks_for_memory_saves_on_the_plans_clock() -> None:
    j = _job(budget=1 << 30)
    plan_now = j.plan(0.0)
    assert plan_now is not None and plan_now.memory == pytest.approx(40.0, rel=1e-2)
    assert j.auto(0.0) == plan_now.disk and plan_now.disk.seconds == pytest.approx(120.0, rel=1e-2)
    assert not j.memory_due(30.0)
    assert j.memory_due(41.0) and not j.memory_due(42.0)  # told once
    j.kept_in_memory(45.0, 0.01, 0.02)  # the memory save arrived
    assert j.memory_costs.stalls == (0.01,) and not j.memory_due(60.0) and j.memory_due(86.0)
    gauges = j.gauges(86.0, 0.0)
    assert gauges["ckptd_auto_memory_interval_seconds"] == pytest.approx(40.0, rel=0.05)
    assert gauges["ckptd_auto_interval_seconds"] == pytest.approx(120.0, rel=1e-2)


@pytest.mark.parametrize(
    "budget, sharded, why",
    [(0, False, "memory tier off"), (1 << 30, True, "sharded"), (1 << 10, False, "snapshot larger than the budget")],
)
def test_no_memory_saves_without_a_memory_tier_for_the_job(budget: int, sharded: bool, why: str) -> None:
    j = _job(budget, sharded)
    p = j.plan(0.0)
    assert p is not None and p.memory is None and p.coverage.source == "none", why
    assert p.reason.endswith("; no memory tier for this job") and p.disk == j.auto(0.0), p.reason
    assert not j.memory_due(1000.0)
    assert j.gauges(1000.0, 0.0)["ckptd_auto_memory_interval_seconds"] == 0.0


def test_a_fixed_every_memory_is_the_hooks_clock_not_the_daemons() -> None:
    j = _job(1 << 30, every_memory=10.0)
    p = j.plan(0.0)
    assert p is not None and p.memory == 10.0 and p.memory_rule == "fixed"
    assert not j.memory_due(1000.0)


def test_history_tells_trainer_crashes_from_runs_lost_with_the_daemon(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cat = Catalog(str(tmp_path))
    key = JobKey("h", "/tmp/h")
    try:
        cat.event(key, "start", step=0)
        cat.event(key, "saved", step=100)
        cat.event(key, "disconnect", step=130)  # the trainer crashed: the daemon saw it go
        cat.event(key, "start", step=0)
        cat.event(key, "saved", step=200)  # the daemon died here (no end, no disconnect) ...
        cat.event(key, "start", step=230)  # ... and the trainer carried on: not a loss
        cat.event(key, "saved", step=300)  # the host died here ...
        cat.event(key, "start", step=0)  # ... a new process resumed from disk: a loss
        cat.event(JobKey("h", "/elsewhere"), "disconnect", step=1)  # another directory's job
        ran, crashes, losses = cat.history(key)
    finally:
        cat.close()
    assert (crashes, losses) == (1, 1) and ran >= 0

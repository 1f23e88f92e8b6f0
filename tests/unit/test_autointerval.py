"""every="auto" (issue 18), the pure part: the interval function, its bounds and their rules."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckptd.core.autointerval import (
    PRIOR_MTBF,
    CostSamples,
    Mtbf,
    auto_interval,
    estimate_mtbf,
    overhead_ratio,
    young_daly,
)
from ckptd.core.policy import SavePolicy, next_time_due
from ckptd.core.settings import SettingsError, parse_table

costs = st.floats(min_value=1e-4, max_value=600.0)


mtbfs = st.floats(min_value=60.0, max_value=30 * 86400.0)


overheads = st.floats(min_value=0.001, max_value=0.5)


persists = st.lists(st.floats(min_value=0.0, max_value=3600.0), max_size=12)


floors = st.floats(min_value=0.0, max_value=7200.0)


def interval(
    cost: float, mtbf: float, overhead: float = 0.02, persist: tuple[float, ...] = (), min_interval: float = 0.0
) -> float:
    samples = CostSamples(stalls=(cost,), persists=persist)
    return auto_interval(samples, Mtbf(mtbf, "mtbf"), overhead, min_interval).seconds


def test_young_for_cheap_saves_and_the_issue_example() -> None:
    # T = sqrt(2CM): C = 0.8 s, M = 24 h gives 372 s; Daly's terms add well under 1% here
    assert young_daly(0.8, 86400) == pytest.approx(math.sqrt(2 * 0.8 * 86400), rel=1e-3)
    auto = auto_interval(CostSamples(stalls=(0.8,)), estimate_mtbf(0, 0.0, 86400.0))
    assert auto.rule == "young_daly" and auto.seconds == pytest.approx(372.1, abs=0.5)
    assert auto.reason == "auto: T=372s from C=0.8s, M=24h"


def test_daly_when_a_save_costs_more_than_twice_the_mtbf() -> None:
    assert young_daly(300.0, 100.0) == 400.0  # M + C: saving cannot win back more
    assert young_daly(0.0, 100.0) == 0.0


@given(costs, costs, mtbfs, overheads, persists, floors)
def test_monotone_in_cost(c1: float, c2: float, m: float, o: float, p: list[float], floor: float) -> None:
    lo, hi = sorted((c1, c2))
    assert interval(lo, m, o, tuple(p), floor) <= interval(hi, m, o, tuple(p), floor) * (1 + 1e-12)


@given(costs, mtbfs, mtbfs, overheads, persists, floors)
def test_monotone_in_mtbf(c: float, m1: float, m2: float, o: float, p: list[float], floor: float) -> None:
    lo, hi = sorted((m1, m2))
    assert interval(c, lo, o, tuple(p), floor) <= interval(c, hi, o, tuple(p), floor) * (1 + 1e-12)


@given(costs, mtbfs, overheads, persists, floors)
def test_every_bound_holds_and_the_rule_is_the_binding_one(
    c: float, m: float, o: float, p: list[float], floor: float
) -> None:
    auto = auto_interval(CostSamples(stalls=(c,), persists=tuple(p)[-9:]), Mtbf(m, "mtbf"), o, floor)
    t = auto.seconds
    assert c / t <= o * (1 + 1e-9)  # the overhead bound: stalls take at most max_overhead of training
    assert t >= max(tuple(p)[-9:], default=0.0) + c - 1e-9  # never due before the last saves could verify
    assert t >= floor - 1e-9
    value = {
        "young_daly": young_daly(c, m),
        "max_overhead": c / o,
        "persist": max(tuple(p)[-9:], default=0.0) + c,
        "min_interval": floor,
    }[auto.rule]
    assert t == pytest.approx(max(value, 1e-3))
    if auto.rule != "young_daly":
        assert f"raised to the {auto.rule} bound" in auto.reason


def test_a_median_not_a_mean_and_a_bounded_window() -> None:
    samples = CostSamples()
    for stall in (0.1, 0.1, 0.1, 30.0, 0.1):  # one slow save (a page-cache flush) does not swing it
        samples = samples.add(stall=stall)
    assert auto_interval(samples, Mtbf(86400, "mtbf")).cost == 0.1
    for _ in range(20):
        samples = samples.add(stall=1.0, persist=2.0)
    assert len(samples.stalls) == len(samples.persists) == 9
    assert samples.add(stall=float("nan"), persist=-1.0) == samples  # nonsense reported by a hook is ignored


def test_the_guess_before_the_first_save_is_measured() -> None:
    auto = auto_interval(CostSamples(), Mtbf(86400, "prior"), cost_guess=0.25)
    assert auto.cost_source == "guess" and "guessed from the state size" in auto.reason
    assert auto.seconds == pytest.approx(young_daly(0.25, 86400))


def test_mtbf_from_history() -> None:
    assert estimate_mtbf(0, 0.0) == Mtbf(PRIOR_MTBF, "prior")
    assert estimate_mtbf(5, 3600.0, configured=7200.0) == Mtbf(7200.0, "mtbf")
    # 100 unclean exits in 100 h of running: the history outweighs the 24 h prior
    m = estimate_mtbf(100, 100 * 3600.0)
    assert m.source == "history" and m.seconds == pytest.approx(124 * 3600 / 101)
    assert estimate_mtbf(3, 3600.0).seconds < estimate_mtbf(1, 3600.0).seconds < estimate_mtbf(0, 3600.0).seconds
    assert "2 unclean exits in" in auto_interval(CostSamples((1.0,)), estimate_mtbf(2, 7200.0)).reason


def test_overhead_ratio_over_a_window() -> None:
    stalls = [(100.0, 1.0), (3000.0, 2.0), (3500.0, 3.0)]
    assert overhead_ratio(stalls, started_at=0.0, now=3600.0) == pytest.approx(6 / 3600)
    assert overhead_ratio(stalls, started_at=0.0, now=4000.0) == pytest.approx(5 / 3600)  # the first fell out
    assert overhead_ratio(stalls, started_at=3400.0, now=3600.0) == pytest.approx(3 / 200)
    assert overhead_ratio([], started_at=10.0, now=10.0) == 0.0


def test_settings_and_policy() -> None:
    s = parse_table({"every": "auto", "mtbf": "6h", "max_overhead": "5%"}, "test")
    p = SavePolicy.from_settings(s)
    assert p.auto and p.every is None and p.mtbf == 6 * 3600 and p.max_overhead == pytest.approx(0.05)
    assert p.has_time_rules
    assert next_time_due(p, 100.0, auto_seconds=50.0) == 150.0
    assert next_time_due(SavePolicy(every=30.0), 100.0, auto_seconds=50.0) == 130.0
    for bad, key in (
        ({"max_overhead": "150%"}, "max_overhead"),
        ({"max_overhead": 0}, "max_overhead"),
        ({"every": "sometimes"}, "every"),
        ({"mtbf": "-1h"}, "mtbf"),
    ):
        with pytest.raises(SettingsError, match=key):
            parse_table(bad, "test")

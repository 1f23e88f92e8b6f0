"""every="auto" (issue 18): the pure interval function, its bounds and their rules, the MTBF
estimate, the settings that reach it and ``ckptd plan --every auto``. No filesystem here;
the end-to-end runs are in test_daemon.py and test_checkpointer.py."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ckptd_cli


def test_plan_shows_the_interval_and_its_rule() -> None:
    r = ckptd_cli(
        "plan", "--total-steps", "10000", "--every", "auto", "--stall", "0.8s", "--mtbf", "24h", "--step-time", "0.5s"
    )
    assert r.returncode == 0, r.stderr
    assert "every=auto: a disk save every 372s, about every 744 steps at 0.5s/step (rule young_daly)" in r.stdout
    assert "why: auto: T=372s from C=0.8s, M=24h; memory tier: no separate saves" in r.stdout
    r = ckptd_cli(
        "plan",
        "--total-steps",
        "100",
        "--every",
        "auto",
        "--stall",
        "10s",
        "--persist",
        "60s",
        "--mtbf",
        "1h",
        "--json",
    )
    auto = json.loads(r.stdout)["auto"]
    assert auto["rule"] == "max_overhead" and auto["seconds"] == pytest.approx(500.0)
    r = ckptd_cli("plan", "--total-steps", "100", "--every", "auto")
    assert r.returncode == 2 and "--every auto needs --stall" in r.stderr

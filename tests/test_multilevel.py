"""every="auto" over two tiers (issue 28, SPEC §14): the pure plan of memory and disk intervals,
the share of failures the memory tier recovers, the daemon's job state that fires memory saves,
the catalogue history behind it and ``ckptd plan --every auto``. The end-to-end run (a daemon
asking a real trainer for memory-only saves) is in test_memtier.py."""

from __future__ import annotations

import json
import math

from tests.conftest import ckptd_cli


def test_plan_shows_both_tiers() -> None:
    r = ckptd_cli(
        "plan",
        "--total-steps",
        "100000",
        "--every",
        "auto",
        "--stall",
        "10ms",
        "--persist",
        "120s",
        "--mtbf",
        "24h",
        "--step-time",
        "0.5s",
    )
    assert r.returncode == 0, r.stderr
    assert "every=auto: a disk save every 120s, about every 240 steps at 0.5s/step (rule persist)" in r.stdout
    assert (
        "every=auto: a memory-only save every 40s, about every 80 steps (rule persist), one in 3 saves to disk"
        in r.stdout
    )
    r = ckptd_cli(
        "plan",
        "--total-steps",
        "100",
        "--every",
        "auto",
        "--stall",
        "10ms",
        "--persist",
        "120s",
        "--memory-share",
        "0",
        "--json",
    )
    auto = json.loads(r.stdout)["auto"]
    assert auto["memory"]["seconds"] is None and auto["rule"] == "persist" and math.isclose(auto["seconds"], 120.01)
    r = ckptd_cli("plan", "--total-steps", "100", "--every", "100", "--memory-share", "0.5")
    assert r.returncode == 2 and "only mean something with --every auto" in r.stderr

"""Issue 36 #5, the smaller findings that need no process: APScheduler's skipped runs said once."""

from __future__ import annotations

import logging
import threading
import time

import pytest


def test_apscheduler_skipped_runs_are_said_once_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    """A job still running at its next time (a tick under load): a real BackgroundScheduler warned at
    every skip; with the daemon's filter one line says it, with the count."""
    from apscheduler.schedulers.background import BackgroundScheduler

    from ckptd.daemon import schedlog

    installed = schedlog.install()
    release = threading.Event()
    sched = BackgroundScheduler(daemon=True, job_defaults={"coalesce": True, "max_instances": 1})
    sched.add_job(lambda: release.wait(5), "interval", seconds=0.05, id="tick")
    with caplog.at_level(logging.WARNING, logger="apscheduler"):
        sched.start()
        try:
            time.sleep(1.0)
        finally:
            release.set()
            sched.shutdown(wait=True)
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert installed.skipped.get("tick", 0) >= 3  # skips happened...
    assert len(lines) == 1 and lines[0].startswith("job tick was still running at its next time")  # ...said once
    assert all("maximum number of running instances" not in r.getMessage() for r in caplog.records)

"""A DeepSpeed engine job is a daemon job like any other (``Checkpointer(job, dir, engine=engine)``
with a daemon on the socket): its saves, failures, retention and exit are the daemon's to count.

Real DeepSpeed on CPU (2 ranks under torchrun, ZeRO-2), a real ``ckptd serve`` subprocess. Rank 0
says hello with the job's policy, heartbeats its step, reports every tag it committed (or failed
to) with ``committed``, and ``end`` at close; the daemon re-verifies each tag (every rank's file),
catalogues and counts it, and applies the job's retention.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess

import pytest

from tests.conftest import DaemonProc, ckptd_cli, wait_until
from tests.test_deepspeed_engine import ENV, SCRIPT, torchrun

pytestmark = [pytest.mark.xdist_group("deepspeed"), pytest.mark.slow, pytest.mark.timeout(900)]


def test_engine_job_is_counted_retained_and_paged_by_the_daemon(daemon: DaemonProc) -> None:
    """ZeRO-2, 12 steps saving every 4, keep_last 1, rank 1's partition of step 8 cut in half
    after it was written: step 4 counts as a step save and 12 (total_steps) as the final one, 8 as
    a failed save (nothing committed), the daemon deletes global_step4 once global_step12 is in,
    and ``list``/``latest`` through the daemon name the tag. A second run, its rank 0 SIGKILLed in
    the save of step 12 (8 committed), counts trainer_exit_unsaved; the first (which ended
    cleanly) counts nothing."""
    env = {**ENV, "CKPTD_SOCKET": daemon.socket, "CKPTD_KEEP_LAST": "1"}
    d = daemon.root / "ds"
    r = subprocess.run(
        torchrun(
            SCRIPT,
            "--dir",
            str(d),
            "--stage",
            "2",
            "--steps",
            "12",
            "--every",
            "4",
            "--corrupt-rank",
            "1",
            "--corrupt-at",
            "8",
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    job = {"training_job": "ds-demo", "directory": str(d)}
    # rank 0 waits up to 10 s for the daemon's bye; a loaded daemon may still be verifying the tags
    # it was told of (in order, `end` last) when the run exits: the session's end is the event
    wait_until(lambda: daemon.metric("ckptd_job_up", **job) == 0, 60, "the daemon to finish the run's messages")
    assert daemon.metric("ckptd_saves_total", **job, trigger="step", outcome="ok") == 1
    assert daemon.metric("ckptd_saves_total", **job, trigger="final", outcome="ok") == 1
    assert daemon.metric("ckptd_save_failures_total", **job, reason="uncommitted") == 1
    assert daemon.metric("ckptd_last_saved_step", **job) == 12
    assert daemon.metric("ckptd_deleted_total", **job, rule="retention") == 1
    assert not (d / "global_step4").exists() and not (d / "global_step8").exists()
    assert (d / "global_step12" / "ckptd-commit.json").is_file()
    status = json.loads(ckptd_cli("status", "--json", "--socket", daemon.socket).stdout)
    row = next(j for j in status if j["directory"] == str(d))
    assert row["last_verified_step"] == 12 and row["failed_total"] == 1 and row["missed_total"] == 0, row
    listed = ckptd_cli("list", "ds-demo", "--socket", daemon.socket)
    assert listed.returncode == 0 and str(d / "global_step12") in listed.stdout, listed.stdout + listed.stderr
    assert "global_step4" not in listed.stdout
    latest = ckptd_cli("latest", "ds-demo", "--socket", daemon.socket)
    assert latest.stdout.strip() == str(d / "global_step12"), latest.stdout + latest.stderr

    killed, log = daemon.root / "killed", daemon.root / "killed.log"
    with open(log, "wb") as out:  # a file, not a pipe nobody reads once the pid is known (a full pipe stops a rank)
        p = subprocess.Popen(
            torchrun(
                SCRIPT,
                *("--dir", str(killed), "--stage", "2", "--steps", "200", "--every", "4", "--step-sleep", "0.3"),
                *("--pause-rank", "0", "--pause-at", "12"),  # stopped in the save of step 12, its steps unsaved
            ),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: re.search(r"rank 0 pid (\d+)", log.read_text()) or p.poll() is not None, 300, "rank 0")
        m = re.search(r"rank 0 pid (\d+)", log.read_text())
        assert m is not None, log.read_text()[-4000:]
        there = {"training_job": "ds-demo", "directory": str(killed)}
        wait_until(
            lambda: daemon.metric("ckptd_saves_total", **there, trigger="step", outcome="ok") >= 1,
            timeout=300,
            what="the second run's first save counted",
        )

        def past_saved() -> bool:
            rows = json.loads(ckptd_cli("status", "--json", "--socket", daemon.socket).stdout)
            row = next(j for j in rows if j["directory"] == str(killed))
            return bool(row["step"] > (row["last_verified_step"] or 0))

        # killed while step 12 is being saved (not yet committed): its 4 steps since 8 are unsaved, and
        # no save can land between the daemon's last word and the kill
        wait_until(lambda: "rank 0 PAUSED" in log.read_text(), 300, "rank 0 in the save of step 12")
        wait_until(past_saved, timeout=120, what="a heartbeat past the saved step")
        os.kill(int(m.group(1)), signal.SIGKILL)
        try:
            wait_until(
                lambda: daemon.metric("ckptd_missed_saves_total", **there, reason="trainer_exit_unsaved") == 1,
                timeout=60,
                what="trainer_exit_unsaved",
            )
        except AssertionError:
            print(log.read_text()[-6000:])  # what the ranks said, with the daemon's log at teardown
            raise
    finally:
        if p.poll() is None:
            p.terminate()  # torchrun ends its ranks
        p.wait(120)
    assert daemon.metric("ckptd_missed_saves_total", **job, reason="trainer_exit_unsaved") == 0

"""No false pages (issue 34): a resume, a daemon restart and a scrub racing a deletion count
nothing as missed, failed or corrupt, against a real daemon and real trainers."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from ckptd.daemon.catalog import Catalog
from ckptd.daemon.jobkey import JobKey
from tests.conftest import DaemonProc, wait_until
from trainer_hooks import Checkpointer


def _steps(ckpt: Checkpointer, n: int, pause: float = 0.05) -> None:
    """At a trainer's pace: heartbeats (one a second when the step moved) reach the daemon."""
    for _ in range(n):
        ckpt.step()
        time.sleep(pause)


def test_a_resumed_run_counts_no_saved_step_as_skipped(daemon: DaemonProc) -> None:
    """The hook says hello at step 0, before resume() loads step 10: the daemon counted the saved
    grid steps 5 and 10 as "due and gone past" (step_skipped, severity critical) at the first
    heartbeat. ``make demo`` said ``missed 1``."""
    run = daemon.root / "resumed"
    first = Checkpointer("resumed", run, model=torch.nn.Linear(4, 4), every_steps=5, socket=daemon.socket)
    try:
        _steps(first, 12)
        first.wait()
        wait_until(lambda: daemon.metric("ckptd_last_saved_step", training_job="resumed") == 10, 30, "step 10 saved")
    finally:
        first.close(final=False)  # as a crash or a preemption leaves it: step 12 unsaved
    second = Checkpointer("resumed", run, model=torch.nn.Linear(4, 4), every_steps=5, socket=daemon.socket)
    try:
        assert second.resume() == 10
        _steps(second, 4, pause=0.4)  # steps 11-14: heartbeats, no grid step passed unsaved
        wait_until(lambda: daemon.metric("ckptd_unsaved_steps", training_job="resumed") >= 3, 30, "a heartbeat")
        assert daemon.metric("ckptd_missed_saves_total", training_job="resumed", reason="step_skipped") == 0
    finally:
        second.close(final=False)


def test_a_daemon_restart_is_no_trainer_exit_and_no_crash(tmp_path: Path) -> None:
    """SIGTERM to the daemon ends its trainers' connections: each was counted as
    trainer_exit_unsaved (logged, paged) and recorded as a crash, which every="auto" learns
    its MTBF from. The trainer reconnects to the new daemon and carries on."""
    d = DaemonProc(tmp_path / "d").start()
    run = d.root / "kept"
    ckpt = Checkpointer("kept", run, model=torch.nn.Linear(4, 4), every_steps=50, socket=d.socket, reconnect_every=0.3)
    try:
        _steps(ckpt, 3, pause=0.5)
        wait_until(lambda: d.metric("ckptd_unsaved_steps", training_job="kept") == 3, 30, "unsaved steps")
        assert d.stop() == 0
        d.start()
        wait_until(
            lambda: (ckpt.step(), d.metric("ckptd_job_up", training_job="kept") == 1)[1], 30, "the trainer to reconnect"
        )
    finally:
        ckpt.close(final=False)
        d.stop()
    assert "unsaved steps" not in d.log.read_text()
    catalog = Catalog(str(d.state))
    try:
        assert catalog.history(JobKey("kept", str(run)))[1] == 0  # no crash for every="auto" to learn
        assert not [e for e in catalog.events("kept") if e[3].get("reason") == "trainer_exit_unsaved"]
    finally:
        catalog.close()


def test_a_scrub_that_finds_a_file_deleted_meanwhile_says_missing_not_corrupt(tmp_path: Path) -> None:
    """A trainer in embedded mode (or a user) deleted a catalogued checkpoint: the scrub "verified"
    the missing file, counted it corrupt and CkptdVerifyFailed paged."""
    d = DaemonProc(tmp_path / "d", extra_config='scrub_every = "1s"\n').start()
    run = d.root / "scrubbed"
    ckpt = Checkpointer("scrubbed", run, model=torch.nn.Linear(4, 4), every_steps=2, socket=d.socket)
    try:
        _steps(ckpt, 4)
        ckpt.wait()
        wait_until(lambda: d.metric("ckptd_checkpoints", training_job="scrubbed") == 2, 30, "two checkpoints")
        oldest = sorted(p for p in os.listdir(run) if p.endswith(".safetensors"))[0]
        os.unlink(run / oldest)
        wait_until(lambda: d.metric("ckptd_checkpoints", training_job="scrubbed") == 1, 30, "a scrub")
        assert d.metric("ckptd_verify_total", training_job="scrubbed", outcome="corrupt") == 0
        assert "no longer verifies" not in d.log.read_text()
    finally:
        ckpt.close(final=False)
        d.stop()

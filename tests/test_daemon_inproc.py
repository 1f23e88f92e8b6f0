"""The daemon's logic with the daemon in this process and a client without torch: milliseconds.

Each path here also has a real-process test (test_daemon.py, test_protocol.py, test_security.py).
"""

from __future__ import annotations

import os
import struct

import pytest

from ckptd.disk.verify import verify_file
from tests.wire_client import Client, snapshot


def hello(c: Client, job: str, directory: str) -> dict:  # type: ignore[type-arg]
    return c.ask(
        {
            "type": "hello",
            "job": job,
            "directory": directory,
            "settings": {"keep_last": 2},
            "pid": os.getpid(),
            "step": 0,
        }
    )


def test_save_lifecycle_in_process(inproc_daemon) -> None:  # type: ignore[no-untyped-def]
    run = os.path.join(inproc_daemon.roots[0], "fast")
    os.mkdir(run)
    c = Client(inproc_daemon.socket_path)
    try:
        assert hello(c, "fast", run)["type"] == "welcome"
        for step in (1, 2, 3):
            fd, length = snapshot("fast", step, {"w": struct.pack("<4f", step, 2, 3, 4)})
            try:
                assert (
                    c.ask(
                        {
                            "type": "save",
                            "id": step,
                            "step": step,
                            "trigger": "step",
                            "rule": "r",
                            "filename": f"fast-step{step}.safetensors",
                            "length": length,
                        },
                        fd=fd,
                    )["type"]
                    == "accepted"
                )
                saved = c.recv()
            finally:
                os.close(fd)
            assert saved["ok"] is True, saved
        assert sorted(os.listdir(run)) == ["fast-step2.safetensors", "fast-step3.safetensors"]  # keep_last=2
        assert verify_file(os.path.join(run, "fast-step3.safetensors")).ok
        labels = {"training_job": "fast", "directory": run, "trigger": "step", "outcome": "ok"}
        assert inproc_daemon.metrics.registry.get_sample_value("ckptd_saves_total", labels) == 3
    finally:
        c.close()


def test_a_snapshot_for_another_job_is_refused_before_it_is_written(inproc_daemon) -> None:  # type: ignore[no-untyped-def]
    run = os.path.join(inproc_daemon.roots[0], "liar")
    os.mkdir(run)
    c = Client(inproc_daemon.socket_path)
    try:
        hello(c, "liar", run)
        fd, length = snapshot("victim", 7, {"w": b"\0" * 16})
        try:
            c.ask(
                {
                    "type": "save",
                    "id": 1,
                    "step": 7,
                    "trigger": "step",
                    "rule": "r",
                    "filename": "liar-step7.safetensors",
                    "length": length,
                },
                fd=fd,
            )
            saved = c.recv()
        finally:
            os.close(fd)
        assert saved["ok"] is False and saved["reason"] == "invalid_snapshot"
        assert os.listdir(run) == []
    finally:
        c.close()


def test_every_auto_learns_the_mtbf_from_the_jobs_unclean_exits(inproc_daemon) -> None:  # type: ignore[no-untyped-def]
    """Issue 18: two runs of a job that went away without ``end`` are two failures in the job's
    history; the next run's auto interval is computed from M = (24h + run time) / (1 + 2)."""
    from tests.conftest import wait_until

    run = os.path.join(inproc_daemon.roots[0], "flaky")
    os.mkdir(run)
    settings = {"every": "auto", "keep_last": 2}

    def exits() -> int:
        return sum(1 for _, _, kind, _ in inproc_daemon.catalog.events("flaky") if kind == "disconnect")

    for n in (1, 2):
        c = Client(inproc_daemon.socket_path)
        assert (
            c.ask(
                {
                    "type": "hello",
                    "job": "flaky",
                    "directory": run,
                    "settings": settings,
                    "pid": os.getpid(),
                    "step": 0,
                    "state_bytes": 1 << 30,
                }
            )["type"]
            == "welcome"
        )
        c.close()  # no "end": the trainer died
        wait_until(lambda n=n: exits() == n, 10, "the disconnect to be recorded")
    c = Client(inproc_daemon.socket_path)
    try:
        c.ask(
            {
                "type": "hello",
                "job": "flaky",
                "directory": run,
                "settings": settings,
                "pid": os.getpid(),
                "step": 0,
                "state_bytes": 1 << 30,
            }
        )
        (row,) = c.ask({"type": "status"})["jobs"]
        auto = row["auto"]
        # no save measured yet: C is guessed from the 1 GiB state (1 s), M = 24h / 3 = 8h
        assert auto["rule"] == "young_daly" and "C=1s (guessed from the state size)" in auto["reason"]
        assert "M=8h (2 unclean exits in" in auto["reason"], auto
        labels = {"training_job": "flaky", "directory": run}
        assert inproc_daemon.metrics.registry.get_sample_value("ckptd_auto_interval_seconds", labels) == pytest.approx(
            auto["seconds"], rel=1e-3
        )
        assert inproc_daemon.metrics.registry.get_sample_value("ckptd_expected_loss_seconds", labels) >= 0
    finally:
        c.close()


def test_the_daemon_replicates_only_to_remotes_its_admin_allows(inproc_daemon) -> None:  # type: ignore[no-untyped-def]
    """A client must not point the daemon (its filesystem rights, its AWS credentials) at another
    path or bucket: ``remote`` must be under ``[daemon] remote_allow`` (empty here), or hello is
    refused and the hook replicates by itself, with its own credentials."""
    run = os.path.join(inproc_daemon.roots[0], "sneaky")
    os.mkdir(run)
    for url in ("file:///etc/cron.d", "s3://someone-elses-bucket/prefix"):
        c = Client(inproc_daemon.socket_path)
        try:
            reply = c.ask(
                {
                    "type": "hello",
                    "job": "sneaky",
                    "directory": run,
                    "settings": {"remote": url},
                    "pid": os.getpid(),
                    "step": 0,
                }
            )
        finally:
            c.close()
        assert reply["type"] == "error" and "remote_allow" in reply["error"] and url in reply["error"], reply
    inproc_daemon.access.remote_allow = ["s3://fleet/ckpt"]
    inproc_daemon.access.remote("s3://fleet/ckpt/team")  # under an allowed prefix: fine
    for url in ("s3://fleet/ckpt-other", "s3://fleet/ckpt/../x"):
        with pytest.raises(PermissionError, match="remote_allow"):
            inproc_daemon.access.remote(url)


def test_a_jobs_state_gauges_follow_it_and_go_with_it(inproc_daemon) -> None:  # type: ignore[no-untyped-def]
    """job_up, unsaved_steps, quota_bytes are read from the job registry at scrape time: 1 while
    connected, 0 once it went, and no series at all once the ended job is dropped (an hour on)."""
    import time

    from ckptd.daemon.registry import ENDED_JOB_TTL
    from tests.conftest import wait_until

    run = os.path.join(inproc_daemon.roots[0], "brief")
    os.mkdir(run)
    labels = {"training_job": "brief", "directory": run}
    value = inproc_daemon.metrics.registry.get_sample_value
    c = Client(inproc_daemon.socket_path)
    c.ask(
        {
            "type": "hello",
            "job": "brief",
            "directory": run,
            "pid": os.getpid(),
            "step": 0,
            "settings": {"max_bytes": "1MiB"},
        }
    )
    assert value("ckptd_job_up", labels) == 1 and value("ckptd_quota_bytes", labels) == 1 << 20
    from ckptd.wire import protocol

    protocol.send(c.sock, {"type": "heartbeat", "step": 7})
    wait_until(lambda: value("ckptd_unsaved_steps", labels) == 7, 10, "the heartbeat's step")
    c.close()
    wait_until(lambda: value("ckptd_job_up", labels) == 0, 10, "the disconnect")
    inproc_daemon.tick(time.time() + ENDED_JOB_TTL + 1)
    assert value("ckptd_job_up", labels) is None and value("ckptd_unsaved_steps", labels) is None
    assert value("ckptd_saves_total", {**labels, "trigger": "step", "outcome": "ok"}) is None  # pushed series go too


def test_saves_written_while_the_daemon_was_away_are_catalogued_at_hello(inproc_daemon) -> None:  # type: ignore[no-untyped-def]
    """A trainer that could not reach the daemon saved embedded after the daemon's start-up
    reconcile; when it says hello again, ``ckptd list`` shows those saves too."""
    from ckptd.disk.persist import persist

    run = os.path.join(inproc_daemon.roots[0], "away")
    os.mkdir(run)
    for step in (5, 6):
        fd, length = snapshot("away", step, {"w": struct.pack("<4f", step, 0, 0, 0)})
        try:
            persist(fd, length, run, f"away-step{step}.safetensors")
        finally:
            os.close(fd)
    with Client(inproc_daemon.socket_path) as c:
        assert c.ask({"type": "list", "job": "away"})["checkpoints"] == []  # written after the start-up reconcile
    with Client(inproc_daemon.socket_path) as c:
        assert hello(c, "away", run)["type"] == "welcome"
    with Client(inproc_daemon.socket_path) as c:
        listed = c.ask({"type": "list", "job": "away"})["checkpoints"]
    assert [(r["step"], r["verified"]) for r in listed] == [(5, True), (6, True)], listed


def test_a_rescan_lets_a_unit_still_being_written_settle_and_judges_an_old_one_at_once(inproc_daemon) -> None:  # type: ignore[no-untyped-def]
    """A unit the rescan finds (an inotify event lost or not handled yet) settles counting from
    its last write: one written a moment ago is not judged before ``settle``; one untouched for
    an hour (a tree found at start-up) is judged at the next tick."""
    import time

    import torch
    from safetensors.torch import save_file

    from ckptd.core.config import WatchSpec
    from ckptd.daemon.watch import Context, Watcher

    tree = os.path.join(inproc_daemon.roots[0], "foreign")
    os.makedirs(tree)
    old, fresh = os.path.join(tree, "step-1.safetensors"), os.path.join(tree, "step-2.safetensors")
    save_file({"w": torch.ones(4)}, old)
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    save_file({"w": torch.ones(4)}, fresh)
    ctx = Context(inproc_daemon.catalog, inproc_daemon.ledger, inproc_daemon.roots, time.time(), time.time)
    w = Watcher(WatchSpec(tree, settle=600.0), ctx, lambda _: None)  # no observer: the rescan is all it sees

    def adopted() -> set[str]:
        return {os.path.basename(r.path) for r in inproc_daemon.catalog.checkpoints(*w.key) if r.verified}

    assert w.rescan() == 2
    w.tick(time.time())
    assert adopted() == {"step-1.safetensors"}, "the old unit is judged at once, the fresh one waits"
    w.tick(time.time() + 601)
    assert adopted() == {"step-1.safetensors", "step-2.safetensors"}

"""No dead alerts (issue 34): the series the alert rules need exist, say what is wrong now,
and survive a daemon restart. Real daemon, real trainers, real files."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import torch

from ckptd import __version__
from tests.conftest import PYTHON, ROOT, DaemonProc, project_env, tmpfs_at, wait_until
from trainer_hooks import Checkpointer


def _saved(d: DaemonProc, run: Path, job: str, steps: int, every: int = 2) -> None:
    ckpt = Checkpointer(job, run, model=torch.nn.Linear(4, 4), every_steps=every, socket=d.socket)
    try:
        for _ in range(steps):
            ckpt.step()
        ckpt.wait()
    finally:
        ckpt.close(final=False)


def test_known_corrupt_checkpoints_are_a_gauge_that_survives_a_restart(tmp_path: Path) -> None:
    """The scrub finds a checkpoint that no longer verifies: ckptd_corrupt_checkpoints says 1, and
        still says 1 after the daemon restarts (it comes from the catalogue). Before, the only trace
        was a counter increase, gone with the restart: the file left monitoring. Deleted by hand, it
    leaves the gauge at the next scrub (before, only at a restart: the alert never resolved)."""
    d = DaemonProc(tmp_path / "d", extra_config='scrub_every = "1s"\n').start()
    try:
        run = d.root / "rot"
        _saved(d, run, "rot", 4)
        oldest = run / sorted(p for p in os.listdir(run) if p.endswith(".safetensors"))[0]
        with open(oldest, "r+b") as f:  # bit rot in the tensor data (the last byte)
            f.seek(-1, os.SEEK_END)
            byte = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([byte[0] ^ 0xFF]))
        wait_until(lambda: d.metric("ckptd_corrupt_checkpoints", training_job="rot") == 1, 30, "the scrub")
        assert d.stop() == 0
        d.start()
        assert d.metric("ckptd_corrupt_checkpoints", training_job="rot") == 1
        assert d.metric("ckptd_checkpoints", training_job="rot") == 1
        oldest.unlink()  # the runbook's fix: the next scrub forgets it, no restart needed (CkptdVerifyFailed resolves)
        wait_until(lambda: d.metric("ckptd_corrupt_checkpoints", training_job="rot") == 0, 30, "the scrub to forget it")
        assert d.metric("ckptd_checkpoints", training_job="rot") == 1
    finally:
        d.stop()


def test_a_failing_save_stays_failing_across_a_restart_and_the_run_says_so_at_exit(tmp_path: Path) -> None:
    """A target turned read-only: ckptd_last_failure_timestamp_seconds{reason} is newer than the
    last success (what CkptdSaveFailed compares), after a daemon restart too; the run whose
    final save failed ends with a line saying so."""
    d = DaemonProc(tmp_path / "d")
    with tmpfs_at(d.root, "32m"):
        d.start()
        trainer = None
        try:
            run = d.root / "ro"
            trainer = subprocess.Popen(
                [
                    PYTHON,
                    str(ROOT / "examples" / "train_toy.py"),
                    "--dir",
                    str(run),
                    "--job",
                    "ro",
                    "--steps",
                    "60",
                    "--every-steps",
                    "10",
                    "--step-sleep",
                    "0.1",
                ],
                env=project_env(CKPTD_SOCKET=d.socket),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            wait_until(lambda: d.metric("ckptd_last_saved_step", training_job="ro") >= 10, 180, "a save")
            subprocess.run(["mount", "-o", "remount,ro", str(d.root)], check=True)
            wait_until(
                lambda: (
                    d.metric("ckptd_last_failure_timestamp_seconds", training_job="ro", reason="read_only")
                    > d.metric("ckptd_last_success_timestamp_seconds", training_job="ro")
                ),
                60,
                "a failure",
            )
            _, err = trainer.communicate(timeout=120)
            assert "the final save of step 60 FAILED (read_only" in err.strip().splitlines()[-1], err[-2000:]
            assert d.stop() == 0
            subprocess.run(["mount", "-o", "remount,rw", str(d.root)], check=True)  # fixed; nothing saved since
            d.start()
            failed_at = d.metric("ckptd_last_failure_timestamp_seconds", training_job="ro", reason="read_only")
            assert failed_at > d.metric("ckptd_last_success_timestamp_seconds", training_job="ro") > 0
        finally:
            if trainer is not None and trainer.poll() is None:
                trainer.kill()
                trainer.communicate()
            d.stop()


def test_a_trainer_saving_without_the_daemon_is_seen_within_a_minute(daemon: DaemonProc) -> None:
    """A trainer in embedded mode (its socket refused, or the daemon was down when it started)
    saves under the daemon's roots: the daemon's sweep catalogues its checkpoints and says so
    (ckptd_last_unattended_save_timestamp_seconds, ckptd_last_saved_step)."""
    t0 = time.time()
    ckpt = Checkpointer("alone", daemon.root / "alone", model=torch.nn.Linear(4, 4), every_steps=2, socket=False)
    try:
        for _ in range(4):
            ckpt.step()
        ckpt.wait()
        assert ckpt.mode == "embedded"
        _with_job_name(
            daemon.root / "alone" / "alone-step00000002.safetensors",
            daemon.root / "evil" / "x.safetensors",
            "bad name\n{}" * 20,
        )  # a header written to grow the daemon's series: no label for it
        wait_until(
            lambda: daemon.metric("ckptd_last_unattended_save_timestamp_seconds", training_job="alone") >= t0,
            60,
            "the sweep",
        )
        assert daemon.metric("ckptd_last_saved_step", training_job="alone") == 4
        assert time.time() - t0 < 60
        assert "bad name" not in daemon.metrics()
    finally:
        ckpt.close(final=False)
    assert "saved without the daemon" in daemon.log.read_text()


def _with_job_name(source: Path, dest: Path, job: str) -> None:
    """A copy of a checkpoint whose header names another job (safetensors: 8-byte length, JSON)."""
    import struct

    data = source.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"]["ckptd.job"] = job
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_job_series_carry_the_owner_and_the_hook_version_and_status_is_served(daemon: DaemonProc) -> None:
    """``user`` on job series (routing "your trainer" alerts to its owner), ckptd_hook_info, and
    a read-only /status JSON on the metrics port with the host."""
    from prometheus_client.parser import text_string_to_metric_families

    ckpt = Checkpointer(
        "owned", daemon.root / "owned", model=torch.nn.Linear(4, 4), every_steps=2, socket=daemon.socket
    )
    try:
        for _ in range(2):
            ckpt.step()
        ckpt.wait()
        wait_until(lambda: daemon.metric("ckptd_checkpoints", training_job="owned") == 1, 30, "a save")
        samples = [
            s
            for f in text_string_to_metric_families(daemon.metrics())
            for s in f.samples
            if s.labels.get("training_job") == "owned"
        ]
        assert samples and all(s.labels.get("user") == "root" for s in samples), {
            s.name for s in samples if s.labels.get("user") != "root"
        }
        assert daemon.metric("ckptd_hook_info", training_job="owned", version=__version__) == 1
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}/status", timeout=5) as r:
            status = json.loads(r.read())
        assert status["host"] == os.uname().nodename
        (row,) = [j for j in status["jobs"] if j["job"] == "owned"]
        assert row["connected"] and row["last_verified_step"] == 2
    finally:
        ckpt.close(final=False)

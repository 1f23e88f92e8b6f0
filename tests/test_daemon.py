"""The daemon end to end: real ``ckptd serve``, real sockets, real trainers, real SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from ckptd.disk.scan import scan
from ckptd.disk.verify import verify_file
from ckptd.wire import protocol
from tests.conftest import PYTHON, ROOT, DaemonProc, ckptd_cli, free_port, project_env, run_py, wait_until
from tests.wire_client import Client, snapshot
from trainer_hooks import Checkpointer

pytestmark = pytest.mark.slow
TOY = str(ROOT / "examples" / "train_toy.py")


def env_for(d: DaemonProc) -> dict[str, str]:
    return project_env(CKPTD_SOCKET=d.socket)


def test_a_run_saves_through_the_daemon(daemon: DaemonProc) -> None:
    run_dir = daemon.root / "toy"
    r = subprocess.run(
        [PYTHON, TOY, "--dir", str(run_dir), "--steps", "30", "--every-steps", "10", "--keep-last", "2"],
        env=env_for(daemon),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "connected to the daemon" in r.stderr and "embedded mode" not in r.stderr
    assert [c.step for c in scan(str(run_dir), "toy")] == [20, 30]
    assert daemon.metric("ckptd_saves_total", training_job="toy", trigger="step", outcome="ok") == 2
    assert daemon.metric("ckptd_saves_total", training_job="toy", trigger="final", outcome="ok") == 1
    assert daemon.metric("ckptd_deleted_total", training_job="toy", rule="retention") == 1
    assert daemon.metric("ckptd_last_saved_step", training_job="toy") == 30
    assert daemon.metric("ckptd_checkpoints", training_job="toy") == 2
    assert daemon.metric("ckptd_missed_saves_total", training_job="toy", reason="final_missing") == 0
    status = json.loads(ckptd_cli("status", "--json", "--socket", daemon.socket).stdout)
    assert status[0]["job"] == "toy" and status[0]["last_verified_step"] == 30 and status[0]["checkpoints"] == 2
    latest = ckptd_cli("latest", "toy", "--socket", daemon.socket)
    assert latest.stdout.strip() == str(run_dir / "toy-step00000030.safetensors")
    table = ckptd_cli("status", "--socket", daemon.socket).stdout
    assert "toy" in table and "missed" in table


def test_settings_from_the_trainers_environment_reach_the_daemon(daemon: DaemonProc) -> None:
    """CKPTD_* variables are the trainer's settings as much as its kwargs (kwargs > env): the daemon,
    which runs retention, must apply them too (it used to see the kwargs alone and keep everything)."""
    run_dir = daemon.root / "envjob"
    r = subprocess.run(
        [PYTHON, TOY, "--dir", str(run_dir), "--job", "envjob", "--steps", "40", "--every-steps", "10"],
        env={**env_for(daemon), "CKPTD_KEEP_LAST": "1", "CKPTD_EVERY_STEPS": "5"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "connected to the daemon" in r.stderr
    assert [c.step for c in scan(str(run_dir), "envjob")] == [40]  # keep_last=1 from the environment
    # the kwarg wins over the environment: saves every 10 steps (3 step saves and the final), not every 5
    assert daemon.metric("ckptd_saves_total", training_job="envjob", trigger="step", outcome="ok") == 3
    assert daemon.metric("ckptd_deleted_total", training_job="envjob", rule="retention") == 3


HANDOFF_THEN_DIE = r"""
import os, signal, sys, torch
from trainer_hooks import Checkpointer
model = torch.nn.Linear(2048, 4096)           # 32 MiB: the daemon is still busy when we die
ckpt = Checkpointer("victim", sys.argv[1], model=model, every_steps=3)
ckpt.step(); ckpt.step(); ckpt.step()          # step 3: the snapshot is handed over inside this call
assert ckpt.mode == "daemon"
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_handed_over_checkpoint_survives_its_trainer(daemon: DaemonProc) -> None:
    run_dir = daemon.root / "victim"
    run_dir.mkdir()
    r = subprocess.run(
        [PYTHON, "-c", HANDOFF_THEN_DIE, str(run_dir)], env=env_for(daemon), capture_output=True, text=True, timeout=120
    )
    assert r.returncode == -signal.SIGKILL, r.stderr
    wait_until(lambda: len(scan(str(run_dir), "victim")) == 1, what="the orphaned checkpoint to be persisted")
    path = scan(str(run_dir), "victim")[0].path
    assert verify_file(path).ok
    wait_until(lambda: daemon.metric("ckptd_saves_total", training_job="victim", trigger="step", outcome="ok") == 1)
    # the disconnect is recorded once the in-flight save is done, which is just after it is counted
    wait_until(lambda: daemon.metric("ckptd_job_up", training_job="victim") == 0, 30, "the disconnect")


def test_trainer_killed_with_unsaved_steps_is_counted(daemon: DaemonProc) -> None:
    run_dir = daemon.root / "lost"
    proc = subprocess.Popen(
        [
            PYTHON,
            TOY,
            "--dir",
            str(run_dir),
            "--job",
            "lost",
            "--steps",
            "10000",
            "--every-steps",
            "200",
            "--step-sleep",
            "0.01",
        ],
        env=env_for(daemon),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: daemon.metric("ckptd_last_saved_step", training_job="lost") >= 200, what="a save")
        # a (batched) heartbeat reports steps past the last save
        wait_until(lambda: daemon.metric("ckptd_unsaved_steps", training_job="lost") > 0, what="a heartbeat")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    wait_until(
        lambda: daemon.metric("ckptd_missed_saves_total", training_job="lost", reason="trainer_exit_unsaved") == 1,
        what="trainer_exit_unsaved",
    )
    assert daemon.metric("ckptd_unsaved_steps", training_job="lost") > 0


@pytest.mark.slow
def test_runs_named_alike_in_different_directories_are_two_jobs(daemon: DaemonProc) -> None:
    """A 60-step run in one directory, then a run of the same name elsewhere killed at step >= 36
    with its last save at 30: its own missed save is counted, and nothing mixes the two."""
    first, second = daemon.root / "a", daemon.root / "b"
    r = subprocess.run(
        [PYTHON, TOY, "--dir", str(first), "--job", "same", "--steps", "60", "--every-steps", "30"],
        env=env_for(daemon),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    proc = subprocess.Popen(
        [
            PYTHON,
            TOY,
            "--dir",
            str(second),
            "--job",
            "same",
            "--steps",
            "10000",
            "--every-steps",
            "30",
            "--step-sleep",
            "0.1",
        ],
        env=env_for(daemon),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(
            lambda: daemon.metric("ckptd_last_saved_step", training_job="same", directory=str(second)) >= 30,
            what="the second run's first save",
        )
        wait_until(
            lambda: daemon.metric("ckptd_unsaved_steps", training_job="same", directory=str(second)) > 0,
            what="a heartbeat past it",
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    wait_until(
        lambda: (
            daemon.metric(
                "ckptd_missed_saves_total", training_job="same", directory=str(second), reason="trainer_exit_unsaved"
            )
            == 1
        ),
        what="trainer_exit_unsaved of the second",
    )
    assert daemon.metric("ckptd_last_saved_step", training_job="same", directory=str(first)) == 60
    assert (
        daemon.metric(
            "ckptd_missed_saves_total", training_job="same", directory=str(first), reason="trainer_exit_unsaved"
        )
        == 0
    )
    status = json.loads(ckptd_cli("status", "--json", "--socket", daemon.socket).stdout)
    rows = {j["directory"]: j for j in status if j["job"] == "same"}
    assert set(rows) == {str(first), str(second)}
    assert rows[str(first)]["last_verified_step"] == 60 and rows[str(second)]["last_verified_step"] < 60
    ambiguous = ckptd_cli("latest", "same", "--socket", daemon.socket)
    assert ambiguous.returncode != 0 and "2 jobs are named same" in ambiguous.stderr
    assert ckptd_cli("latest", str(first)).stdout.strip().endswith("same-step00000060.safetensors")


def test_no_daemon_at_start_then_reconnect_then_daemon_killed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = DaemonProc(tmp_path / "d")
    run_dir = d.root / "re"
    model = torch.nn.Linear(64, 64)
    with caplog.at_level("INFO", logger="trainer_hooks"):
        ckpt = Checkpointer("re", run_dir, model=model, every_steps=1, socket=d.socket, reconnect_every=0.2)
    try:
        assert ckpt.mode == "embedded" and any("embedded mode" in m for m in caplog.messages)
        ckpt.step()
        ckpt.wait()
        assert [c.step for c in scan(str(run_dir), "re")] == [1]
        d.start()
        wait_until(lambda: ckpt.mode == "daemon", what="the hook to reconnect")
        ckpt.step()
        ckpt.wait()
        wait_until(lambda: d.metric("ckptd_saves_total", training_job="re", trigger="step", outcome="ok") == 1)
        d.kill(signal.SIGKILL)
        for _ in range(5):  # training goes on; saves land either way
            ckpt.step()
            ckpt.wait()
        wait_until(lambda: ckpt.mode == "embedded", what="the hook to notice")
        ckpt.step()
        ckpt.wait()
        assert sorted(c.step for c in scan(str(run_dir), "re"))[-1] == 8
        assert all(verify_file(c.path).ok for c in scan(str(run_dir), "re"))
        assert sum("lost the daemon" in m for m in caplog.messages) == 1
    finally:
        ckpt.close()
        d.stop()


SLOW_WRITER = r"""
import sys, torch
from trainer_hooks import Checkpointer
big = torch.nn.Linear(4096, 4096)   # 64 MiB per checkpoint
ckpt = Checkpointer("big", sys.argv[1], model=big, every_steps=1, keep_last=2)
print("ready", flush=True)
for i in range(200):
    with torch.no_grad():
        big.weight.add_(1.0)
    ckpt.step()
"""


def test_daemon_sigkilled_mid_persist_recovers_cleanly(tmp_path: Path) -> None:
    d = DaemonProc(tmp_path / "d").start()
    run_dir = d.root / "big"
    run_dir.mkdir()
    trainer = subprocess.Popen(
        [PYTHON, "-c", SLOW_WRITER, str(run_dir)],
        env=env_for(d),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert trainer.stdout is not None and trainer.stdout.readline().strip() == "ready"
        wait_until(lambda: any(".ckptd-tmp." in n for n in os.listdir(run_dir)), what="a write in progress")
        d.kill(signal.SIGKILL)
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
    for c in scan(str(run_dir), "big"):
        assert verify_file(c.path).ok
    d2 = DaemonProc(tmp_path / "d").start()
    try:
        assert not [n for n in os.listdir(run_dir) if ".ckptd-tmp." in n], "temp files left after restart"
        listed = json.loads(ckptd_cli("list", "big", "--json", "--socket", d2.socket).stdout)
        assert sorted(r["path"] for r in listed) == sorted(c.path for c in scan(str(run_dir), "big"))
    finally:
        d2.stop()


def test_catalogue_is_rebuilt_when_missing_or_damaged(daemon: DaemonProc) -> None:
    run_dir = daemon.root / "cat"
    r = subprocess.run(
        [PYTHON, TOY, "--dir", str(run_dir), "--job", "cat", "--steps", "20", "--every-steps", "5"],
        env=env_for(daemon),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    daemon.stop()
    db = daemon.state / "catalog.sqlite"
    for damage in ("delete", "garbage"):
        for suffix in ("", "-wal", "-shm"):
            Path(str(db) + suffix).unlink(missing_ok=True)
        if damage == "garbage":
            db.write_bytes(b"this is not a database" * 100)
        daemon.start()
        listed = json.loads(ckptd_cli("list", "cat", "--json", "--socket", daemon.socket).stdout)
        assert [x["step"] for x in listed] == [5, 10, 15, 20], damage
        assert all(x["verified"] for x in listed)
        assert daemon.metric("ckptd_last_saved_step", training_job="cat") == 20
        daemon.stop()
    assert list(daemon.state.glob("catalog.sqlite.damaged-*"))
    with sqlite3.connect(db) as con:
        assert con.execute("select count(*) from checkpoints").fetchone()[0] == 4
    daemon.start()


CLIENT = r"""
import sys, torch
from trainer_hooks import Checkpointer
torch.manual_seed(int(sys.argv[2]))
m = torch.nn.Linear(256, 256)
ckpt = Checkpointer(f"job{sys.argv[2]}", sys.argv[1], model=m, every_steps=2, total_steps=6, reconnect_every=60)
assert ckpt.mode == "daemon", "not connected"
for _ in range(6):
    ckpt.step()
ckpt.close()
print(ckpt.stats["verified"], ckpt.stats["failed"])
"""


def _wire_trainer(socket_path: str, run: Path, job: str) -> list[str]:
    """What CLIENT does, without torch (``tests.wire_client``): saves at steps 2 and 4, the final
    at 6, then ``end``; returns the ``saved`` replies' outcomes."""
    c = Client(socket_path)
    outcomes = []
    try:
        assert (
            c.ask(
                {
                    "type": "hello",
                    "job": job,
                    "directory": str(run),
                    "pid": os.getpid(),
                    "step": 0,
                    "settings": {"every_steps": 2, "total_steps": 6},
                }
            )["type"]
            == "welcome"
        )
        for step, trigger, rule in ((2, "step", "every_steps"), (4, "step", "every_steps"), (6, "final", "save_final")):
            fd, length = snapshot(job, step, {"w": os.urandom(256 * 1024)}, trigger, rule)
            try:
                assert (
                    c.ask(
                        {
                            "type": "save",
                            "id": step,
                            "step": step,
                            "trigger": trigger,
                            "rule": rule,
                            "filename": f"{job}-step{step:08d}.safetensors",
                            "length": length,
                        },
                        fd=fd,
                    )["type"]
                    == "accepted"
                )
                saved = c.recv()
            finally:
                os.close(fd)
            outcomes.append("ok" if saved.get("ok") else str(saved))
        protocol.send(c.sock, {"type": "end", "step": 6})
    finally:
        c.close()
    return outcomes


def test_32_concurrent_clients_lose_nothing(daemon: DaemonProc) -> None:
    """32 trainers at once: two real ones (torch, the hook, separate processes) and 30 that speak
    the protocol without torch from threads of this process (real socket, real memfds, the same
    daemon): every save of every one is written, verified and counted."""
    procs = []
    for i in range(32):
        (daemon.root / f"job{i}").mkdir()
    for i in range(2):
        procs.append(
            subprocess.Popen(
                [PYTHON, "-c", CLIENT, str(daemon.root / f"job{i}"), str(i)],
                env=env_for(daemon),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    with ThreadPoolExecutor(30) as pool:
        wire = [pool.submit(_wire_trainer, daemon.socket, daemon.root / f"job{i}", f"job{i}") for i in range(2, 32)]
        for i, p in enumerate(procs):
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
            assert out.split() == ["3", "0"], (i, out, err)
        for i, f in enumerate(wire, start=2):
            assert f.result(timeout=300) == ["ok", "ok", "ok"], i
    for i in range(32):
        steps = [c.step for c in scan(str(daemon.root / f"job{i}"), f"job{i}")]
        assert steps == [2, 4, 6], (i, steps)
        assert all(verify_file(c.path).ok for c in scan(str(daemon.root / f"job{i}"), f"job{i}"))
        assert daemon.metric("ckptd_saves_total", training_job=f"job{i}", trigger="final", outcome="ok") == 1


OTHER_UID = r"""
import os, sys
from ckptd.wire.client import request
os.setgid(65534); os.setuid(65534)   # imports first: nobody cannot read root's Python
print(request(sys.argv[1], {"type": "hello", "job": sys.argv[2], "directory": sys.argv[3], "settings": {},
                            "pid": os.getpid(), "step": 0}).get("error"))
"""


def test_identity_comes_from_the_kernel_and_is_enforced(tmp_path: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="ckptd-uid-", dir="/tmp"))  # traversable by uid 65534
    os.chmod(base, 0o755)
    daemon = DaemonProc(base / "d").start()
    try:
        mine = daemon.root / "mine"
        ckpt = Checkpointer("owned", mine, model=torch.nn.Linear(2, 2), socket=daemon.socket)
        ckpt.close()
        for p in (base / "d", base / "d" / "run"):
            os.chmod(p, 0o755)
        os.chmod(daemon.socket, 0o666)
        nobody_dir = daemon.root / "nobody"
        nobody_dir.mkdir()
        os.chown(nobody_dir, 65534, 65534)

        def as_nobody(job: str, directory: Path | str) -> str:
            r = run_py("-c", OTHER_UID, daemon.socket, job, str(directory))
            assert r.returncode == 0, r.stderr
            return r.stdout.strip()

        # a job is its directory and owner (SPEC §3): root's job name in nobody's own directory is nobody's job
        assert as_nobody("owned", nobody_dir) == "None"
        assert "is not a directory of uid 65534" in as_nobody("fresh", mine)
        assert "outside the daemon's roots" in as_nobody("fresh", tmp_path)
        assert "'..'" in as_nobody("fresh", str(daemon.root) + "/nobody/../mine")
        assert as_nobody("fresh", nobody_dir) == "None"  # its own directory, a new job: welcome
        assert daemon.healthy()
    finally:
        daemon.stop()
        shutil.rmtree(base, ignore_errors=True)


def raw_client(d: DaemonProc, job: str, settings: dict) -> socket.socket:  # type: ignore[type-arg]
    run = d.root / job
    run.mkdir(exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(d.socket)
    protocol.send(s, {"type": "hello", "job": job, "directory": str(run), "settings": settings, "pid": 1, "step": 0})
    assert protocol.recv(s)[0]["type"] == "welcome"
    return s


def test_step_skipped_and_final_missing_are_counted(daemon: DaemonProc) -> None:
    s = raw_client(daemon, "skippy", {"every_steps": 10, "total_steps": 25})
    try:
        protocol.send(s, {"type": "heartbeat", "step": 25})
        wait_until(lambda: daemon.metric("ckptd_missed_saves_total", training_job="skippy", reason="step_skipped") == 1)
        protocol.send(s, {"type": "end", "step": 25})
        assert protocol.recv(s)[0]["type"] == "bye"
        assert daemon.metric("ckptd_missed_saves_total", training_job="skippy", reason="final_missing") == 1
    finally:
        s.close()


def test_backpressure_skip_is_counted(daemon: DaemonProc) -> None:
    big = torch.nn.Linear(2048, 2048)
    ckpt = Checkpointer(
        "bp", daemon.root / "bp", model=big, every_steps=1, on_busy="skip", save_final=False, socket=daemon.socket
    )
    try:
        for _ in range(6):
            ckpt.step()
    finally:
        ckpt.close()
    assert ckpt.stats["skipped"] >= 1
    wait_until(
        lambda: (
            daemon.metric("ckptd_missed_saves_total", training_job="bp", reason="backpressure") == ckpt.stats["skipped"]
        ),
        what="backpressure count",
    )


def test_the_daemon_sends_due_for_time_rules(daemon: DaemonProc) -> None:
    s = raw_client(daemon, "timely", {"every": "1s"})
    try:
        protocol.send(s, {"type": "heartbeat", "step": 1})
        msg, _ = protocol.recv(s)
        assert msg == {"type": "due", "rule": "every"}
    finally:
        s.close()


def test_gc_and_pin_through_the_daemon(daemon: DaemonProc) -> None:
    run = daemon.root / "gcjob"
    ckpt = Checkpointer("gcjob", run, model=torch.nn.Linear(4, 4), every_steps=1, socket=daemon.socket)
    for _ in range(4):
        ckpt.step()
    ckpt.close(final=False)
    first = scan(str(run), "gcjob")[0].path
    env_socket = ["--socket", daemon.socket]
    pinned = subprocess.run(
        [PYTHON, "-m", "ckptd.cli", "pin", first], capture_output=True, text=True, env={**env_for(daemon)}
    )
    assert pinned.returncode == 0, pinned.stderr
    rows = {r["path"]: r for r in json.loads(ckptd_cli("list", "gcjob", "--json", *env_socket).stdout)}
    assert rows[first]["pinned"] is True
    dry = ckptd_cli("gc", "gcjob", "--dry-run", *env_socket)
    assert dry.returncode == 0 and "0 of 4 to delete" in dry.stdout  # no keep rules for this job: nothing goes


GROWING = r"""
import os, sys, time, torch
from trainer_hooks import Checkpointer
model = torch.nn.Linear(64, 64)
extra = {"ballast": torch.zeros(16)}
stop = sys.argv[2]  # the test creates it once it has seen the saves it needs, however slow the machine
ckpt = Checkpointer("grow", sys.argv[1], model=model, extra=extra, every="auto", mtbf="30s",
                    max_overhead="0.5%", keep_last=2)
assert ckpt.mode == "daemon"
end = time.time() + 5
while time.time() < end:
    ckpt.step(); time.sleep(0.005)
print("GROW", flush=True)
extra["ballast"] = torch.randn(64 << 20)           # 256 MiB more state: each save now stalls far longer
while not os.path.exists(stop):
    ckpt.step(); time.sleep(0.005)
ckpt.close()
"""


def _time_save_gaps(daemon: DaemonProc, job: str) -> list[tuple[float, float]]:
    """(when, seconds since the previous) for each verified time-triggered save, from the catalogue's events."""
    with sqlite3.connect(daemon.state / "catalog.sqlite") as db:
        rows = db.execute("SELECT time, detail FROM events WHERE job = ? AND kind = 'saved' ORDER BY id", (job,))
        times = [t for t, detail in rows if json.loads(detail).get("trigger") == "time"]
    return [(b, b - a) for a, b in zip(times, times[1:])]


def _gaps_since(daemon: DaemonProc, since: float) -> list[float]:
    """The gaps between time saves that both came after ``since``."""
    return [g for t, g in _time_save_gaps(daemon, "grow") if t - g > since]


@pytest.mark.serial
def test_every_auto_widens_the_interval_when_saves_grow_costly(daemon: DaemonProc) -> None:
    """Issue 18: the daemon chooses the interval from the stalls it is told of; a state that
    grows 256 MiB mid-run makes each save cost more, and the interval widens with it. With
    max_overhead at 0.5% the overhead bound (linear in the stall) decides once saves are costly."""
    run, stop = daemon.root / "grow", daemon.root.parent / "grow.stop"
    run.mkdir()
    proc = subprocess.Popen(
        [PYTHON, "-c", GROWING, str(run), str(stop)],
        env=env_for(daemon),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "GROW"
        small = daemon.metric("ckptd_auto_interval_seconds", training_job="grow")
        assert 0 < small < 2.0  # a 16 KiB state: a few ms per save, so well under a second
        assert daemon.metric("ckptd_expected_loss_seconds", training_job="grow") < 5.0
        status = ckptd_cli("status", "--socket", daemon.socket).stdout
        assert "every=auto: a save every" in status and "M=30s" in status
        switched = _time_save_gaps(daemon, "grow")[-1][0]
        # the median of the stalls moves over several costly saves; then two whole gaps at the new interval
        # (the daemon ticks once a second, so a sub-second interval is a save a second)
        wider = 3 * max(small, 1.0)
        wait_until(lambda: daemon.metric("ckptd_auto_interval_seconds", training_job="grow") > wider, 90, "wider")
        widened = time.time()
        wait_until(lambda: len(_gaps_since(daemon, widened)) >= 2, 90, "two saves at the wider interval")
        stop.touch()
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    large = daemon.metric("ckptd_auto_interval_seconds", training_job="grow")
    assert large > 4 * small, (small, large)
    auto = json.loads(ckptd_cli("status", "--json", "--socket", daemon.socket).stdout)[0]["auto"]
    assert auto["rule"] == "max_overhead" and "raised to the max_overhead bound" in auto["reason"], auto
    gaps = _time_save_gaps(daemon, "grow")
    before = [g for t, g in gaps if t <= switched]
    after = _gaps_since(daemon, widened)
    assert len(before) >= 3 and len(after) >= 2, gaps
    assert min(after) > 2.5 * max(sorted(before)[len(before) // 2], 1.0), gaps  # the daemon ticks once a second
    # the overhead gauge is the stalls the hook reported over the time the job ran (its one-off first
    # save into a grown buffer included: the bound steers the interval, it cannot undo a spike)
    stalled = daemon.metric("ckptd_save_duration_seconds_sum", training_job="grow", phase="stall")
    with sqlite3.connect(daemon.state / "catalog.sqlite") as db:
        (ran,) = db.execute(
            "SELECT max(time) - min(time) FROM events WHERE job = 'grow' AND kind IN ('start', 'end')"
        ).fetchone()
    assert daemon.metric("ckptd_save_overhead_ratio", training_job="grow") == pytest.approx(stalled / ran, rel=0.1)
    assert verify_file(str(scan(str(run), "grow")[-1].path)).ok


def healthy(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


AS_NOBODY_SERVE = r"""
import os, sys
# imports first: nobody cannot read root's Python (what serve imports lazily is imported here)
import ckptd.cli, ckptd.daemon.app, ckptd.daemon.watch, encodings.idna, encodings.ascii, encodings.latin_1, importlib.metadata, sqlite3, zoneinfo
import apscheduler.schedulers.background, apscheduler.triggers.interval, apscheduler.triggers.cron, tzlocal
os.setgid(65534); os.setuid(65534)
sys.argv = ["ckptd", "serve", "--config", sys.argv[1]]
ckptd.cli.main()
"""


@pytest.mark.slow
def test_a_users_daemon_keeps_its_catalogue_in_its_own_state_directory(tmp_path: Path) -> None:
    """``ckptd serve`` with a user's own config and no state_dir: the catalogue goes to the user's
    XDG state directory, not /var/lib/ckptd (a system directory a user's daemon must not write)."""
    from ckptd.core.config import default_state_dir

    assert default_state_dir(0, {}, "/root") == "/var/lib/ckptd"
    assert default_state_dir(1000, {"STATE_DIRECTORY": "/var/lib/ckptd"}, "/h") == "/var/lib/ckptd"
    assert default_state_dir(1000, {"XDG_STATE_HOME": "/x"}, "/h") == "/x/ckptd"
    base = Path(tempfile.mkdtemp(prefix="ckptd-user-", dir="/tmp"))  # traversable by uid 65534
    os.chmod(base, 0o755)
    try:
        home, root, run = base / "home", base / "roots", base / "run"
        for d in (home, root, run):
            d.mkdir()
            os.chown(d, 65534, 65534)
        port = free_port()
        config = base / "mine.toml"
        config.write_text(
            f'[daemon]\nsocket = "{run}/ckptd.sock"\nmetrics_listen = "127.0.0.1:{port}"\nroots = ["{root}"]\n'
        )
        env = {k: v for k, v in project_env(HOME=str(home)).items() if k not in ("XDG_STATE_HOME", "STATE_DIRECTORY")}
        proc = subprocess.Popen(
            [PYTHON, "-c", AS_NOBODY_SERVE, str(config)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            catalog = home / ".local" / "state" / "ckptd" / "catalog.sqlite"
            wait_until(lambda: healthy(port) or proc.poll() is not None, 60, "the daemon up")
            assert proc.poll() is None, proc.communicate()[0]
            assert catalog.stat().st_uid == 65534
        finally:
            proc.terminate()
            out = proc.communicate(timeout=60)[0]
        assert "Traceback" not in out, out
        config.write_text(config.read_text() + f'state_dir = "{base}/not-mine"\n')
        os.chmod(base, 0o755)
        refused = subprocess.run(
            [PYTHON, "-c", AS_NOBODY_SERVE, str(config)], env=env, capture_output=True, text=True, timeout=60
        )
        assert refused.returncode != 0 and f"state_dir {base}/not-mine" in refused.stderr, refused.stderr
        assert "may write" in refused.stderr and "Traceback" not in refused.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)

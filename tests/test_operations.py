"""Operating the daemon as a platform engineer does (issue 34, "Operations"): one daemon per
socket and state directory, ``systemctl reload`` (SIGHUP), ``serve --check``, journald
priorities, the lines a connect, an end and a stop leave, and a ``status`` that says what
on-call asks first and survives a restart. Real daemons, real signals, real sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from ckptd.wire import protocol
from tests.conftest import PYTHON, DaemonProc, ckptd_cli, project_env, wait_until
from tests.wire_client import Client, snapshot


def hello(c: Client, job: str, directory: str, **settings: object) -> dict:  # type: ignore[type-arg]
    return c.ask(
        {"type": "hello", "job": job, "directory": directory, "settings": settings, "pid": os.getpid(), "step": 0}
    )


def save(c: Client, job: str, step: int, claimed: str | None = None) -> dict:  # type: ignore[type-arg]
    """A save of ``job``'s state at ``step``, under the file name of ``claimed`` (default: ``job``)."""
    fd, length = snapshot(job, step, {"w": struct.pack("<4f", step, 2, 3, 4)})
    try:
        assert (
            c.ask(
                {
                    "type": "save",
                    "id": step,
                    "step": step,
                    "trigger": "step",
                    "rule": "r",
                    "filename": f"{claimed or job}-step{step:08d}.safetensors",
                    "length": length,
                },
                fd=fd,
            )["type"]
            == "accepted"
        )
        return c.recv()
    finally:
        os.close(fd)


def serve(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "ckptd.cli", "serve", "--config", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        env=project_env(),
    )


def test_a_second_daemon_on_the_same_socket_or_state_dir_refuses_and_leaves_the_first_serving(tmp_path: Path) -> None:
    d = DaemonProc(tmp_path / "d").start()
    try:
        second = serve(d.config)  # same socket, same state dir
        assert second.returncode != 0
        assert "already serving" in second.stderr and str(d.proc.pid) in second.stderr, second.stderr  # type: ignore[union-attr]
        other_state = tmp_path / "other.toml"
        other_state.write_text(d.config.read_text().replace(str(d.state), str(tmp_path / "state2")))
        third = serve(other_state)  # same socket only
        assert third.returncode != 0 and f"socket {d.socket}" in third.stderr, third.stderr
        assert os.path.exists(d.socket), "a refused daemon removed the live one's socket"
        r = ckptd_cli("status", "--json", "--socket", d.socket)
        assert r.returncode == 0, r.stderr
        assert d.healthy()
    finally:
        assert d.stop() == 0


def test_serve_check_validates_a_config_without_starting(tmp_path: Path) -> None:
    root = tmp_path / "roots"
    root.mkdir()
    good = tmp_path / "good.toml"
    good.write_text(
        f'[daemon]\nsocket = "{tmp_path}/run/s.sock"\nstate_dir = "{tmp_path}/state"\nroots = ["{root}"]\n'
        "[defaults]\nkeep_last = 3\n"
    )
    r = serve(good, "--check")
    assert r.returncode == 0 and "valid" in r.stdout, r.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "state").exists(), "--check bound or wrote something"
    typo = tmp_path / "typo.toml"
    typo.write_text(good.read_text().replace("keep_last", "keep_lats"))
    r = serve(typo, "--check")
    assert r.returncode != 0 and "keep_lats" in r.stderr, r.stderr
    gone = tmp_path / "gone.toml"
    gone.write_text(good.read_text().replace(str(root), str(tmp_path / "nowhere")))
    r = serve(gone, "--check")
    assert r.returncode != 0 and "nowhere" in r.stderr and "does not exist" in r.stderr, r.stderr


def test_sighup_reloads_retention_for_a_connected_trainer_and_a_bad_file_changes_nothing(tmp_path: Path) -> None:
    d = DaemonProc(tmp_path / "d", "[defaults]\nkeep_last = 5\n").start()
    run = d.root / "job"
    run.mkdir()
    try:
        with Client(d.socket) as c:
            assert hello(c, "job", str(run))["type"] == "welcome"
            for step in (1, 2, 3):
                assert save(c, "job", step)["ok"] is True
            assert len(list(run.glob("*.safetensors"))) == 3
            d.config.write_text(d.config.read_text().replace("keep_last = 5", "keep_last = 1"))
            os.kill(d.proc.pid, signal.SIGHUP)  # type: ignore[union-attr]
            wait_until(lambda: "reloaded" in d.log.read_text(), 30, "the reload line")
            assert save(c, "job", 4)["ok"] is True, "the trainer's connection survived the reload"
            assert sorted(p.name for p in run.glob("*.safetensors")) == ["job-step00000004.safetensors"]
            d.config.write_text(d.config.read_text() + "[defaults.bad\n")
            os.kill(d.proc.pid, signal.SIGHUP)  # type: ignore[union-attr]
            wait_until(lambda: "reload refused" in d.log.read_text(), 30, "the refusal")
            assert save(c, "job", 5)["ok"] is True and d.healthy()
        # the trainer has gone when the daemon says so, not when its socket closed: stopping at once
        # would race the session's own end (CI's loaded run stopped first and logged "1 connected")
        wait_until(lambda: not _connected(d), 30, "the daemon to see the trainer go")
        log = d.log.read_text()
        assert "connected at step 0" in log and "keep_last=5" in log, log[-2000:]
    finally:
        assert d.stop() == 0
    log = d.log.read_text()
    assert "ckptd stopping: 0 trainers connected" in log and "ckptd stopped" in log


def test_under_journald_each_line_carries_its_priority(tmp_path: Path) -> None:
    journal = tmp_path / "journal.sock"
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(journal))
    sink.settimeout(30)
    d = DaemonProc(tmp_path / "d", env={"CKPTD_JOURNAL_SOCKET": str(journal)})
    d.log.touch()
    st = os.stat(d.log)
    d.env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"  # stderr is "the journal stream" systemd would connect
    d.start()
    try:
        d.config.write_text("this is not toml [")
        os.kill(d.proc.pid, signal.SIGHUP)  # type: ignore[union-attr]
        seen: list[dict[str, str]] = []
        wait_until(
            lambda: _received(sink, seen) and any(f.get("PRIORITY") == "3" for f in seen),
            30,
            "an error record at priority 3",
        )
        error = next(f for f in seen if f.get("PRIORITY") == "3")
        assert "reload refused" in error["MESSAGE"] and error["SYSLOG_IDENTIFIER"] == "ckptd"
        assert any(f.get("PRIORITY") == "6" and "ckptd serving" in f["MESSAGE"] for f in seen)
    finally:
        d.stop()
        sink.close()
    assert "reload refused" not in d.log.read_text(), "records went to the journal socket, not as plain lines"


def _connected(d: DaemonProc) -> bool:
    r = ckptd_cli("status", "--json", "--socket", d.socket)
    return any(j["connected"] for j in json.loads(r.stdout)) if r.returncode == 0 else True


def _received(sink: socket.socket, seen: list[dict[str, str]]) -> bool:
    data = sink.recv(65536)
    seen.append(dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line))
    return True


@pytest.mark.slow
def test_status_says_state_last_error_and_counts_that_survive_a_restart(tmp_path: Path) -> None:
    d = DaemonProc(tmp_path / "d").start()
    run = d.root / "job"
    run.mkdir()
    try:
        with Client(d.socket) as c:
            assert hello(c, "job", str(run), every_steps=1, max_bytes="1GiB")["type"] == "welcome"
            assert save(c, "job", 1)["ok"] is True
            assert (
                save(c, "other", 2, claimed="job")["ok"] is False
            )  # a snapshot of another job: refused, a failed save
            protocol.send(c.sock, {"type": "heartbeat", "step": 5})  # steps 3 and 4 were due and went by
        wait_until(
            lambda: "went away" in d.log.read_text() or "ended its run" in d.log.read_text() or not _connected(d),
            30,
            "the daemon to see the trainer go",
        )
        d.stop()
        d.start()
        r = ckptd_cli("status", "--json", "--socket", d.socket)
        assert r.returncode == 0, r.stderr
        row = next(j for j in json.loads(r.stdout) if j["job"] == "job")
        assert row["state"] == "disconnected", row
        assert row["failed_total"] == 1 and row["missed_total"] >= 1, row
        assert row["last_error"]["reason"] and row["last_error"]["error"], row
        assert row["quota_bytes"] == 1 << 30 and row["quota_used"] is not None, row
        table = ckptd_cli("status", "--socket", d.socket).stdout
        assert "state disconnected" in table and "last error" in table and "quota" in table, table
    finally:
        d.stop()


@pytest.mark.slow
def test_gc_of_a_daemons_directory_goes_through_it_and_keeps_what_is_not_yet_remote(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.write_text("not a directory: every upload fails, and the checkpoints stay pending")
    d = DaemonProc(tmp_path / "d")
    d.config.write_text(d.config.read_text().replace("[daemon]\n", f'[daemon]\nremote_allow = ["file://{store}"]\n'))
    d.start()
    run = d.root / "job"
    run.mkdir()
    try:
        with Client(d.socket) as c:
            assert hello(c, "job", str(run), keep_last=1, remote=f"file://{store}/job")["type"] == "welcome"
            for step in (1, 2, 3):
                assert save(c, "job", step)["ok"] is True
            r = ckptd_cli("gc", str(run), "--keep-last", "1", "--dry-run", "--json", "--socket", d.socket)
            assert r.returncode == 0, r.stderr
            verdicts = json.loads(r.stdout)
            assert len(verdicts) == 3 and all(v["keep"] for v in verdicts), verdicts
            assert "applies the job's own settings" in r.stderr, r.stderr
            assert all("remote_pending" in v["reasons"] for v in verdicts if v["step"] < 3), verdicts
            r = ckptd_cli("gc", str(run), "--keep-last", "1", "--socket", d.socket)
            assert r.returncode == 0, r.stderr
            assert len(list(run.glob("*.safetensors"))) == 3, "gc deleted checkpoints that are not remote yet"
    finally:
        d.stop()

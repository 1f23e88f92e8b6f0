"""A hostile local user against the daemon and watch mode (docs/security.md).

Each test is an attack that worked before its fix, run for real: a second unix user
(uid 65534, and a group made for the test) talking to a real daemon over its socket,
symlinks swapped under a running daemon, FIFOs, pickles that would run code. Tests
that need a second user need root to make one and are skipped (visibly) without it.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pickle
import resource
import shutil
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from ckptd.disk.remove import RemovalError, remove
from ckptd.wire import protocol
from tests.conftest import PYTHON, ROOT, DaemonProc, ckptd_cli, free_port, project_env, run_py, wait_until
from tests.helpers import small_checkpoint

NOBODY = 65534


as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second unix user")


def start_daemon(base: Path, extra: str = "") -> DaemonProc:
    d = DaemonProc(base / "d", extra)
    d.start()
    for p in (base / "d", base / "d" / "run", d.root):
        os.chmod(p, 0o755)
    os.chmod(d.socket, 0o666)
    return d


def hostile(attack: str, d: DaemonProc, **args: Any) -> dict[str, Any]:
    r = run_py(str(ROOT / "tests" / "scripts" / "hostile.py"), attack, d.socket, json.dumps(args), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def nobody_dir(d: DaemonProc, name: str) -> Path:
    """A directory of uid 65534 in a sticky, world-writable part of the root (a shared tree)."""
    shared = d.root / "shared"
    shared.mkdir(exist_ok=True)
    os.chmod(shared, 0o1777)
    mine = shared / name
    mine.mkdir()
    os.chown(mine, NOBODY, NOBODY)
    return mine


def evil_pickle(sentinel: Path) -> bytes:
    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {sentinel}",))

    return pickle.dumps(Payload())


@pytest.mark.slow
def test_watch_never_unpickles_code_from_a_dcp_metadata_file(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    sentinel = tmp_path / "pwned"
    tree = tmp_path / "d" / "roots" / "tree"
    d = DaemonProc(tmp_path / "d", f'[[watch]]\npath = "{tree}"\njob = "w"\nsettle = "0.2s"\n')
    tree.mkdir()
    dcp.save({"w": torch.ones(3)}, checkpoint_id=str(tree / "good-step1"), no_dist=True)
    (tree / "evil-step2").mkdir()
    (tree / "evil-step2" / ".metadata").write_bytes(evil_pickle(sentinel))
    d.start()
    try:
        wait_until(lambda: d.metric("ckptd_verify_total", training_job="w", outcome="unsafe") == 1, 30, "evil judged")
        wait_until(
            lambda: d.metric("ckptd_verify_total", training_job="w", outcome="ok") == 1,
            30,
            "the real DCP checkpoint to verify",
        )
        assert not sentinel.exists(), "the .metadata pickle ran code in the daemon"
        assert (tree / "evil-step2" / ".metadata").exists(), "an unsafe checkpoint is kept, not deleted"
    finally:
        d.stop()
    assert not sentinel.exists()


def test_a_directory_swapped_for_a_link_mid_gc_never_lets_a_deletion_escape(tmp_path: Path) -> None:
    """The race that deleted outside the roots: flip a middle directory between a real one
    and a symlink to a tree outside while deletions run."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    (outside / "a").mkdir(parents=True)
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            try:
                os.rename(root / "a", root / "a.real")
                os.symlink(outside / "a", root / "a")
                os.unlink(root / "a")
                os.rename(root / "a.real", root / "a")
            except OSError:
                pass

    t = threading.Thread(target=flip)
    t.start()
    deadline = time.monotonic() + 1.5
    try:
        while time.monotonic() < deadline:
            for base in (root / "a", root / "a.real", outside / "a"):
                try:
                    (base / "x.safetensors").write_bytes(b"x")
                except OSError:
                    pass
            try:
                remove(str(root / "a" / "x.safetensors"), [str(root)])
            except RemovalError:
                pass
            assert (outside / "a" / "x.safetensors").exists(), "a deletion followed a swapped-in symlink"
    finally:
        stop.set()
        t.join()


@as_root
@pytest.mark.slow
def test_a_job_directory_swapped_for_a_link_after_hello_is_not_followed(open_base: Path) -> None:
    d = start_daemon(open_base)
    try:
        secret = open_base / "secret"  # root's, 0700, outside the roots
        secret.mkdir(mode=0o700)
        mine = nobody_dir(d, "bob")
        seen = hostile("swap_dir", d, job="bob", dir=str(mine), target=str(secret))
        assert seen["welcome"] == "welcome"
        saved = seen["replies"][-1]
        assert saved["type"] == "saved" and saved["ok"] is False and saved["reason"] == "permission", saved
        assert os.listdir(secret) == [], "the daemon wrote through the symlink"
        assert d.healthy()
    finally:
        d.stop()


def test_quarantine_dir_outside_the_roots_is_refused_at_hello(daemon: DaemonProc, tmp_path: Path) -> None:
    run = daemon.root / "q"
    run.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(daemon.socket)
        protocol.send(
            s,
            {
                "type": "hello",
                "job": "q",
                "directory": str(run),
                "pid": 1,
                "step": 0,
                "settings": {"quarantine_dir": str(tmp_path / "elsewhere")},
            },
        )
        reply = protocol.recv(s)[0]
    assert reply["type"] == "error" and "outside the daemon's roots" in reply["error"]
    assert not (tmp_path / "elsewhere").exists()


@as_root
@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.002, 0.02])
def test_a_client_cannot_kill_the_daemon_by_shrinking_its_memfd(open_base: Path, delay: float) -> None:
    d = start_daemon(open_base)
    try:
        mine = nobody_dir(d, "shrinker")
        seen = hostile("shrink", d, job="shrinker", dir=str(mine), mib=64, delay=delay)
        assert seen["reply"]["type"] == "error" and "F_SEAL_SHRINK" in seen["reply"]["error"], seen
        assert seen["sealed_shrinkable"] is False  # what the hook sends cannot be shrunk at all
        time.sleep(0.3)
        assert d.proc is not None and d.proc.poll() is None, "the daemon died"
        assert d.healthy()
    finally:
        d.stop()


@pytest.mark.slow
def test_running_out_of_descriptors_does_not_kill_the_socket(tmp_path: Path) -> None:
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96))

    d = DaemonProc(tmp_path / "d", preexec=low_limit)
    d.start()
    try:
        idle = []
        for _ in range(150):  # past the daemon's 96 descriptors: accept() fails with EMFILE
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(d.socket)
            idle.append(s)
        # held open until accept() has met EMFILE (a fixed pause could end before the daemon got there)
        wait_until(lambda: "accepting on" in d.log.read_text(), 30, "accept() to run out of descriptors")
        for s in idle:
            s.close()
        wait_until(lambda: ckptd_cli("status", "--socket", d.socket).returncode == 0, 30, "the socket to answer again")
        assert d.healthy()
        assert "accepting on" in d.log.read_text()
    finally:
        d.stop()


@as_root
@pytest.mark.slow
def test_per_uid_connection_cap(open_base: Path) -> None:
    d = start_daemon(open_base, "max_connections_per_uid = 8\n")
    try:
        seen = hostile("connections", d, n=11)
        assert all("max_connections_per_uid" in e for e in seen["last_three"]), seen
        assert d.healthy()
        assert ckptd_cli("status", "--socket", d.socket).returncode == 0  # root is not capped
    finally:
        d.stop()


@pytest.fixture
def testgroup() -> Iterator[str]:
    name = "ckptdsec"
    subprocess.run(["groupadd", "-f", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["groupdel", name], check=False)


@as_root
@pytest.mark.slow
def test_a_group_members_effective_gid_grants_no_admin_rights(open_base: Path, testgroup: str) -> None:
    gid = grp.getgrnam(testgroup).gr_gid
    d = start_daemon(open_base, f'group = "{testgroup}"\nadmin_group = "{testgroup}"\n')
    try:
        from trainer_hooks import Checkpointer

        victim_dir = d.root / "victim"
        ckpt = Checkpointer("victim", victim_dir, model=torch.nn.Linear(2, 2), socket=d.socket, keep_last=1)
        ckpt.close()
        victim_file = str(next(victim_dir.glob("*.safetensors")))
        # uid 65534 with the admin group as its (effective) gid, as `sg` gives it: not a member
        seen = hostile("admin", d, egid=gid, victim="victim", victim_file=victim_file)
        assert "victim" not in seen["status"], seen
        assert seen["gc"]["ok"] and seen["gc"]["verdicts"] == []
        assert seen["pin"]["ok"] is False
        assert not Path(victim_file).with_name(f".{Path(victim_file).name}.pinned").exists()
        # a real member of admin_group is an admin
        subprocess.run(["usermod", "-a", "-G", testgroup, "nobody"], check=True)
        try:
            seen = hostile("admin", d, egid=gid, victim="victim", victim_file=victim_file)
            assert "victim" in seen["status"] and seen["pin"]["ok"] is True, seen
        finally:
            subprocess.run(["gpasswd", "-d", "nobody", testgroup], check=False, capture_output=True)
    finally:
        d.stop()


@pytest.mark.slow
def test_a_fifo_named_like_a_checkpoint_blocks_nothing(daemon: DaemonProc) -> None:

    run = daemon.root / "fifo"
    run.mkdir()
    os.mkfifo(run / "fifo-step00000001.safetensors")
    os.mkfifo(run / "ckptd-manifest.json")
    r = run_py(
        "-c",
        f"""
from trainer_hooks import Checkpointer
import torch
c = Checkpointer("fifo", {str(run)!r}, model=torch.nn.Linear(2, 2), socket={daemon.socket!r}, every_steps=1,
                 keep_last=1)
for _ in range(3):
    c.step()
c.close()
print(c.mode, c.stats["verified"])
""",
        timeout=60,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-1] == "3", r.stdout
    os.mkfifo(run / "fifo-step00000009.safetensors")  # a fresh one, for the CLI's own scan
    listing = ckptd_cli("list", str(run), "--json", timeout=30)
    assert listing.returncode == 0, listing.stderr
    problems = {Path(c["path"]).name: c["problem"] for c in json.loads(listing.stdout) if c["problem"]}
    assert "not a regular file" in problems["fifo-step00000009.safetensors"]
    assert daemon.healthy()


def test_infinite_and_nan_values_are_rejected_with_the_key_named(tmp_path: Path) -> None:
    r = ckptd_cli("plan", "--total-steps", "100", "--every-epochs", "inf", "--steps-per-epoch", "10")
    assert r.returncode == 2 and "every_epochs" in r.stderr and "Traceback" not in r.stderr
    cfg = tmp_path / "c.toml"
    for value in ("inf", "nan"):
        cfg.write_text(f'[daemon]\nroots = ["{tmp_path}"]\n[defaults]\nevery = {value}\n')
        r = ckptd_cli("serve", "--config", str(cfg), timeout=30)
        assert r.returncode != 0 and "every" in r.stderr and "Traceback" not in r.stderr, r.stderr
    from ckptd.core.units import parse_size

    with pytest.raises(ValueError):
        parse_size("5i")


@as_root
@pytest.mark.slow
def test_retention_in_a_shared_watched_tree_never_crosses_owners(open_base: Path) -> None:
    # each owner's files are deleted with that owner's rights: the tree must be reachable by them
    tree = open_base / "d" / "roots" / "shared"
    d = DaemonProc(open_base / "d", f'[[watch]]\npath = "{tree}"\njob = "s"\nsettle = "0.2s"\nkeep_last = 1\n')
    tree.mkdir()
    os.chmod(tree, 0o1777)
    for owner in (0, NOBODY):
        for i in range(3):
            p = tree / f"u{owner}-step{i}.pt"
            torch.save({"w": torch.ones(2) * i}, p)
            os.chown(p, owner, owner)
            os.utime(p, (1_000 + i * 10 + owner % 7, 1_000 + i * 10 + owner % 7))
    d.start()
    try:
        wait_until(lambda: len(list(tree.glob("*.pt"))) == 2, 30, "retention to run")
        time.sleep(1)
        left = sorted(p.name for p in tree.glob("*.pt"))
        assert left == ["u0-step2.pt", f"u{NOBODY}-step2.pt"], left
    finally:
        d.stop()


@as_root
@pytest.mark.slow
def test_jobs_per_uid_are_capped(open_base: Path) -> None:
    d = start_daemon(open_base, "max_jobs_per_uid = 5\n")
    try:
        mine = nobody_dir(d, "many")
        seen = hostile("many_jobs", d, n=8, dir=str(mine))
        assert [i for i, _ in seen["refused"]] == [5, 6, 7], seen
        assert all("max_jobs_per_uid" in e for _, e in seen["refused"])
        assert 'training_job="j7"' not in d.metrics()
    finally:
        d.stop()


def test_a_planted_symlink_under_the_pin_marker_is_not_followed(tmp_path: Path) -> None:
    path = small_checkpoint(tmp_path, "p-step1.safetensors")
    target = tmp_path / "elsewhere"
    (tmp_path / ".p-step1.safetensors.pinned").symlink_to(target)
    r = ckptd_cli("pin", path)
    assert r.returncode == 1 and "cannot pin" in r.stderr and "Traceback" not in r.stderr
    assert not target.exists()


@as_root
@pytest.mark.slow
def test_status_shows_a_user_only_their_own_jobs_and_the_catalogue_is_private(open_base: Path) -> None:
    from trainer_hooks import Checkpointer

    d = start_daemon(open_base)
    try:
        Checkpointer("roots-job", d.root / "r", model=torch.nn.Linear(2, 2), socket=d.socket).close()
        seen = hostile("admin", d, victim="roots-job", victim_file=str(d.root / "r" / "x.safetensors"))
        assert "roots-job" not in seen["status"]
        assert stat.S_IMODE(os.stat(d.state / "catalog.sqlite").st_mode) == 0o600
    finally:
        d.stop()


def test_deep_json_and_huge_integers_get_an_error_reply(daemon: DaemonProc) -> None:
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"type": "status", "x": ' + b"9" * 5000 + b"}"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(daemon.socket)
            s.sendall(protocol.HEADER.pack(len(body)) + body)
            reply = protocol.recv(s)[0]
            assert reply["type"] == "error", reply
    assert daemon.healthy()
    assert "Traceback" not in daemon.log.read_text()


def test_watch_keeps_its_state_outside_the_watched_tree(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    r = ckptd_cli("watch", str(tmp_path / "missing"), timeout=30)
    assert r.returncode == 2 and "is not a directory" in r.stderr and not (tmp_path / "missing").exists()
    proc = subprocess.Popen(
        [PYTHON, "-m", "ckptd.cli", "watch", str(tree), "--metrics-listen", "127.0.0.1:0"],
        env=project_env(XDG_STATE_HOME=str(tmp_path / "state")),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(
            lambda: bool(list((tmp_path / "state").glob("ckptd/watch-*/catalog.sqlite"))),
            30,
            "the catalogue in the user's own state directory",
        )
        assert not (tree / ".ckptd").exists()
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("listen, message", [("localhost", "expected host:port"), (":99999", "between 0 and 65535")])
def test_bad_listen_addresses_are_config_errors(tmp_path: Path, listen: str, message: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[daemon]\nmetrics_listen = "{listen}"\nroots = ["{tmp_path}"]\n')
    r = ckptd_cli("serve", "--config", str(cfg), timeout=30)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    cfg.write_text(f'[[watch]]\npath = "{tmp_path}"\npattern = 5\n')
    r = ckptd_cli("serve", "--config", str(cfg), timeout=30)
    assert r.returncode != 0 and "pattern must be a string" in r.stderr and "Traceback" not in r.stderr


def test_metrics_on_ipv6_loopback(tmp_path: Path) -> None:
    d = DaemonProc(tmp_path / "d")
    d.config.write_text(d.config.read_text().replace(f'"127.0.0.1:{d.port}"', f'"[::1]:{d.port}"'))
    d.proc = subprocess.Popen(
        [PYTHON, "-m", "ckptd.cli", "serve", "--config", str(d.config)],
        stdout=open(d.log, "ab"),
        stderr=subprocess.STDOUT,
        env=d.env,
    )
    try:
        import urllib.request

        def up() -> bool:
            try:
                return urllib.request.urlopen(f"http://[::1]:{d.port}/healthz", timeout=1).status == 200
            except OSError:
                return False

        wait_until(up, 30, "the daemon on [::1]")
        text = urllib.request.urlopen(f"http://[::1]:{d.port}/metrics", timeout=5).read().decode()
        assert "ckptd_build_info" in text
    finally:
        d.stop()


def test_a_client_gets_one_save_in_flight_at_a_time(daemon: DaemonProc) -> None:
    """The daemon's two persist workers are shared: a client queueing saves without waiting for
    their replies (huge headers, say) would hold them all. The hook never has two of a kind in
    flight: one disk save, and one memory-only save in its own buffer."""
    from trainer_hooks._snapshot.staging import StagingBuffer

    run = daemon.root / "greedy"
    run.mkdir()
    buf = StagingBuffer("greedy")
    meta = {
        "ckptd.format": "1",
        "ckptd.job": "greedy",
        "ckptd.step": "1",
        "ckptd.created": "2026-01-01T00:00:00Z",
        "ckptd.trigger": "step",
        "ckptd.rule": "r",
        "ckptd.metrics": "{}",
        "ckptd.state": "null",
        "ckptd.aliases": "{}",
    }
    length = buf.stage({"w": torch.ones(4 << 20)}, meta)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(daemon.socket)
            protocol.send(
                s, {"type": "hello", "job": "greedy", "directory": str(run), "settings": {}, "pid": 1, "step": 0}
            )
            assert protocol.recv(s)[0]["type"] == "welcome"
            save = {
                "type": "save",
                "step": 1,
                "trigger": "step",
                "rule": "r",
                "filename": "greedy-step00000001.safetensors",
                "length": length,
            }
            protocol.send(s, {**save, "id": 1}, fd=buf.fd)
            protocol.send(s, {**save, "id": 2, "memory_only": True}, fd=buf.fd)  # the hook's second buffer
            protocol.send(s, {**save, "id": 3}, fd=buf.fd)
            replies = []
            with contextlib.suppress(EOFError, OSError):
                while True:
                    replies.append(protocol.recv(s)[0])
        assert [r["id"] for r in replies if r["type"] == "accepted"] == [1, 2], replies
        assert any(r["type"] == "error" and "one save of a kind at a time" in r["error"] for r in replies), replies
        wait_until(lambda: (run / "greedy-step00000001.safetensors").exists(), 30, "the first save to land")
        assert daemon.healthy()
    finally:
        buf.close()


@as_root
@pytest.mark.slow
@pytest.mark.parametrize("change", ["link", "owner"])
def test_the_daemons_commit_of_a_sharded_unit_goes_through_the_guard(open_base: Path, change: str) -> None:
    """A client's directory that became a link (to another user's checkpoints) or changed hands
    after hello: the unit it then announces as committed is refused (``permission``), neither
    catalogued nor counted as a save, and retention deletes nothing there. The daemon's commit
    of a unit used to check neither the link nor the owner."""
    d = start_daemon(open_base)
    try:
        mine = nobody_dir(d, "committer")
        victim = d.root / "victim"
        r = run_py(str(ROOT / "tests" / "scripts" / "one_rank.py"), str(free_port()), str(victim), "j", "4", "2")
        assert json.loads(r.stdout.strip().splitlines()[-1])["verified"] == 2, r.stderr[-3000:]
        units = sorted(p.name for p in victim.iterdir() if not p.name.startswith("."))
        assert units == ["j-step00000002", "j-step00000004"], units
        if change == "owner":  # the units are in the client's own directory, which then goes to root
            for u in units:
                shutil.copytree(victim / u, mine / u)
            subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(mine)], check=True)
        args = {"job": "j", "dir": str(mine), "unit": units[-1], "step": 4, "settings": {"keep_last": 1}}
        proc = subprocess.Popen(
            [PYTHON, str(ROOT / "tests" / "scripts" / "hostile.py"), "commit_later", d.socket, json.dumps(args)],
            env=project_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        if change == "link":
            os.rename(mine, str(mine) + ".moved")
            os.symlink(victim, mine)
        else:
            os.chown(mine, 0, 0)
        out, err = proc.communicate("go\n", timeout=60)
        assert proc.returncode == 0 and json.loads(out.strip().splitlines()[-1])["status"] == "reply", err[-3000:]
        assert d.metric("ckptd_save_failures_total", training_job="j", reason="permission") == 1
        assert d.metric("ckptd_saves_total", training_job="j", trigger="step", outcome="ok") == 0
        where = victim if change == "link" else mine
        assert sorted(p.name for p in where.iterdir() if not p.name.startswith(".")) == units, "retention ran"
        # this job's rows (the job is its name and its directory: the victim's own units, written without
        # the daemon, are another job of the same name, which the daemon's sweep of its roots may list too)
        listed = [
            c
            for c in json.loads(ckptd_cli("list", "j", "--json", "--socket", d.socket).stdout)
            if c["directory"] == str(mine)
        ]
        if change == "link":  # the other user's units never entered this job's catalogue
            assert listed == [], listed
        else:  # what the client's own directory held at hello was catalogued then, and is still there
            assert sorted(os.path.basename(c["path"]) for c in listed) == units, listed
    finally:
        d.stop()


@as_root
@pytest.mark.slow
def test_another_user_cannot_take_a_jobs_snapshot_from_the_memory_tier(open_base: Path) -> None:
    d = start_daemon(open_base)
    try:
        run = d.root / "secret"
        from trainer_hooks import Checkpointer

        ckpt = Checkpointer("secret", run, model=torch.nn.Linear(8, 8), every_steps=1, socket=d.socket, quiet=True)
        ckpt.step()
        ckpt.wait()
        ckpt.close(final=False)
        wait_until(lambda: d.metric("ckptd_memory_bytes", training_job="secret") > 0, 30, "the memory tier")
        seen = hostile("memory_of", d, job="secret", dir=str(run))
        assert seen["fds"] == 0 and seen["reply"]["ok"] is False and "uid 65534" in seen["reply"]["error"], seen
    finally:
        d.stop()

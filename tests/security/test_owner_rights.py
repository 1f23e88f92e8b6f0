"""Owner rights (issue 33, docs/security.md "Owner rights"): the daemon touches a job's files with
the job owner's uid, gid and groups, so a user gets nothing through it that the kernel would not
give them, on a root daemon and on the shipped service-user deployment (``User=`` a service user
holding only CAP_SETUID and CAP_SETGID, roots sticky and not group-writable).

Real users (the ``users`` fixture), real daemons (``ckptd serve`` as root, or under ``setpriv`` as a
service user with the unit's two ambient capabilities), real hooks run as those users with the
system's python (the one ``make install`` builds the service's venv from).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import ROOT, DaemonProc, wait_until
from tests.users import User, Users, needs_root

SYSTEM_PYTHON = "/usr/bin/python3"  # reachable by every user, unlike the suite's (a pyenv under /root)
SITE = next(p for p in sys.path if p.endswith("site-packages") and os.path.isdir(os.path.join(p, "torch")))

pytestmark = [
    needs_root,
    pytest.mark.skipif(
        not os.access(SYSTEM_PYTHON, os.X_OK) or shutil.which("setpriv") is None,
        reason="needs /usr/bin/python3 and setpriv (util-linux)",
    ),
]


def shipped_root_mode() -> int:
    """The mode systemd/ckptd.tmpfiles gives the checkpoint root (what a host gets)."""
    line = next(
        x for x in (ROOT / "systemd" / "ckptd.tmpfiles").read_text().splitlines() if x.startswith("d /srv/checkpoints ")
    )
    return int(line.split()[2], 8)


def user_env() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "PYTHONPATH": f"{ROOT}:{SITE}"}


def as_user(user: User, code: str, *args: str, timeout: float = 120) -> Any:
    """Run ``code`` as ``user`` with the system python; its last stdout line, parsed as JSON."""
    r = subprocess.run(
        [SYSTEM_PYTHON, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=user_env(),
        preexec_fn=user.preexec,
        cwd="/",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


SAVE = """
    import json, sys, torch
    from trainer_hooks import Checkpointer
    job, directory, sock, value = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    model = torch.nn.Linear(4, 4)
    with torch.no_grad():
        model.weight.fill_(value)
    ckpt = Checkpointer(job, directory, model=model, socket=sock, every_steps=1, quiet=True)
    ckpt.step(); ckpt.wait(); ckpt.close(final=False)
    print("{}")
"""

RESUME = """
    import json, sys, torch
    from trainer_hooks import Checkpointer
    job, directory, sock = sys.argv[1], sys.argv[2], sys.argv[3]
    model = torch.nn.Linear(4, 4)
    ckpt = Checkpointer(job, directory, model=model, socket=sock, save_final=False, quiet=True)
    step = ckpt.resume()
    ckpt.close(final=False)
    print(json.dumps({"step": step, "weight": float(model.weight[0, 0])}))
"""

ASK = """
    import json, os, socket, sys
    from ckptd.wire import protocol
    s = socket.socket(socket.AF_UNIX); s.settimeout(30); s.connect(sys.argv[1])
    protocol.send(s, json.loads(sys.argv[2]))
    print(json.dumps(protocol.recv(s, limit=protocol.MAX_REPLY)[0]))
"""


def ask(user: User, d: DaemonProc, msg: dict[str, Any]) -> dict[str, Any]:
    """One message from ``user`` over the daemon's socket, and its reply."""
    if msg.get("type") == "hello":
        msg = {"settings": {}, "pid": os.getpid(), "step": 0, **msg}
    return dict(as_user(user, ASK, d.socket, json.dumps(msg)))


class ServiceDaemon(DaemonProc):
    """``ckptd serve`` as the service user, started as the shipped unit starts it: that uid and
    group, no supplementary groups, CAP_SETUID and CAP_SETGID ambient (``caps=False``: none)."""

    def __init__(self, base: Path, svc: User, extra_config: str = "", caps: bool = True) -> None:
        super().__init__(base, extra_config)
        self.svc, self.caps = svc, caps

    def start(self) -> "DaemonProc":
        self._logf = open(self.log, "ab")
        cmd = ["setpriv", f"--reuid={self.svc.uid}", f"--regid={self.svc.gid}", "--clear-groups"]
        if self.caps:
            cmd += ["--inh-caps=+setuid,+setgid", "--ambient-caps=+setuid,+setgid"]
        self.proc = subprocess.Popen(
            [*cmd, SYSTEM_PYTHON, "-m", "ckptd.cli", "serve", "--config", str(self.config)],
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            env=user_env(),
            cwd="/",
        )
        wait_until(lambda: self.healthy() or self.proc.poll() is not None, 60, "the service-user daemon")  # type: ignore[union-attr]
        if not self.healthy():
            raise RuntimeError("daemon did not start:\n" + self.log.read_text())
        return self


class Host:
    """A host deployed as shipped: a root with the tmpfiles mode, a socket group for the users,
    and each user's own 0700 directory in the root."""

    def __init__(self, users: Users, kind: str, extra_config: str = "", caps: bool = True) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="ckptd-owner-", dir="/tmp"))
        os.chmod(self.base, 0o755)
        self.svc = users.user("cksvc")  # its own group is the socket's (systemd/ckptd.sysusers)
        group = self.svc.name
        self.a = users.user("ckalice", groups=[group])
        self.b = users.user("ckbob", groups=[group])
        dbase = self.base / "d"
        config = f'group = "{group}"\n' + extra_config
        self.d: DaemonProc = (
            ServiceDaemon(dbase, self.svc, config, caps) if kind == "service" else DaemonProc(dbase, config)
        )
        os.chmod(dbase, 0o755)
        (dbase / "run").mkdir(mode=0o755)
        if kind == "service":
            os.chown(dbase, self.svc.uid, self.svc.gid)
            os.chown(dbase / "run", self.svc.uid, self.svc.gid)
        self.root = self.d.root
        os.chown(self.root, 0, 0)
        os.chmod(self.root, shipped_root_mode())

    def home(self, user: User) -> Path:
        """The user's own directory in the root, 0700 (deploy/README.md)."""
        p = self.root / user.name
        p.mkdir(mode=0o700)
        os.chown(p, user.uid, user.gid)
        return p

    def close(self) -> None:
        self.d.stop()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def host(users: Users, request: pytest.FixtureRequest) -> Iterator[Host]:
    h = Host(users, request.param, 'scrub_every = "1s"\n')
    try:
        yield h
    finally:
        h.close()


# --- the switch itself --------------------------------------------------------------------------


def test_the_switch_is_per_thread_and_the_kernel_checks_as_the_owner(users: Users) -> None:
    """While one thread acts as a user, another thread of the same process keeps the daemon's own
    ids and groups; the switched thread reads what the user may (EACCES on a 0600 root file,
    which root itself reads), and leaves with the daemon's ids back."""
    from ckptd.disk.owner import Identity, acting_as, current_fs_ids

    u = users.user()
    tmp_path = Path(tempfile.mkdtemp(prefix="ckptd-owner-", dir="/tmp"))
    os.chmod(tmp_path, 0o755)
    secret = tmp_path / "secret"
    secret.write_text("root only")
    os.chmod(secret, 0o600)
    mine = tmp_path / "mine"
    mine.mkdir()
    os.chown(mine, u.uid, u.gid)
    inside, go_on, seen = threading.Event(), threading.Event(), {}

    def work() -> None:
        with acting_as(Identity.of(u.uid)):
            seen["ids"], seen["groups"] = current_fs_ids(), sorted(os.getgroups())
            inside.set()
            go_on.wait(30)
            try:
                secret.read_text()
                seen["read"] = "read"
            except PermissionError:
                seen["read"] = "EACCES"
            (mine / "f").write_text("x")
        seen["after"] = current_fs_ids()

    t = threading.Thread(target=work)
    t.start()
    assert inside.wait(30)
    here = current_fs_ids(), sorted(os.getgroups())
    assert secret.read_text() == "root only"  # this thread: still root, with its capabilities
    go_on.set()
    t.join(30)
    assert here == ((0, 0), sorted(set(os.getgroups())))
    assert seen["ids"] == (u.uid, u.gid) and seen["groups"] == sorted({u.gid, *u.groups}), seen
    assert seen["read"] == "EACCES" and seen["after"] == (0, 0), seen
    assert os.stat(mine / "f").st_uid == u.uid  # created as the owner: hers, not root's
    shutil.rmtree(tmp_path)


def test_a_daemon_without_setuid_refuses_another_uids_job_clearly(users: Users) -> None:
    """A service-user daemon started without CAP_SETUID/CAP_SETGID cannot act as another uid: it
    refuses that uid's job at hello, naming what it lacks, instead of writing with its own rights."""
    h = Host(users, "service", caps=False)
    try:
        h.d.start()
        mine = h.home(h.a)
        reply = ask(h.a, h.d, {"type": "hello", "job": "j", "directory": str(mine)})
        assert reply["type"] == "error" and "CAP_SETUID" in reply["error"], reply
        assert list(mine.iterdir()) == []
    finally:
        h.close()


# --- H3: the service-user deployment shares nothing on disk --------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("host", ["root", "service"], indirect=True)
def test_socket_users_get_only_what_the_kernel_gives_them(host: Host) -> None:
    """H3. Alice saves through the daemon into her 0700 directory. Bob, on the same socket,
    cannot register a job in her directory; a checkpoint of his own job swapped for a symlink to
    her file is read by the daemon as Bob (scrub and ``latest``: EACCES, "Permission denied"), so
    it is neither verified for him nor handed to him as his newest. Alice resumes her own
    weights, from a file that is hers."""
    h = host
    h.d.start()
    alice_dir, bob_dir = h.home(h.a), h.home(h.b)
    as_user(h.a, SAVE, "run", str(alice_dir), h.d.socket, "1.5")
    saved = sorted(alice_dir.glob("run-step*.safetensors"))
    assert saved, (h.d.log.read_text()[-3000:], list(alice_dir.iterdir()))

    reply = ask(h.b, h.d, {"type": "hello", "job": "run", "directory": str(alice_dir)})
    assert reply["type"] == "error", reply

    as_user(h.b, SAVE, "bob", str(bob_dir), h.d.socket, "6.0")
    bobs = sorted(bob_dir.glob("bob-step*.safetensors"))[-1]
    as_user(
        h.b,
        "import os, sys, json; os.unlink(sys.argv[1]); os.symlink(sys.argv[2], sys.argv[1]); print('{}')",
        str(bobs),
        str(saved[-1]),
    )

    def bobs_row() -> dict[str, Any]:
        return next(r for r in ask(h.b, h.d, {"type": "list", "job": "bob"})["checkpoints"] if r["path"] == str(bobs))

    wait_until(lambda: not bobs_row()["verified"], 60, "scrub to re-read Bob's file")
    # refused without following the link (ckptd/disk/opened.py), or, reached as Bob, EACCES: either
    # way nothing of Alice's file (her path, her job) is in what Bob is told
    reason = bobs_row()["reason"]
    assert "symbolic link" in reason or "Permission denied" in reason, bobs_row()
    assert str(saved[-1]) not in str(bobs_row()) and "'run'" not in str(bobs_row()), bobs_row()
    latest = ask(h.b, h.d, {"type": "latest", "job": "bob"})
    assert latest.get("ok") is False and "path" not in latest, latest
    listed = ask(h.b, h.d, {"type": "list"})
    assert all(r["job"] != "run" for r in listed["checkpoints"]), listed

    resumed = as_user(h.a, RESUME, "run", str(alice_dir), h.d.socket)
    assert resumed["weight"] == 1.5 and resumed["step"] >= 1, resumed
    st = os.stat(saved[-1])
    assert (st.st_uid, st.st_gid) == (h.a.uid, h.a.gid), st  # written as Alice: hers, not root's or ckptd's


# --- H4: the shipped root is sticky --------------------------------------------------------------


@pytest.mark.parametrize("host", ["service"], indirect=True)
def test_the_shipped_root_is_sticky_and_a_swapped_directory_gets_nothing(host: Host) -> None:
    """H4. With systemd/ckptd.tmpfiles' mode on the root, Bob (in the socket group) cannot rename
    Alice's job directory: the kernel refuses. A directory of Bob's put in its place (here by
    root, the only one who could) gets nothing from Alice's next save: the daemon refuses it."""
    h = host
    mode = shipped_root_mode()
    assert mode & stat.S_ISVTX and " root root " in (ROOT / "systemd" / "ckptd.tmpfiles").read_text(), oct(mode)
    h.d.start()
    alice_dir = h.home(h.a)
    r = subprocess.run(
        ["mv", str(alice_dir), str(alice_dir) + ".gone"], preexec_fn=h.b.preexec, capture_output=True, text=True
    )
    assert r.returncode != 0 and "Operation not permitted" in r.stderr, r
    as_user(h.a, SAVE, "run", str(alice_dir), h.d.socket, "1.0")
    assert list(alice_dir.glob("run-step*.safetensors"))
    os.rename(alice_dir, str(alice_dir) + ".moved")
    swapped = h.home(h.b)
    os.rename(swapped, alice_dir)
    r2 = subprocess.run(
        [SYSTEM_PYTHON, "-c", textwrap.dedent(SAVE), "run", str(alice_dir), h.d.socket, "2.0"],
        capture_output=True,
        text=True,
        timeout=120,
        env=user_env(),
        preexec_fn=h.a.preexec,
        cwd="/",
    )
    assert list(alice_dir.iterdir()) == [], (r2.stderr[-2000:], list(alice_dir.iterdir()))


# --- L5: a planted link is followed as its planter ----------------------------------------------


@pytest.mark.slow
def test_watch_follows_a_planted_holder_link_only_as_its_owner_would(users: Users) -> None:
    """L5, daemon side. In a watched tree, Bob's checkpoint refers to a holder file that he made
    a symlink to Alice's 0700 checkpoint: the daemon judges it as Bob (EACCES), so what it
    catalogues tells him nothing of her file (scrub and ``latest`` on such a link: the H3 test)."""
    h = Host(users, "root")
    try:
        tree = h.root / "watched"
        tree.mkdir()
        os.chmod(tree, 0o1777)
        h.d.config.write_text(
            h.d.config.read_text() + f'[[watch]]\npath = "{tree}"\njob = "w"\nsettle = "0.2s"\nrescan_every = "1s"\n'
        )
        alice_dir = h.home(h.a)
        h.d.start()
        as_user(h.a, SAVE, "run", str(alice_dir), h.d.socket, "1.5")
        hers = sorted(alice_dir.glob("run-step*.safetensors"))[-1]
        bob_tree, stage = tree / "bob", h.root / "bob-stage"
        for d in (bob_tree, stage):
            d.mkdir(mode=0o700)
            os.chown(d, h.b.uid, h.b.gid)
        made = as_user(h.b, LORA_TWO_SAVES, str(stage))  # written outside the tree, then moved in
        holder, referring = made["holder"], made["referring"]  # with the link in place: no race with
        as_user(
            h.b,
            "import os, sys; os.unlink(sys.argv[1]); os.symlink(sys.argv[2], sys.argv[1]); "  # the watcher
            "[os.rename(os.path.join(sys.argv[3], n), os.path.join(sys.argv[4], n)) "
            "for n in sorted(os.listdir(sys.argv[3]))]; print('{}')",
            holder,
            str(hers),
            str(stage),
            str(bob_tree),
        )
        holder, referring = (str(bob_tree / os.path.basename(p)) for p in (holder, referring))

        def row() -> dict[str, Any] | None:
            rows = ask(h.b, h.d, {"type": "list", "job": "w"})["checkpoints"]
            return next((r for r in rows if r["path"] == referring), None)

        wait_until(lambda: row() is not None, 60, "the watched checkpoint catalogued")
        seen = row()
        assert seen is not None and not seen["verified"], seen
        # the holder link is never followed (a holder that is a link, missing or unreadable gets one
        # answer, ckptd/disk/opened.py), or, reached as Bob, EACCES: nothing of Alice's file either way
        assert "missing" in seen["reason"] or "Permission denied" in seen["reason"], seen
        assert str(hers) not in str(seen), seen
    finally:
        h.close()


LORA_TWO_SAVES = """
    import json, sys, torch
    from trainer_hooks import Checkpointer
    sys.path.insert(0, sys.argv[1])
    directory = sys.argv[1]
    base = torch.nn.Linear(64, 64)
    base.requires_grad_(False)
    head = torch.nn.Linear(64, 2)
    model = torch.nn.Sequential(base, head)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    ckpt = Checkpointer("bobs", directory, model=model, optimizer=opt, every_steps=1, socket=False, quiet=True)
    for _ in range(2):
        model(torch.randn(4, 64)).pow(2).mean().backward(); opt.step(); opt.zero_grad(); ckpt.step()
    ckpt.close(final=False)
    import glob, os
    files = sorted(glob.glob(os.path.join(directory, "bobs-step*.safetensors")))
    print(json.dumps({"holder": files[0], "referring": files[-1]}))
"""


def test_a_thread_started_inside_the_switch_runs_as_the_daemon(users: Users) -> None:
    """The kernel gives a new thread its creator's credentials: a background thread started during
    a job's file work (the remote index's refresher, woken by retention) ran as that user for good,
    and then could not import the stdlib from a 0700 home (found when the branches met). Threads
    ckptd starts go through ``start_thread``, which starts them with the daemon's own rights."""
    from ckptd.disk.owner import Identity, acting_as, current_fs_ids, start_thread

    u = users.user()
    seen: dict[str, tuple[int, int]] = {}
    with acting_as(Identity.of(u.uid)):
        plain = threading.Thread(target=lambda: seen.__setitem__("plain", current_fs_ids()))
        plain.start()
        plain.join()
        ours = threading.Thread(target=lambda: seen.__setitem__("ours", current_fs_ids()))
        start_thread(ours)
        ours.join()
        assert current_fs_ids() == (u.uid, u.gid)  # and the starting thread is still the owner
    assert seen["plain"] == (u.uid, u.gid), seen  # what the kernel does
    assert seen["ours"] == (os.geteuid(), os.getegid()), seen

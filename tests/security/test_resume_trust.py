"""What the hook resumes is its own uid's (issue 33: deliver 3, H4's hook side, L2, L6-L9).

Real users (``users``), real trainers (``tests/scripts/as_user_train.py``, dropped to the
user's uid after its imports), a real daemon where the finding is the daemon's. docs/security.md,
"What the hook resumes", says what each test proves.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from ckptd.disk.scan import scan
from tests import test_security
from tests.conftest import PYTHON, ROOT, project_env, wait_until
from tests.users import User

start_daemon = test_security.start_daemon  # a real daemon whose socket every user may open
TRAIN = str(ROOT / "tests" / "scripts" / "as_user_train.py")

ASK = r"""
import json, os, sys
from ckptd.wire.client import request
uid, gid = int(sys.argv[1]), int(sys.argv[2])
os.setgroups([gid]); os.setgid(gid); os.setuid(uid)   # imports first: a user cannot read root's Python
print(json.dumps(request(sys.argv[3], json.loads(sys.argv[4]))))
"""


def train(
    user: User, directory: Path, job: str, steps: int, fill: float = 0.0, socket: str | None = None
) -> subprocess.CompletedProcess[str]:
    groups = ",".join(str(g) for g in user.groups) or "-"
    cmd = [PYTHON, TRAIN, str(user.uid), str(user.gid), groups, str(directory), job, str(steps), "--fill", str(fill)]
    r = subprocess.run(
        cmd + (["--socket", socket] if socket else []), capture_output=True, text=True, timeout=180, env=project_env()
    )
    assert r.returncode in (0, 3), r.stderr[-3000:]
    return r


def started(r: subprocess.CompletedProcess[str]) -> tuple[int, float]:
    line = next(x for x in r.stdout.splitlines() if x.startswith("START"))
    return int(line.split()[1]), float(line.split()[2])


def ask(user: User, socket: str, msg: dict[str, Any]) -> dict[str, Any]:
    r = subprocess.run(
        [PYTHON, "-c", ASK, str(user.uid), str(user.gid), socket, json.dumps(msg)],
        capture_output=True,
        text=True,
        timeout=60,
        env=project_env(),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    reply: dict[str, Any] = json.loads(r.stdout)
    return reply


def as_user(user: User, *cmd: str) -> None:
    """A shell command run as ``user``, as they would run it."""
    r = subprocess.run(cmd, preexec_fn=user.preexec, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (cmd, r.stderr)


def own_dir(path: Path, user: User, mode: int = 0o755, gid: int | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, user.uid, user.gid if gid is None else gid)
    os.chmod(path, mode)
    return path


def test_another_uids_newer_checkpoint_planted_or_hard_linked_is_skipped_and_logged(users, base: Path) -> None:
    """Alice's job directory is writable by a group Mallory is in (the old 2775 deployment).
    Mallory plants a newer checkpoint of the same job (a copy she owns, a hard link to her own
    file, a symlink to it): Alice's resume skips each, one line each naming the path, the owner
    and why, and continues from her own step 2 with her own weights."""
    group, gid = users.group()
    alice, mallory = users.user(groups=[group]), users.user(groups=[group])
    mine = own_dir(base / "alice" / "run", alice, 0o2775, gid)
    own_dir(base / "alice", alice)
    theirs = own_dir(base / "mallory", mallory)
    assert started(train(alice, mine, "run", 2))[0] == 0
    assert [c.step for c in scan(str(mine), "run")] == [1, 2]
    train(mallory, theirs, "run", 9, fill=660.0)
    bad = {c.step: c.path for c in scan(str(theirs), "run")}
    # Mallory, with her group's write access, as she would do it herself
    as_user(mallory, "cp", bad[9], str(mine))
    as_user(mallory, "ln", bad[8], str(mine))
    as_user(mallory, "ln", "-s", bad[7], str(mine))
    assert [c.step for c in scan(str(mine), "run")] == [1, 2, 8, 9]  # (the scan never followed a symlink)

    r = train(alice, mine, "run", 2)
    assert started(r) == (2, 2.0), r.stdout + r.stderr  # her own step 2, her own weights (not 669)
    for step in (9, 8):
        path = mine / Path(bad[step]).name
        assert f"skipping {path}: checkpoint {path} is owned by uid {mallory.uid}, not by uid {alice.uid}" in r.stderr


def test_a_swapped_job_directory_is_refused_in_embedded_mode(users, base: Path) -> None:
    """H4, the hook's side: the shared 2775 root has no sticky bit, so Mallory renames Alice's job
    directory away and puts her own, holding a newer checkpoint of Alice's job, in its place.
    Alice's hook (no daemon: embedded mode) refuses to resume from it and says why."""
    group, gid = users.group()
    alice, mallory = users.user(groups=[group]), users.user(groups=[group])
    shared = base / "shared"
    shared.mkdir()
    os.chown(shared, 0, gid)
    os.chmod(shared, 0o2775)
    mine = own_dir(shared / "run", alice)
    train(alice, mine, "run", 2)
    as_user(mallory, "mv", str(mine), str(shared / "gone"))
    as_user(mallory, "mkdir", "-m", "2775", str(mine))  # her group's: Alice can write there too
    train(mallory, mine, "run", 5, fill=660.0)

    r = train(alice, mine, "run", 6)
    assert r.returncode == 3 and "START" not in r.stdout, r.stdout + r.stderr
    assert f"the job directory {mine} is owned by uid {mallory.uid}, not by uid {alice.uid}" in r.stdout
    assert [c.step for c in scan(str(mine), "run")] == [1, 2, 3, 4, 5]  # she wrote nothing there either


def test_the_memory_tier_does_not_outlive_rm_rf_of_the_job_directory(users, base: Path) -> None:
    """L9: Alice's run saved step 3 through the daemon, which holds it in memory. She removes the
    job directory (``rm -rf``) and makes it again: a new run starts at 0, not from the memory of
    the run she deleted; asked directly, the daemon holds nothing for that directory now."""
    alice = users.user()
    d = start_daemon(base)
    try:
        run = own_dir(d.root / "alice", alice) / "run"
        assert started(train(alice, run, "run", 3, fill=10.0, socket=d.socket))[0] == 0
        wait_until(lambda: d.metric("ckptd_memory_bytes", training_job="run") > 0, 30, "the memory tier")
        as_user(alice, "rm", "-rf", str(run))
        as_user(alice, "mkdir", str(run))
        asked = ask(alice, d.socket, {"type": "memory", "job": "run", "directory": str(run)})
        assert asked.get("ok") and asked.get("step") is None, asked

        r = train(alice, run, "run", 0, socket=d.socket)
        assert started(r)[0] == 0 and "nothing to resume" in r.stderr, r.stdout + r.stderr
    finally:
        d.stop()


def hello(user: User, socket: str, directory: Path, job: str = "run") -> dict[str, Any]:
    return ask(
        user, socket, {"type": "hello", "job": job, "directory": str(directory), "settings": {}, "pid": 1, "step": 0}
    )


def test_a_job_follows_its_directory_to_a_new_owner_who_does_not_see_the_old_rows(users, base: Path) -> None:
    """L2: Alice's job directory is given to Bob (``chown``); her files in it stay hers. Bob's
    trainer says hello for the same (name, directory) and is welcome (the job was Alice's forever
    before); his listing and status show the job but none of Alice's checkpoints."""
    alice, bob = users.user(), users.user()
    d = start_daemon(base)
    try:
        run = own_dir(d.root / "run", alice)
        train(alice, run, "run", 2, socket=d.socket)
        hers = {c.path for c in scan(str(run), "run")}
        assert len(hers) == 2
        os.chown(run, bob.uid, bob.gid)

        assert hello(bob, d.socket, run).get("type") == "welcome"
        listed = ask(bob, d.socket, {"type": "list"})
        assert listed["ok"] and not {r["path"] for r in listed["checkpoints"]} & hers, listed
        status = ask(bob, d.socket, {"type": "status"})
        assert [(j["job"], j["directory"], j["checkpoints"]) for j in status["jobs"]] == [("run", str(run), 0)]
        assert ask(alice, d.socket, {"type": "status"})["jobs"] == []  # no longer hers
    finally:
        d.stop()


def test_rows_rebuilt_from_files_are_their_owners_and_latest_finds_ones_own(users, base: Path) -> None:
    """L6: Alice and Bob each trained a job named ``run`` with no daemon; the daemon then starts
    and catalogues both from the files. Bob sees only his: ``latest run`` answers his checkpoint
    (it said "2 jobs are named run", naming Alice's directory), ``list`` and ``status`` show his."""
    alice, bob = users.user(), users.user()
    root = base / "d" / "roots"
    hers, his = own_dir(root / "alice", alice), own_dir(root / "bob", bob)
    os.chmod(root, 0o755)
    train(alice, hers, "run", 2)
    train(bob, his, "run", 3)
    d = start_daemon(base)
    try:
        wait_until(lambda: len(ask(users_root(), d.socket, {"type": "list"})["checkpoints"]) == 5, 30, "the rebuild")
        latest = ask(bob, d.socket, {"type": "latest", "job": "run"})
        assert latest.get("path") == scan(str(his), "run")[-1].path, latest
        assert {Path(r["path"]).parent for r in ask(bob, d.socket, {"type": "list"})["checkpoints"]} == {his}
        assert [j["directory"] for j in ask(bob, d.socket, {"type": "status"})["jobs"]] == [str(his)]
    finally:
        d.stop()


def users_root() -> User:
    return User("root", 0, 0)


def test_refusals_do_not_tell_a_missing_directory_from_another_users(users, base: Path) -> None:
    """L7: Mallory names a directory inside Alice's 0700 one (which she cannot stat) and one that
    does not exist: ``hello`` and ``memory`` refuse both in the same words."""
    alice, mallory = users.user(), users.user()
    d = start_daemon(base)
    try:
        private = own_dir(d.root / "alice", alice, 0o700)
        own_dir(private / "secret", alice)
        there, nowhere = private / "secret", private / "nothing"
        for ask_it in (
            lambda p: hello(mallory, d.socket, p)["error"],
            lambda p: ask(mallory, d.socket, {"type": "memory", "job": "run", "directory": str(p)})["error"],
        ):
            a, b = ask_it(there), ask_it(nowhere)
            assert a.replace(str(there), "DIR") == b.replace(str(nowhere), "DIR"), (a, b)
    finally:
        d.stop()


def test_a_file_name_that_is_not_utf8_is_skipped_with_a_line_not_a_crash(users, base: Path) -> None:
    """L8: a checkpoint-like file whose name is not UTF-8 in Alice's job directory: her hello is
    welcome (it crashed while the catalogue adopted the directory), the daemon's log names the
    file with surrogate escapes, and the daemon serves on."""
    alice = users.user()
    d = start_daemon(base)
    try:
        run = own_dir(d.root / "run", alice)
        odd = os.path.join(os.fsencode(run), b"run-\xff.safetensors")
        with open(odd, "wb") as f:
            f.write(b"not a checkpoint")
        os.chown(odd, alice.uid, alice.gid)
        assert hello(alice, d.socket, run).get("type") == "welcome"
        wait_until(
            lambda: "run-\\udcff.safetensors" in d.log.read_text() and "not UTF-8" in d.log.read_text(),
            10,
            "the log line",
        )
        assert d.healthy()
    finally:
        d.stop()

"""The remote tier against a hostile local user and a hostile store (issue 33: H5, H6, H7, H9, M4, L3, L4).

Real daemons (root) over their socket, real unix users as trainers (``wire_saver``, a client
without torch), a real S3 server (moto) on loopback, a real ``file://`` tier. Each test is an
attack that worked before its fix.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ckptd.core.settings import Settings
from ckptd.remote.layout import job_prefix
from ckptd.remote.listing import COMMIT, committed
from ckptd.remote.stores import RemoteError, open_store
from ckptd.remote.upload import replicate
from tests.conftest import PYTHON, ROOT, S3_ENV, DaemonProc, MotoServer, ckptd_cli, project_env, wait_until
from tests.helpers import small_checkpoint
from tests.users import User

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as several unix users")


def start_daemon(base: Path, extra: str, env: dict[str, str] | None = None) -> DaemonProc:
    d = DaemonProc(base / "d", extra, env=env)
    d.start()
    for p in (base / "d", base / "d" / "run", d.root):
        os.chmod(p, 0o755)
    os.chmod(d.socket, 0o666)
    return d


def job_dir(d: DaemonProc, user: User | None, name: str) -> Path:
    path = d.root / name
    path.mkdir()
    if user is not None:
        os.chown(path, user.uid, user.gid)
    return path


def saver(
    d: DaemonProc,
    user: User | None,
    job: str,
    directory: Path,
    settings: dict[str, Any],
    *steps: str | int,
    wait: bool = True,
) -> Any:
    """A trainer (as ``user``) saving ``steps`` through the daemon; its replies, or the process."""
    cmd = [
        PYTHON,
        "-m",
        "tests.security.wire_saver",
        d.socket,
        job,
        str(directory),
        json.dumps(settings),
        *map(str, steps),
    ]
    env = project_env(**({"WIRE_AS": f"{user.uid}:{user.gid}"} if user else {}))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def checkpoint(directory: Path, name: str, step: int, seed: int) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    return small_checkpoint(directory, name, step=step, seed=seed)


def as_user(user: User, imports: str, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``code`` run as ``user``, after ``imports`` ran as root (the interpreter may live under a 0700 home)."""
    become = f"os.setgroups([{user.gid}])\nos.setgid({user.gid})\nos.setuid({user.uid})\n"
    return subprocess.run(
        [PYTHON, "-c", f"import os, sys\n{imports}\n{become}{code}", *args],
        cwd=ROOT,
        env=project_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


# -- H9: the store, endpoint and credentials are the daemon's ------------------------------------------


class Listener:
    """A TCP listener that counts who connects (an endpoint a hostile client would name)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.seen: list[bytes] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(2)
            try:
                self.seen.append(conn.recv(65536))
            except OSError:
                pass
            conn.close()

    def stop(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        self.sock.close()
        self.thread.join(10)


def test_a_clients_remote_endpoint_is_refused_at_hello(base: Path) -> None:
    """A client named its own ``remote_endpoint`` under an allowed ``remote``: the root daemon sent
    it signed requests with its own AWS credentials and session token. Now hello is refused,
    saying where the endpoint comes from, and nothing ever connects to the client's listener."""
    listener = Listener()
    d = start_daemon(base, 'remote_allow = ["s3://ckpt/fleet"]\n', env={**S3_ENV, "AWS_SESSION_TOKEN": "s3cr3t"})
    try:
        run = job_dir(d, None, "run")
        out = saver(d, None, "run", run, {"remote": "s3://ckpt/fleet", "remote_endpoint": listener.url}, 1)
        assert out[0]["type"] == "error", out
        assert "remote_endpoint" in out[0]["error"] and "[daemon] remote_endpoint" in out[0]["error"], out
        time.sleep(1)  # what a daemon that accepted it would have sent by now (its upload follows the save)
        assert listener.seen == []
    finally:
        d.stop()
        listener.stop()


class EndlessListing:
    """An S3 endpoint whose every listing page is full and truncated, forever."""

    def __init__(self) -> None:
        import http.server

        page = [0]

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                page[0] += 1
                keys = "".join(
                    f"<Contents><Key>p/job/x{page[0]}-{i:04d}-{'y' * 60}</Key><Size>1</Size></Contents>"
                    for i in range(1000)
                )
                body = (
                    f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>b</Name><Prefix>p/job/'
                    f"</Prefix><KeyCount>1000</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>true</IsTruncated>"
                    f"<NextContinuationToken>t{page[0]}</NextContinuationToken>{keys}</ListBucketResult>"
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.pages = page
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def test_an_endless_listing_ends_with_an_error_and_bounded_memory(base: Path) -> None:
    """An endpoint that lists without end grew the root daemon's RSS from 91 to 548 MiB and held
    every job's replication. The listing now stops at its bounds with an error naming them."""
    endless = EndlessListing()
    code = (
        "import resource, sys\nfrom ckptd.remote.stores import RemoteError, open_store\n"
        "try:\n    open_store('s3://b/p', sys.argv[1]).list('job/')\n    print('ended')\n"
        "except RemoteError as exc:\n    print('refused:', exc)\n"
        # VmHWM: this process's own peak (ru_maxrss keeps the forking parent's, a pytest worker with torch)
        "print('maxrss_kib', [int(line.split()[1]) for line in open('/proc/self/status') "
        "if line.startswith('VmHWM:')][0])\n"
    )
    try:
        r = subprocess.run(
            [PYTHON, "-c", code, endless.url],
            cwd=ROOT,
            env={**project_env(), **S3_ENV},
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        endless.stop()
    assert r.returncode == 0, r.stderr
    assert "refused:" in r.stdout and "listing stopped after" in r.stdout and "lists without end" in r.stdout, r.stdout
    rss = int(r.stdout.split("maxrss_kib")[1])
    assert rss < 400 * 1024, f"{rss} KiB"
    assert endless.pages[0] <= 1000


# -- H5: a job's objects under a key naming its owner and its directory ---------------------------------


@as_root
def test_two_users_jobs_of_one_name_never_share_a_prefix(base: Path, users: Any) -> None:
    """Bob's job of the same name as Alice's fetched her checkpoint, deleted her remote copies with
    his remote retention, and she resumed his weights on a new host. Now each job's objects live
    under ``u<uid>/<directory>/<job>``: Bob's retention leaves hers alone, the commit object names
    her uid and directory, and her new host fetches her own step."""
    shared = base / "shared"
    shared.mkdir(mode=0o755)
    url = f"file://{shared}"
    d = start_daemon(base, f'remote_allow = ["{url}"]\n')
    alice, bob = users.user(), users.user()
    a_dir, b_dir = job_dir(d, alice, "alice"), job_dir(d, bob, "bob")
    store = open_store(url)
    a_pre, b_pre = job_prefix("run", str(a_dir), alice.uid), job_prefix("run", str(b_dir), bob.uid)
    try:
        out = saver(d, alice, "run", a_dir, {"remote": url}, 10)
        assert out[0]["type"] == "welcome" and out[1]["ok"], out
        wait_until(lambda: [c.step for c in committed(store, a_pre)] == [10], 60, "alice's upload")
        out = saver(d, bob, "run", b_dir, {"remote": url, "remote_keep_last": 1}, 20, 30)
        assert out[0]["type"] == "welcome" and out[2]["ok"], out
        wait_until(lambda: [c.step for c in committed(store, b_pre)] == [30], 60, "bob's uploads and his retention")
        mine = committed(store, a_pre)
        assert [(c.step, c.owner_uid, c.directory) for c in mine] == [(10, alice.uid, str(a_dir))]
        shutil.rmtree(a_dir)  # alice's host is lost; a new one resumes the same job (her uid, her directory)
        job_dir(d, alice, "alice")
        r = as_user(
            alice,
            "from ckptd.core.settings import Settings\nfrom ckptd.remote.fetch import fetch\n"
            "from ckptd.remote.layout import prefix_in\nfrom ckptd.remote.stores import open_store",
            "print(fetch(open_store(sys.argv[1]), prefix_in(Settings(), 'run', sys.argv[2]), sys.argv[2]))",
            url,
            str(a_dir),
        )
        assert r.stdout.strip() == str(a_dir / "run-step00000010.safetensors"), r.stderr
        assert f"run:{alice.uid}:10".encode() in (a_dir / "run-step00000010.safetensors").read_bytes()
    finally:
        d.stop()


def test_a_version_1_remote_is_read_by_url_and_never_pruned_by_the_daemon(base: Path) -> None:
    """Objects a version-1 daemon wrote under the job name alone stay readable with an explicit
    URL (``ckptd list --remote``, ``ckptd fetch``), and the daemon's remote retention for a job
    of that name never touches them (they name no owner)."""
    shared = base / "shared"
    url = f"file://{shared}"
    store = open_store(url)
    old = [checkpoint(base / "old", f"run-step{s:08d}.safetensors", step=s, seed=s) for s in (1, 2)]
    for p in old:
        replicate(store, "run", p)  # the old layout: run/NAME
    d = start_daemon(base, f'remote_allow = ["{url}"]\n')
    try:
        run = job_dir(d, None, "run")
        out = saver(d, None, "run", run, {"remote": url, "remote_keep_last": 1}, 5, 6)
        assert out[2]["ok"], out
        pre = job_prefix("run", str(run), os.getuid())
        wait_until(lambda: [c.step for c in committed(store, pre)] == [6], 60, "the daemon's uploads and retention")
        assert [c.step for c in committed(store, "run")] == [1, 2]  # untouched by the job's retention
        listed = json.loads(ckptd_cli("list", "--remote", f"{url}/run", "--json").stdout)
        assert [c["step"] for c in listed] == [1, 2]
        got = ckptd_cli("fetch", f"{url}/run", str(base / "new"))
        assert got.returncode == 0 and got.stdout.strip() == str(base / "new" / "run-step00000002.safetensors")
        assert (base / "new" / "run-step00000002.safetensors").read_bytes() == Path(old[1]).read_bytes()
    finally:
        d.stop()


# -- H6: the file:// tier never follows a link planted in it ---------------------------------------------


def test_the_file_store_never_follows_a_link_planted_under_its_root(tmp_path: Path) -> None:
    """The root daemon deleted and wrote files outside its roots through symlinks inside the
    shared tier. Every key is now reached from the root's fd without following a link: writes,
    reads, deletions and listings through a planted link fail, and the target is untouched."""
    root, outside = tmp_path / "shared", tmp_path / "etc"
    (root / "u0").mkdir(parents=True)
    outside.mkdir()
    precious = outside / "run-step00000001.safetensors.commit.json"
    precious.write_text("precious")
    os.symlink(outside, root / "u0" / "job")  # a directory link in the middle of a key
    os.symlink(precious, root / "u0" / "run-step00000002.safetensors")  # a link as the last component
    store = open_store(f"file://{root}")
    key = "u0/job/run-step00000001.safetensors.commit.json"
    for attempt in (
        lambda: store.put_bytes(key, b"evil"),
        lambda: store.delete(key),
        lambda: store.open(key),
        lambda: store.open("u0/run-step00000002.safetensors"),
    ):
        with pytest.raises(RemoteError, match="symbolic link|not a regular file"):
            attempt()
    assert precious.read_text() == "precious" and sorted(os.listdir(outside)) == [precious.name]
    assert store.list("") == {}  # links are not walked, nor listed as objects
    store.put_bytes("u0/run-step00000002.safetensors", b"data")  # replaces the link itself, never its target
    assert precious.read_text() == "precious" and not (root / "u0" / "run-step00000002.safetensors").is_symlink()


def test_a_fifo_as_commit_object_is_an_error_at_once(tmp_path: Path) -> None:
    """A FIFO named like a commit object held the replication thread forever (``open`` blocks)."""
    root = tmp_path / "shared"
    (root / "job").mkdir(parents=True)
    os.mkfifo(root / "job" / "job-step00000001.safetensors.commit.json")
    code = (
        "import sys\nfrom ckptd.remote.listing import committed\nfrom ckptd.remote.stores import open_store\n"
        "store = open_store(sys.argv[1])\nprint(committed(store, 'job'))\n"
        "store.open('job/job-step00000001.safetensors.commit.json')"
    )
    r = subprocess.run(
        [PYTHON, "-c", code, f"file://{root}"], cwd=ROOT, env=project_env(), capture_output=True, text=True, timeout=60
    )
    assert r.stdout.startswith("[]"), r.stdout + r.stderr  # not listed as an object
    assert "RemoteError" in r.stderr and "not a regular file" in r.stderr, r.stderr  # nor opened


# -- M4: one job's broken remote never delays another's -----------------------------------------------------


def test_one_jobs_fifo_never_holds_another_jobs_uploads(base: Path) -> None:
    """Job A's tier holds a FIFO as a commit object; job B's uploads go on (they waited forever)."""
    shared = base / "shared"
    url = f"file://{shared}"
    d = start_daemon(base, f'remote_allow = ["{url}"]\n')
    try:
        a, b = job_dir(d, None, "a"), job_dir(d, None, "b")
        for pre in (job_prefix("a", str(a), os.getuid()), "a"):  # where this and the version-1 daemon look
            (shared / pre).mkdir(parents=True)
            os.mkfifo(shared / pre / "a-step00000000.safetensors.commit.json")
        assert saver(d, None, "a", a, {"remote": url}, 1)[1]["ok"]
        assert saver(d, None, "b", b, {"remote": url}, 1)[1]["ok"]
        store = open_store(url)
        b_pre = job_prefix("b", str(b), os.getuid())
        wait_until(lambda: [c.step for c in committed(store, b_pre)] == [1], 30, "job b's upload")
        wait_until(
            lambda: [c.step for c in committed(store, job_prefix("a", str(a), os.getuid()))] == [1],
            30,
            "job a's own upload too",
        )
    finally:
        d.stop()


def test_a_hung_endpoint_holds_only_its_own_jobs_lane(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One job's S3 endpoint accepts and never answers; another job's ``file://`` uploads finish at
    once (they queued behind the hung one's 60 s timeouts and retries)."""
    from ckptd.remote.uploader import Upload, Uploader
    from tests.test_remote import HungStore

    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    hung = HungStore()
    uploader = Uploader()
    try:
        a = checkpoint(tmp_path / "a", "a-step00000001.safetensors", step=1, seed=1)
        b = checkpoint(tmp_path / "b", "b-step00000001.safetensors", step=1, seed=2)
        uploader.submit(Upload("a", a, Settings(remote="s3://bucket/runs", remote_endpoint=hung.url)))
        time.sleep(0.5)  # a's lane is inside its request
        url = f"file://{tmp_path / 'shared'}"
        uploader.submit(Upload("b", b, Settings(remote=url)))
        t0 = time.monotonic()
        wait_until(lambda: [p.job for p in uploader.pending] == ["a"], 20, "b's upload beside a's hung one")
        assert time.monotonic() - t0 < 20
        assert [c.step for c in committed(open_store(url), job_prefix("b", str(tmp_path / "b"), os.getuid()))] == [1]
    finally:
        hung.stop()
        uploader.close(timeout=30)


# -- H7: what is uploaded is what verified ------------------------------------------------------------------


@as_root
def test_a_checkpoint_swapped_for_a_link_while_its_upload_waits_publishes_nothing_else(
    base: Path, users: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store is down; the attacker's verified checkpoint waits for its upload; he swaps it for a
    symlink to the victim's 0700 checkpoint. The store comes back: his own verified bytes are
    published (they were read from the fd that verified), never hers."""
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    s3 = MotoServer(base)
    d = start_daemon(base, f'remote_allow = ["s3://ckpt/fleet"]\nremote_endpoint = "{s3.endpoint}"\n', env=S3_ENV)
    victim, attacker = users.user(), users.user()
    secret_dir = base / "victim"
    secret = Path(checkpoint(secret_dir, "v-step00000005.safetensors", step=5, seed=5))
    os.chown(secret_dir, victim.uid, victim.gid)
    os.chown(secret, victim.uid, victim.gid)
    os.chmod(secret_dir, 0o700)
    run = job_dir(d, attacker, "mallory")
    try:
        out = saver(d, attacker, "run", run, {"remote": "s3://ckpt/fleet"}, 1)
        assert out[1]["ok"], out
        mine = (run / "run-step00000001.safetensors").read_bytes()
        try:
            wait_until(lambda: "retrying with backoff" in d.log.read_text(), 30, "the upload failing")
        except AssertionError:
            raise AssertionError(d.log.read_text()[-4000:]) from None
        swap = as_user(
            attacker,
            "",
            "os.symlink(sys.argv[1], sys.argv[2] + '.x')\nos.rename(sys.argv[2] + '.x', sys.argv[2])",
            str(secret),
            str(run / "run-step00000001.safetensors"),
        )
        assert swap.returncode == 0, swap.stderr
        s3.start().client().create_bucket(Bucket="ckpt")
        client = s3.client()

        def keys() -> list[str]:
            return [o["Key"] for o in client.list_objects_v2(Bucket="ckpt").get("Contents", [])]

        wait_until(lambda: any(k.endswith(COMMIT) for k in keys()), 90, "a commit after the store came back")
        data = [k for k in keys() if not k.endswith(COMMIT)]
        published = [client.get_object(Bucket="ckpt", Key=k)["Body"].read() for k in data]
        assert secret.read_bytes() not in published
        assert published == [mine]
    finally:
        d.stop()
        s3.stop()


# -- L3, L4: fetch from a hostile bucket ---------------------------------------------------------------


def test_fetch_writes_only_checkpoint_names(tmp_path: Path) -> None:
    """A commit object of a hostile bucket named ``.bashrc``: fetch wrote it into the target."""
    store = open_store(f"file://{tmp_path / 'shared'}")
    src = checkpoint(tmp_path / "src", "run-step00000001.safetensors", step=1, seed=1)
    good = replicate(store, "run", src)
    doc = json.loads(store.open(good.key + COMMIT)[0].read())
    for name in (".bashrc", "x.safetensors.lnk"):
        store.put_file(src, f"run/{name}")
        store.put_bytes(f"run/{name}{COMMIT}", json.dumps({**doc, "key": f"run/{name}", "step": 9}).encode())
    target = tmp_path / "home"
    r = ckptd_cli("fetch", f"{store.url}/run", str(target))
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(target)) == ["run-step00000001.safetensors"]
    assert "not a checkpoint's name" in r.stderr


def test_fetch_stops_reading_at_the_committed_size(tmp_path: Path) -> None:
    """A 300 MiB object against a small commit object was streamed whole before the sizes were
    compared; now fetch reads at most the committed size (and one byte more)."""
    store = open_store(f"file://{tmp_path / 'shared'}")
    src = checkpoint(tmp_path / "src", "run-step00000001.safetensors", step=1, seed=1)
    c = replicate(store, "run", src)
    with open(tmp_path / "shared" / c.key, "r+b") as f:
        f.truncate(300 << 20)  # the bucket's object, 300 MiB now
    code = (
        "import sys\nfrom ckptd.remote.fetch import fetch\nfrom ckptd.remote.stores import open_store\n"
        "def rchar():\n    return int(open('/proc/self/io').read().split('rchar: ')[1].split()[0])\n"
        "before = rchar()\nprint(fetch(open_store(sys.argv[1]), 'run', sys.argv[2]), rchar() - before)"
    )
    r = subprocess.run(
        [PYTHON, "-c", code, store.url, str(tmp_path / "dst")],
        cwd=ROOT,
        env=project_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    path, read = r.stdout.split()
    assert path == "None" and int(read) < c.bytes + (4 << 20), r.stdout + r.stderr
    assert "its commit object says" in r.stderr
    assert os.listdir(tmp_path / "dst") == []
    assert stat.S_ISDIR(os.stat(tmp_path / "dst").st_mode)

"""The remote tier (issue 15, SPEC §11), store side: upload, verification of the remote copy,
commit last, listing, remote retention, fetch. Each case runs against a real S3-compatible
server (moto in server mode on loopback) and against a ``file://`` tier on a second filesystem."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptd.cli.remote import jobs_at
from ckptd.core.format import read_header
from ckptd.core.settings import Settings
from ckptd.disk import manifest as mf
from ckptd.disk.verify import verify_file, verify_unit
from ckptd.remote.fetch import fetch
from ckptd.remote.layout import job_prefix
from ckptd.remote.listing import COMMIT, RemoteCheckpoint, committed
from ckptd.remote.prune import prune_remote
from ckptd.remote.stores import RemoteError, Store, open_store
from ckptd.remote.upload import replicate
from ckptd.remote.verify import verify_remote
from tests.conftest import ROOT, MotoServer, run_py
from tests.helpers import save_state, small_checkpoint
from trainer_hooks import Checkpointer


def checkpoints(directory: Path, steps: tuple[int, ...]) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    return [small_checkpoint(directory, f"t-step{s:08d}.safetensors", step=s, seed=s) for s in steps]


def corrupt(store: Store, key: str, offset: int = -3) -> None:
    body, size = store.open(key)
    data = bytearray(body.read(size))
    body.close()
    data[offset] ^= 0x40
    store.put_bytes(key, bytes(data))


def test_replicated_checkpoints_verify_and_fetch_bit_identical(store: Store, tmp_path: Path) -> None:
    paths = checkpoints(tmp_path / "host1", (10, 20, 30))
    for p in paths:
        c = replicate(store, "t", p)
        assert c.step == int(p[-20:-12]) and c.bytes == os.path.getsize(p)
    listed = committed(store, "t")
    assert [c.step for c in listed] == [10, 20, 30]
    assert all(verify_remote(store, c).ok for c in listed)
    got = fetch(store, "t", str(tmp_path / "host2"))  # a new host: the newest, verified, under its own name
    assert got == str(tmp_path / "host2" / "t-step00000030.safetensors")
    assert Path(got).read_bytes() == Path(paths[-1]).read_bytes() and verify_file(got).ok
    older = fetch(store, "t", str(tmp_path / "host3"), step=20)
    assert older is not None and Path(older).read_bytes() == Path(paths[1]).read_bytes()
    assert not [n for n in os.listdir(tmp_path / "host2") if n.startswith(".")]  # no temp file left


def test_a_flipped_byte_fails_verification_and_is_never_fetched(store: Store, tmp_path: Path) -> None:
    for p in checkpoints(tmp_path / "host1", (10, 20)):
        replicate(store, "t", p)
    newest = committed(store, "t")[-1]
    corrupt(store, newest.key)
    result = verify_remote(store, newest)
    assert not result.ok and "digest mismatch" in result.reason
    got = fetch(store, "t", str(tmp_path / "host2"))
    assert got is not None and got.endswith("t-step00000010.safetensors")  # the older one that verifies
    assert os.listdir(tmp_path / "host2") == ["t-step00000010.safetensors"]


def test_data_without_its_commit_object_does_not_count(store: Store, tmp_path: Path) -> None:
    """An upload cut off after the data and before the commit object: never listed, fetched or
    resumed from; remote retention removes it once a later checkpoint committed."""
    early, late = checkpoints(tmp_path / "host1", (10, 20))
    store.put_file(early, "t/" + os.path.basename(early))
    assert committed(store, "t") == []
    assert fetch(store, "t", str(tmp_path / "host2")) is None
    replicate(store, "t", late)
    prune_remote(store, "t", Settings(), time.time())
    assert sorted(store.list("t/")) == ["t/t-step00000020.safetensors", "t/t-step00000020.safetensors" + COMMIT]


def test_remote_retention_is_its_own(store: Store, tmp_path: Path) -> None:
    for p in checkpoints(tmp_path / "host1", (10, 20, 30, 40)):
        replicate(store, "t", p)
    verdicts = prune_remote(
        store, "t", Settings(remote_keep_last=1, remote_keep_every_steps=20, keep_last=4), time.time()
    )
    assert {v.item.step: v.keep for v in verdicts} == {40: True, 30: False, 20: True, 10: False}
    assert [c.step for c in committed(store, "t")] == [20, 40]
    assert sorted(store.list("t/")) == sorted(
        f"t/t-step000000{s}.safetensors{x}" for s in (20, 40) for x in ("", COMMIT)
    )
    assert len(os.listdir(tmp_path / "host1")) == 4  # local files are never touched by remote retention


def test_s3_vouches_for_an_upload_by_its_own_checksum_and_a_file_store_does_not(
    moto: MotoServer, tmp_path: Path
) -> None:
    """At upload, S3's SHA-256 of what it received stands in for reading the object back; it
    must equal the local file's (which verified tensor by tensor). A filesystem keeps none."""
    (path,) = checkpoints(tmp_path / "host1", (10,))
    s3 = open_store("s3://ckpt/x", moto.endpoint)
    c = replicate(s3, "t", path)
    assert s3.matches(path, c.key) is True
    other = tmp_path / "other.safetensors"
    data = bytearray(Path(path).read_bytes())
    data[-3] ^= 0x40
    other.write_bytes(bytes(data))
    assert s3.matches(str(other), c.key) is False  # one flipped bit, and the store says so
    assert open_store(f"file://{tmp_path}/fs").matches(path, "t/x") is None


def test_a_missing_bucket_is_one_clear_error(moto: MotoServer, tmp_path: Path) -> None:
    (path,) = checkpoints(tmp_path / "host1", (10,))
    with pytest.raises(RemoteError, match="NoSuchBucket"):
        replicate(open_store("s3://no-such-bucket/x", moto.endpoint), "t", path)


def test_a_store_that_is_down_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import S3_ENV, free_port

    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    (path,) = checkpoints(tmp_path / "host1", (10,))
    store = open_store("s3://ckpt/x", f"http://127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match="upload t/t-step00000010.safetensors"):
        replicate(store, "t", path)
    assert time.monotonic() - t0 < 30  # bounded retries, not a hang


# --- end to end: a training run with a remote tier ----------------------------------------------

TOY = str(ROOT / "examples" / "train_toy.py")


def toy(directory: Path, steps: int, env: dict[str, str], *extra: str) -> dict:  # type: ignore[type-arg]
    r = run_py(
        TOY,
        "--dir",
        str(directory),
        "--job",
        "toy",
        "--steps",
        str(steps),
        "--every-steps",
        "10",
        *extra,
        env={**env, "CKPTD_SOCKET": str(directory.parent / "no-daemon.sock")},
        timeout=180,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return {
        "start": int(r.stdout.split("starting at step ")[1].split()[0]),
        **json.loads(r.stdout.strip().splitlines()[-1]),
        "log": r.stderr,
    }


@pytest.mark.slow
def test_a_new_host_resumes_from_the_remote_tier_bit_identical(store: Store, tmp_path: Path) -> None:
    """Every verified checkpoint goes to the remote; local retention waits for it; the host's disk
    is lost; a new host (the same job: the same user, the same directory path) resumes from the
    remote and ends where an uninterrupted run ends, bit for bit."""
    env = {"CKPTD_REMOTE": store.url, "CKPTD_REMOTE_KEEP_LAST": "2"}
    if store.url.startswith("s3://"):
        env["CKPTD_REMOTE_ENDPOINT"] = os.environ["CKPT_TEST_ENDPOINT"]
    straight = toy(tmp_path / "straight", 60, {})
    first = toy(tmp_path / "host1", 30, env, "--keep-last", "1")
    assert first["start"] == 0 and first["stats"]["verified"] == 3
    pre = job_prefix("toy", str((tmp_path / "host1").resolve()), os.getuid())
    assert [c.step for c in committed(store, pre)] == [20, 30]  # remote_keep_last=2, its own rule
    assert os.listdir(tmp_path / "host1") == ["toy-step00000030.safetensors"]  # local keep_last=1, once remote
    shutil.rmtree(tmp_path / "host1")  # the host is gone
    second = toy(tmp_path / "host1", 60, env)
    assert second["start"] == 30 and "fetched" in second["log"]
    assert second["fingerprint"] == straight["fingerprint"]
    # remote_keep_last=2 keeps the second run's two newest; the first run's final (30) stays by keep_final
    verified = [int(m) for m in re.findall(r"ckptd: step (\d+) saved and verified", second["log"])]
    assert verified[-1] == 60 and len(verified) >= 2, second["log"][-3000:]
    remote_log = "\n".join(line for line in second["log"].splitlines() if "remote" in line)
    assert [c.step for c in committed(store, pre)] == [30, *sorted(verified)[-2:]], (second["stats"], remote_log)


@pytest.mark.slow
def test_a_store_that_is_down_costs_no_local_copy_and_no_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import S3_ENV, free_port

    env = {
        **S3_ENV,
        "CKPTD_REMOTE": "s3://ckpt/x",
        "CKPTD_REMOTE_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "CKPTD_REMOTE_TIMEOUT": "3s",
    }
    run = toy(tmp_path / "host1", 30, env, "--keep-last", "1")
    assert run["stats"]["verified"] == 3 and run["stats"]["failed"] == 0  # training went on, saves verified
    assert sorted(os.listdir(tmp_path / "host1")) == [f"toy-step000000{s}.safetensors" for s in (10, 20, 30)]
    assert run["log"].count("retrying with backoff") == 1  # said once, with the store's own words
    assert "3 checkpoint(s) not yet on s3://ckpt/x after 3s" in run["log"]


@pytest.mark.slow
def test_the_server_killed_mid_upload_and_restarted_gets_the_whole_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL to the S3 server while a multipart upload is in flight; a new server on the same
    port (an empty one: moto keeps nothing). The uploader retries the checkpoint from the start;
    nothing is ever listed before it is whole and verified, and it ends committed and verified."""
    import torch

    from ckptd.remote.uploader import Upload, Uploader
    from tests.conftest import S3_ENV, wait_until
    from tests.helpers import save_state

    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    (tmp_path / "host1").mkdir()
    path = save_state(
        {"w": torch.rand(130 << 18)}, tmp_path / "host1", "big-step00000010.safetensors", job="big", step=10
    )  # 130 MiB: three parts of a multipart upload
    server = MotoServer(tmp_path).start()
    server.client().create_bucket(Bucket="ckpt")
    store = open_store("s3://ckpt/x", server.endpoint)
    done: list[object] = []
    uploader = Uploader(on_done=lambda u, c, rest: done.append(c))
    try:
        uploader.submit(Upload("big", path, Settings(remote=store.url, remote_endpoint=server.endpoint)))
        wait_until(
            lambda: server.client().list_multipart_uploads(Bucket="ckpt").get("Uploads"),
            60,
            "a multipart upload in flight",
        )
        prefix = job_prefix("big", str((tmp_path / "host1").resolve()), os.getuid())  # its owner, directory, name
        assert committed(store, prefix) == []
        server.stop()  # SIGKILL
        server = MotoServer(tmp_path, port=server.port).start()
        server.client().create_bucket(Bucket="ckpt")
        wait_until(lambda: done, 120, "the upload, retried after the restart")  # (done: after commit and prune)
        (c,) = committed(store, prefix)
        assert done and verify_remote(store, c).ok and c.bytes == os.path.getsize(path)
        assert store.matches(path, c.key) is True  # S3's composite SHA-256 over the three parts
        assert set(store.list(prefix + "/")) == {c.key, c.key + COMMIT}
    finally:
        uploader.close(timeout=10)
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["missing bucket", "wrong credentials"])
def test_a_store_that_refuses_is_said_once_and_costs_no_training(fault: str, tmp_path: Path) -> None:
    """The store answers, and refuses: a bucket that does not exist, keys it does not know (moto
    checking credentials). One error with the store's own words; every save verifies locally
    and stays on disk, since none is remote."""
    from tests.conftest import S3_ENV

    auth = {"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if fault == "wrong credentials" else {}
    server = MotoServer(tmp_path, auth).start()
    try:
        words, bucket = ("InvalidAccessKeyId", "ckpt") if auth else ("NoSuchBucket", "no-such-bucket")
        env = {
            **S3_ENV,
            "CKPTD_REMOTE": f"s3://{bucket}/x",
            "CKPTD_REMOTE_ENDPOINT": server.endpoint,
            "CKPTD_REMOTE_TIMEOUT": "3s",
        }
        run = toy(tmp_path / "host1", 30, env, "--keep-last", "1")
    finally:
        server.stop()
    assert run["stats"]["verified"] == 3 and run["stats"]["failed"] == 0
    assert sorted(os.listdir(tmp_path / "host1")) == [f"toy-step000000{s}.safetensors" for s in (10, 20, 30)]
    said = [line for line in run["log"].splitlines() if words in line]
    assert len(said) == 2, run["log"][-3000:]  # once by resume(), once by the uploader for all three saves
    assert sum("remote tier cannot be read" in line for line in said) == 1
    assert sum("retrying with backoff; training is not affected" in line for line in said) == 1


@pytest.mark.slow
def test_the_daemon_replicates_across_its_own_restart_and_a_store_outage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the daemon: the store is down while the run trains (nothing local is deleted for
    it, the lag shows), the daemon is SIGKILLed and restarted, the store comes back: every
    checkpoint is uploaded and verified, then local retention catches up."""
    from tests.conftest import S3_ENV, DaemonProc, wait_until

    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    s3 = MotoServer(tmp_path)  # its port is chosen now; it starts later
    allow = f'remote_allow = ["s3://ckpt/fleet"]\nremote_endpoint = "{s3.endpoint}"\n'  # the daemon's, not the client's
    d = DaemonProc(tmp_path / "d", allow, env=S3_ENV).start()
    run_dir = d.root / "toy"
    env = {"CKPTD_SOCKET": d.socket, "CKPTD_REMOTE": "s3://ckpt/fleet"}
    try:
        r = run_py(
            TOY,
            "--dir",
            str(run_dir),
            "--job",
            "toy",
            "--steps",
            "30",
            "--every-steps",
            "10",
            "--keep-last",
            "1",
            env=env,
            timeout=180,
        )
        assert r.returncode == 0 and "connected to the daemon" in r.stderr, r.stderr[-2000:]
        labels = {"training_job": "toy", "directory": str(run_dir)}
        wait_until(lambda: d.metric("ckptd_remote_uploads_total", outcome="failed", **labels) >= 1, 30, "a failure")
        assert d.metric("ckptd_remote_lag_seconds", **labels) > 0
        assert len(os.listdir(run_dir)) == 3  # keep_last=1, but none of them is remote yet
        d.kill(9)
        d = DaemonProc(tmp_path / "d", allow, env=S3_ENV).start()  # same state dir: the catalogue says what to resync
        s3.start().client().create_bucket(Bucket="ckpt")
        store = open_store("s3://ckpt/fleet", s3.endpoint)
        pre = job_prefix("toy", str(run_dir), os.getuid())
        wait_until(lambda: len(committed(store, pre)) == 3, 90, "the uploads after the store came back")
        wait_until(lambda: os.listdir(run_dir) == ["toy-step00000030.safetensors"], 30, "local retention")
        assert all(verify_remote(store, c).ok for c in committed(store, pre))
        assert store.list("").keys() == {
            f"{pre}/toy-step000000{s}.safetensors{x}" for s in (10, 20, 30) for x in ("", COMMIT)
        }  # nothing partial left behind
        assert "remote" in d.log.read_text() and "retrying with backoff" in d.log.read_text()
    finally:
        d.stop()
        s3.stop()


def test_cli_list_verify_and_fetch_a_remote_job(store: Store, tmp_path: Path) -> None:
    from tests.conftest import ckptd_cli

    for p in checkpoints(tmp_path / "host1", (10, 20)):
        replicate(store, "t", p)
    url = f"{store.url}/t"
    endpoint = ["--endpoint", os.environ["CKPT_TEST_ENDPOINT"]] if url.startswith("s3://") else []
    listed = json.loads(ckptd_cli("list", "--remote", url, "--json", *endpoint).stdout)
    assert [(c["step"], c["url"]) for c in listed] == [(s, f"{url}/t-step000000{s}.safetensors") for s in (10, 20)]
    ok = ckptd_cli("verify", url, *endpoint)
    assert ok.returncode == 0 and ok.stdout.count("ok      ") == 2, ok.stdout + ok.stderr
    corrupt(store, committed(store, "t")[-1].key)
    bad = ckptd_cli("verify", f"{url}/t-step00000020.safetensors", *endpoint)
    assert bad.returncode == 1 and "CORRUPT" in bad.stdout and "digest mismatch" in bad.stdout
    got = ckptd_cli("fetch", url, str(tmp_path / "host2"), *endpoint)  # the newest that verifies: step 10
    assert got.returncode == 0 and got.stdout.strip() == str(tmp_path / "host2" / "t-step00000010.safetensors")
    missing = ckptd_cli("fetch", url, str(tmp_path / "host3"), "--step", "20", *endpoint)
    assert missing.returncode == 1 and "no committed checkpoint of step 20 verifies" in missing.stderr
    assert not (tmp_path / "host3").exists() or os.listdir(tmp_path / "host3") == []


def test_cli_names_a_remote_job_by_its_name_from_the_config(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ckptd list --remote JOB`` and ``ckptd fetch JOB DIR``: the job's remote comes from where its
    trainer's would, here ``[jobs.t]`` of the config; a job without one is a usage error naming it."""
    from tests.conftest import ckptd_cli

    run = tmp_path / "run"  # saved here on a lost host; fetched here on a new one
    for p in checkpoints(run, (10, 20)):
        replicate(store, "t", p, prefix=job_prefix("t", str(run), os.getuid()))
    shutil.rmtree(run)
    endpoint = f'remote_endpoint = "{os.environ["CKPT_TEST_ENDPOINT"]}"\n' if store.url.startswith("s3://") else ""
    config = tmp_path / "ckptd.toml"
    config.write_text(f'[jobs.t]\nremote = "{store.url}"\n{endpoint}')
    monkeypatch.setenv("CKPTD_CONFIG", str(config))
    listed = json.loads(ckptd_cli("list", "t", "--remote", "--json").stdout)
    assert [c["step"] for c in listed] == [10, 20]
    got = ckptd_cli("fetch", "t", str(run))
    assert got.returncode == 0 and got.stdout.strip() == str(run / "t-step00000020.safetensors"), got.stderr
    none = ckptd_cli("fetch", "other", str(tmp_path / "host3"))
    assert none.returncode == 2 and "job other has no remote tier" in none.stderr, none.stderr


def test_cli_lists_every_job_below_the_hooks_remote_url(store: Store, tmp_path: Path) -> None:
    """The URL a user gave the hook as ``remote=`` lists each job below it (it listed nothing, with
    an "unreadable commit object" warning per save); a job that is not there is named, with those
    that are."""
    from tests.conftest import ckptd_cli

    endpoint = os.environ.get("CKPT_TEST_ENDPOINT") if store.url.startswith("s3://") else None
    for job in ("alpha", "beta"):
        ckpt = Checkpointer(
            job,
            tmp_path / job,
            model=torch.nn.Linear(4, 4),
            every_steps=2,
            socket=False,
            remote=store.url,
            remote_endpoint=endpoint,
        )
        for _ in range(4):
            ckpt.step()
        ckpt.close()
    args = ["--endpoint", endpoint] if endpoint else []
    r = ckptd_cli("list", "--remote", store.url, "--json", *args)
    assert r.returncode == 0 and "unreadable commit object" not in r.stderr, r.stderr
    assert sorted((c["job"], c["step"]) for c in json.loads(r.stdout)) == [
        ("alpha", 2),
        ("alpha", 4),
        ("beta", 2),
        ("beta", 4),
    ]
    beta = job_prefix("beta", str((tmp_path / "beta").resolve()), os.getuid())  # its owner, its directory, its name
    one = ckptd_cli("list", "--remote", f"{store.url}/{beta}", "--json", *args)
    assert [(c["job"], c["step"]) for c in json.loads(one.stdout)] == [("beta", 2), ("beta", 4)], one.stderr
    missing = ckptd_cli("list", "--remote", f"{store.url}/gamma", *args)
    assert missing.returncode == 1 and f"no job gamma under {store.url}; found: u{os.getuid()}/" in missing.stderr
    verified = ckptd_cli("verify", store.url, *args)
    assert verified.returncode == 0 and verified.stdout.count("ok      ") == 4, verified.stdout + verified.stderr
    several = ckptd_cli("fetch", store.url, str(tmp_path / "host2"), *args)
    assert several.returncode == 2 and "holds several jobs (" in several.stderr, several.stderr
    assert "/alpha" in several.stderr and "/beta" in several.stderr, several.stderr  # each prefix, in key order


class HungStore:
    """An S3 endpoint on loopback that accepts every connection and never answers (a store that
    hangs, as one behind a dead NAT does), until ``stop`` closes everything."""

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list[Any] = []
        self.thread = threading.Thread(target=self._accept, name="hung-store", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def stop(self) -> None:
        import socket

        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(10)
        for c in self.conns:
            c.close()


@pytest.mark.serial
def test_a_hung_remote_never_delays_a_local_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The local save's retention asks which checkpoints are already remote; it used to list the
    store on the persist thread, so a store that hangs held every save for its timeouts (60 s a
    try). It reads the cached index now, refreshed off that thread: saves go on at disk speed,
    and everything stays on disk while the store cannot say what it holds."""
    from ckptd.disk.scan import scan

    for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    store = HungStore()
    ckpt = Checkpointer(
        "hung",
        tmp_path,
        model=torch.nn.Linear(64, 64),
        every_steps=1,
        socket=False,
        keep_last=1,
        remote="s3://bucket/runs",
        remote_endpoint=store.url,
        remote_timeout=1,
        quiet=True,
    )
    try:
        t0 = time.monotonic()
        for _ in range(3):
            ckpt.step()
            ckpt.wait()
        elapsed = time.monotonic() - t0
        assert ckpt.stats["verified"] == 3, ckpt.saved
        assert elapsed < 20, f"three local saves took {elapsed:.1f}s behind a hung store"
        assert [c.step for c in scan(str(tmp_path), "hung")] == [1, 2, 3]  # not remote yet: all kept
    finally:
        store.stop()
        ckpt.close(final=False)


def test_checkpoints_that_refer_to_a_frozen_base_replicate_verify_fetch_and_resume(
    store: Store, tmp_path: Path
) -> None:
    """Stored once locally, stored once remotely (SPEC §13 with §11): the holder is committed before
    any checkpoint that refers to it, remote retention keeps it while a kept copy refers to it,
    ``ckptd verify`` checks the references there, and a new host resumes bit for bit from the
    remote tier alone (the holder fetched first)."""
    from tests.conftest import ckptd_cli
    from tests.scripts.lora_train import build

    endpoint = os.environ.get("CKPT_TEST_ENDPOINT") if store.url.startswith("s3://") else None
    model, opt = build()
    ckpt = Checkpointer(
        "lora",
        tmp_path / "host1",
        model=model,
        optimizer=opt,
        every_steps=1,
        keep_last=2,
        remote=store.url,
        remote_endpoint=endpoint,
        remote_keep_last=1,
        quiet=True,
        socket=False,
    )
    for step in range(5):
        model(torch.randn(16, 512, generator=torch.Generator().manual_seed(step))).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        ckpt.step()
    ckpt.close()
    pre = job_prefix("lora", str((tmp_path / "host1").resolve()), os.getuid())
    remote = committed(store, pre)
    assert [c.step for c in remote] == [1, 5] and remote[1].refs == (remote[0].name,), remote
    assert remote[0].bytes > 10 * remote[1].bytes
    args = ["--endpoint", endpoint] if endpoint else []
    ok = ckptd_cli("verify", f"{store.url}/{pre}", *args)
    assert ok.returncode == 0 and ok.stdout.count("ok      ") == 2, ok.stdout + ok.stderr
    model2, opt2 = build(seed=9)
    shutil.rmtree(tmp_path / "host1")  # a new host, the same job (user, directory)
    host2 = Checkpointer(
        "lora",
        tmp_path / "host1",
        model=model2,
        optimizer=opt2,
        remote=store.url,
        remote_endpoint=endpoint,
        socket=False,
        save_final=False,
        quiet=True,
    )
    assert host2.resume() == 5
    host2.close(final=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in model2.state_dict().items())
    assert sorted(os.listdir(tmp_path / "host1")) == [remote[0].name, remote[1].name]
    store.delete(remote[0].key)  # the holder's data gone: the copy that refers to it no longer verifies
    bad = ckptd_cli("verify", f"{store.url}/{pre}/{remote[1].name}", *args)
    assert bad.returncode == 1 and f"referenced file {remote[0].name} cannot be read" in bad.stdout, bad.stdout


@pytest.mark.slow
def test_replication_lag_counts_from_the_oldest_waiting_and_the_newest_goes_up_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S3 is down while a job keeps saving: ``ckptd_remote_lag_seconds`` is the age of the oldest
    verified checkpoint not yet remote, so it grows past the outage (it was the newest's age, a
    few seconds, and the alert never fired). When S3 is back, the newest checkpoint, the one a
    lost host would resume from, is remote first; then the backlog."""
    from tests.conftest import S3_ENV, DaemonProc, wait_until
    from tests.security.test_remote_trust import job_dir, saver

    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    s3 = MotoServer(tmp_path).start()
    s3.client().create_bucket(Bucket="ckpt")
    d = DaemonProc(
        tmp_path / "d", f'remote_allow = ["s3://ckpt/fleet"]\nremote_endpoint = "{s3.endpoint}"\n', env=S3_ENV
    ).start()
    run = job_dir(d, None, "lag")
    down, end = tmp_path / "down", tmp_path / "end"
    trainer = saver(
        d,
        None,
        "lag",
        run,
        {"remote": "s3://ckpt/fleet"},
        1,
        f"gate:{down}",
        2,
        "pause:3",
        3,
        "pause:3",
        4,
        "pause:3",
        5,
        f"gate:{end}",
        wait=False,
    )
    store = open_store("s3://ckpt/fleet", s3.endpoint)
    pre = job_prefix("lag", str(run), os.getuid())
    labels = {"training_job": "lag", "directory": str(run)}
    try:
        wait_until(lambda: [c.step for c in committed(store, pre)] == [1], 60, "the first upload")
        s3.stop()
        t_down = time.time()
        down.touch()
        wait_until(lambda: (run / "lag-step00000005.safetensors").exists(), 60, "four saves during the outage")
        wait_until(lambda: time.time() - t_down > 12, 20, "a 12 s outage")  # saves 3 s apart: the newest is recent
        newest_age = time.time() - os.path.getmtime(run / "lag-step00000005.safetensors")
        lag = d.metric("ckptd_remote_lag_seconds", **labels)
        assert lag >= time.time() - t_down - 2 and lag > newest_age + 3, (lag, newest_age)
        log_before = len(d.log.read_text())
        s3 = MotoServer(tmp_path, port=s3.port).start()
        s3.client().create_bucket(Bucket="ckpt")

        def order() -> list[int]:
            return [
                int(m) for m in re.findall(r"lag-step(\d+)\.safetensors verified at", d.log.read_text()[log_before:])
            ]

        wait_until(lambda: len(order()) == 4, 120, "the backlog")
        assert order() == [5, 4, 3, 2], d.log.read_text()[-3000:]
        assert [c.step for c in committed(store, pre)] == [2, 3, 4, 5]  # (a restarted moto forgot step 1)
        wait_until(lambda: d.metric("ckptd_remote_lag_seconds", **labels) == 0, 30, "no lag once all is remote")
    finally:
        end.touch()
        trainer.communicate(timeout=60)
        d.stop()
        s3.stop()


def spread_unit(root: Path, step: int, disks: tuple[str, str] = ("a" * 32, "b" * 32)) -> list[Path]:
    """A 4-rank unit as two hosts' node-local disks hold it after a save (SPEC §15): each host's
    directory has its own 2 ranks' shards and the same manifest, which puts each shard on its disk."""
    name = f"t-step{step:08d}"
    hosts = [root / f"host{h}" for h in (0, 1)]
    shards = []
    for r in range(4):
        unit = hosts[r // 2] / name
        unit.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(step * 10 + r)
        path = save_state({"w": torch.randn(64)}, unit, mf.shard_name(r, 4), job="t", step=step)
        with open(path, "rb") as f:
            digest = read_header(f, os.path.getsize(path)).metadata["ckptd.meta_digest"]
        shards.append(mf.Shard(r, mf.shard_name(r, 4), os.path.getsize(path), digest, f"host{r // 2}", disks[r // 2]))
    manifest = mf.Manifest("t", step, 4, tuple(shards), trigger="step")
    for h in hosts:
        mf.write(str(h / name), manifest)
    return [h / name for h in hosts]


def upload_from(store: Store, unit: Path) -> RemoteCheckpoint:
    """``replicate`` as the host that holds ``unit`` runs it: its job directory has the same path
    on every host (``ROOT/ckpt``), so the host's directory takes that path while it uploads."""
    here = unit.parent.parent / "ckpt"
    unit.parent.rename(here)
    try:
        return replicate(store, "t", str(here / unit.name))
    finally:
        here.rename(unit.parent)


def test_a_unit_spread_over_hosts_counts_once_every_hosts_part_is_up(store: Store, tmp_path: Path) -> None:
    """Each host uploads its own shards and then its part commit; a reader counts the unit only
    when a part of every disk the manifest names is there, each naming that disk's shards, and
    then verifies and fetches all of it. No host writes for another."""
    h0, h1 = spread_unit(tmp_path, 10)
    part = upload_from(store, h0)
    assert part.disk == "a" * 32 and part.shards == (mf.shard_name(0, 4), mf.shard_name(1, 4))
    assert committed(store, "t") == [], "one host's part is not the unit"
    assert jobs_at(store) == ["t"], "ckptd list --remote finds the job by its part"
    assert fetch(store, "t", str(tmp_path / "new")) is None
    before = dict(store.list("t/"))
    assert upload_from(store, h0).disk == part.disk and dict(store.list("t/")) == before  # not again
    upload_from(store, h1)
    (unit,) = committed(store, "t")
    assert unit.step == 10 and len(unit.shards) == 4 and len(unit.parts) == 2 and unit.disk == ""
    assert verify_remote(store, unit).ok
    got = fetch(store, "t", str(tmp_path / "new"))  # a host that holds nothing gets the whole unit
    assert got is not None and sorted(p.name for p in Path(got).glob("rank*")) == [
        mf.shard_name(r, 4) for r in range(4)
    ]
    assert verify_unit(got).ok
    assert fetch(store, "t", str(tmp_path / "host0"), here=[h0.name]) == str(h0)  # held here: not downloaded again
    other = mf.read(str(h0))
    mf.write(str(h0), mf.Manifest(other.job, other.step, other.world_size, other.shards, trigger="final"))
    assert fetch(store, "t", str(tmp_path / "host0"), here=[h0.name]) is None  # another attempt at step 10: not it

    # a part that names other shards than its disk's (a hostile or stale one): the unit does not count
    key = f"t/{h1.name}/ckptd-part-{'b' * 32}.json"
    body, size = store.open(key)
    doc = json.loads(body.read(size))
    body.close()
    store.put_bytes(key, json.dumps({**doc, "shards": [mf.shard_name(2, 4)]}).encode())
    assert committed(store, "t") == []
    store.put_bytes(key, json.dumps(doc).encode())
    assert [c.step for c in committed(store, "t")] == [10]
    corrupt(store, f"t/{h1.name}/{mf.shard_name(3, 4)}")  # a shard flipped after both parts committed
    assert not verify_remote(store, committed(store, "t")[0]).ok


def test_remote_retention_waits_for_the_parts_other_hosts_still_upload(store: Store, tmp_path: Path) -> None:
    """After an outage each host uploads newest first, so an older unit may hold one host's part
    for a while: it is kept, and completes when the other part comes. A unit whose other host
    never comes back goes a day after its first part was uploaded; one with a part that cannot
    be read is never deleted for it; a part planted for a disk the manifest does not name is
    nobody's. A committed spread unit that retention drops goes parts first, then its data."""
    for step in (10, 20):
        for host in spread_unit(tmp_path, step):
            upload_from(store, host)
    late = spread_unit(tmp_path, 15)
    upload_from(store, late[0])  # host 1's part of step 15 still to come
    lost, _ = spread_unit(tmp_path, 5)
    upload_from(store, lost)  # host 1 never uploads step 5
    unread, _ = spread_unit(tmp_path, 7)
    upload_from(store, unread)
    store.put_bytes(f"t/{unread.name}/ckptd-part-{'b' * 32}.json", b"{not json")  # host 1's, unreadable
    store.put_bytes(f"t/t-step00000010/ckptd-part-{'c' * 32}.json", b"{planted")  # a disk nobody has
    keep = Settings(remote_keep_last=5)
    prune_remote(store, "t", keep, time.time())
    units = {k.split("/")[1] for k in store.list("t/")}
    assert units == {f"t-step{s:08d}" for s in (5, 7, 10, 15, 20)}, units
    assert [c.step for c in committed(store, "t")] == [10, 20]
    upload_from(store, late[1])  # the other host's part comes: the unit counts
    assert [c.step for c in committed(store, "t")] == [10, 15, 20]
    prune_remote(store, "t", keep, time.time() + 2 * 86400)  # host 1 never came back for step 5
    assert {k.split("/")[1] for k in store.list("t/")} == {f"t-step{s:08d}" for s in (7, 10, 15, 20)}
    prune_remote(store, "t", Settings(remote_keep_last=1), time.time())
    assert [c.step for c in committed(store, "t")] == [20]
    assert {k.split("/")[1] for k in store.list("t/")} == {"t-step00000007", "t-step00000020"}

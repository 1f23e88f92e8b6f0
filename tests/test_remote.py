"""The remote tier (issue 15, SPEC §11), store side: upload, verification of the remote copy,
commit last, listing, remote retention, fetch. Each case runs against a real S3-compatible
server (moto in server mode on loopback) and against a ``file://`` tier on a second filesystem."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator

import pytest

from ckptd.store.remote import RemoteError, Store, open_store
from ckptd.store.replicate import COMMIT, committed, fetch, prune_remote, replicate, verify_remote
from ckptd.store.verify import verify_file
from tests.conftest import MotoServer, tmpfs_at
from tests.helpers import small_checkpoint


@pytest.fixture(params=["s3", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "s3":
        server: MotoServer = request.getfixturevalue("moto")
        yield open_store("s3://ckpt/team/runs", server.endpoint)
    else:
        with tmpfs_at(tmp_path / "shared", "64m") as shared:  # another filesystem than the checkpoints'
            yield open_store(f"file://{shared}/ckpt")


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
    prune_remote(store, "t", {}, time.time())
    assert sorted(store.list("t/")) == ["t/t-step00000020.safetensors", "t/t-step00000020.safetensors" + COMMIT]


def test_remote_retention_is_its_own(store: Store, tmp_path: Path) -> None:
    for p in checkpoints(tmp_path / "host1", (10, 20, 30, 40)):
        replicate(store, "t", p)
    verdicts = prune_remote(store, "t", {"remote_keep_last": 1, "remote_keep_every_steps": 20, "keep_last": 4},
                            time.time())
    assert {v.item.step: v.keep for v in verdicts} == {40: True, 30: False, 20: True, 10: False}
    assert [c.step for c in committed(store, "t")] == [20, 40]
    assert sorted(store.list("t/")) == sorted(f"t/t-step000000{s}.safetensors{x}" for s in (20, 40) for x in ("", COMMIT))
    assert len(os.listdir(tmp_path / "host1")) == 4  # local files are never touched by remote retention


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

"""Sharded checkpoints' pure rules: commit needs every rank verified at one step; the manifest."""

from __future__ import annotations

import json

import pytest

from ckptd.disk import manifest as mf


def test_commit_needs_every_rank_verified_at_the_same_step() -> None:
    good = [{"ok": True, "rank": r, "step": 10} for r in range(3)]
    assert mf.commit_problem(good, 3) == ""
    assert "2 of 3 ranks" in mf.commit_problem(good[:2], 3)
    failed = [*good[:2], {"ok": False, "rank": 2, "step": 10, "error": "no space"}]
    assert mf.commit_problem(failed, 3) == "rank 2: no space"
    skewed = [*good[:2], {"ok": True, "rank": 2, "step": 11}]
    assert "different steps [10, 11]" in mf.commit_problem(skewed, 3)
    twice = [*good[:2], {"ok": True, "rank": 1, "step": 10}]
    assert "twice" in mf.commit_problem(twice, 3)


def test_manifest_round_trip_and_rejects_inconsistent_ones() -> None:
    m = mf.Manifest(
        "j",
        40,
        2,
        (mf.Shard(0, mf.shard_name(0, 2), 10, "a" * 16), mf.Shard(1, mf.shard_name(1, 2), 11, "b" * 16)),
        trigger="step",
        epoch=1.5,
    )
    assert mf.Manifest.parse(m.to_json()) == m
    body = json.loads(m.to_json())
    body["world_size"] = 3
    with pytest.raises(mf.ManifestError, match="world size 3"):
        mf.Manifest.parse(json.dumps(body))
    body = json.loads(m.to_json())
    body["shards"][1]["file"] = "../../etc/passwd"
    with pytest.raises(mf.ManifestError, match="does not match its rank"):
        mf.Manifest.parse(json.dumps(body))
    with pytest.raises(mf.ManifestError, match="unreadable"):
        mf.Manifest.parse("{not json")


def _spread(disks: list[str]) -> mf.Manifest:
    shards = tuple(mf.Shard(r, mf.shard_name(r, len(disks)), 10, "a" * 16, f"h{r}", d) for r, d in enumerate(disks))
    return mf.Manifest("j", 40, len(disks), shards)


def test_a_hosts_copy_of_a_unit_is_told_by_the_shards_it_holds() -> None:
    """Node-local directories: the disk of a copy is the one its present shards name; the other
    disks' shards may be absent. Nothing is excused on one disk, for old manifests, for a copy
    holding no shard, or one whose shards name two disks."""
    a, b = "a" * 32, "b" * 32
    spread = _spread([a, a, b, b])
    names = [mf.shard_name(r, 4) for r in range(4)]
    assert mf.away(spread, names[:2]) == {2, 3}
    assert mf.away(spread, names[2:]) == {0, 1}
    assert mf.away(spread, []) == set()
    assert mf.away(spread, [names[0], names[2]]) == set()
    assert mf.away(_spread([a, a, a, a]), names[:2]) == set()
    assert mf.away(_spread(["", "", "", ""]), names[:2]) == set()


def test_a_manifest_names_hosts_and_disks_only_across_hosts_and_only_as_ids() -> None:
    one = mf.Manifest("j", 40, 1, (mf.Shard(0, mf.shard_name(0, 1), 10, "a" * 16),))
    assert set(json.loads(one.to_json())["shards"][0]) == {"rank", "file", "bytes", "meta_digest"}  # as before
    spread = _spread(["a" * 32, "b" * 32])
    assert mf.Manifest.parse(spread.to_json()) == spread
    body = json.loads(spread.to_json())
    body["shards"][1]["disk"] = "../elsewhere"
    with pytest.raises(mf.ManifestError, match="not a disk id"):
        mf.Manifest.parse(json.dumps(body))
    body = json.loads(spread.to_json())
    body["shards"][1]["host"] = "h\nforged log line"
    with pytest.raises(mf.ManifestError, match="not a host name"):
        mf.Manifest.parse(json.dumps(body))


def test_every_rank_walks_the_common_units_in_one_order() -> None:
    """Rank 0 cannot read step 40's header (it sorts oldest in its own listing, step -1): the
    agreed order still puts it first on every rank, so each round verifies one unit."""
    from ckptd.save.newest import agreed_order

    held = [
        [("u40", -1, False), ("u20", 20, True), ("u30", 30, True)],
        [("u20", 20, True), ("u30", 30, True), ("u40", 40, True)],
    ]
    assert agreed_order(held, {"u20", "u30", "u40"}) == ["u40", "u30", "u20"]
    assert agreed_order(list(reversed(held)), {"u20", "u30", "u40"}) == ["u40", "u30", "u20"]


def _fds() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


def test_a_disk_id_is_made_once_and_nothing_else_at_its_name_is_one(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Made once and read back the same; a directory or a FIFO at its name is no id, and no
    descriptor is left open however often it is looked at (a daemon scanning a hostile tree)."""
    import os

    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        made = mf.disk_of(fd, create=True)
        assert mf.DISK_RE.fullmatch(made) and mf.disk_of(fd, create=True) == made == mf.disk_of(fd, create=False)
        assert sorted(os.listdir(tmp_path)) == [mf.DISK_ID]  # no temp file left
        os.unlink(tmp_path / mf.DISK_ID)
        os.mkdir(tmp_path / mf.DISK_ID)
        before = _fds()
        assert all(mf.disk_of(fd, create=False) == "" for _ in range(50))
        assert _fds() == before
        os.rmdir(tmp_path / mf.DISK_ID)
        os.mkfifo(tmp_path / mf.DISK_ID)
        assert mf.disk_of(fd, create=False) == ""
    finally:
        os.close(fd)


def test_a_manifest_that_is_a_directory_is_refused_without_leaking_a_descriptor(tmp_path) -> None:  # type: ignore[no-untyped-def]

    (tmp_path / mf.MANIFEST).mkdir()
    before = _fds()
    for _ in range(50):
        with pytest.raises(mf.ManifestError, match="not a regular file"):
            mf.read(str(tmp_path))
    assert _fds() == before

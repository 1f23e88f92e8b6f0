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


def test_rank0_proposes_about_a_tenth_of_a_second_between_trigger_exchanges() -> None:
    from trainer_hooks._ranks.shards import MAX_INTERVAL, next_interval

    assert next_interval(None) == 1 and next_interval(0.0) == 1  # no measurement yet: every call
    assert next_interval(0.001) == 100 and next_interval(0.01) == 10
    assert next_interval(2.0) == 1  # slow steps: every step, a trigger waits one step
    assert next_interval(1e-9) == MAX_INTERVAL


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

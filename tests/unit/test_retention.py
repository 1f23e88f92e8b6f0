"""Retention and quota: pure planning properties (the real full tmpfs is in tests/test_retention.py)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptd.core import quota, retention
from ckptd.core.retention import Item, Rules
from ckptd.disk.remove import RemovalError, remove
from ckptd.disk.verify import verify_file
from tests.helpers import small_checkpoint

NOW = 1_800_000_000.0


items_st = st.lists(
    st.builds(
        Item,
        id=st.uuids().map(str),
        step=st.integers(0, 500),
        created=st.floats(NOW - 10 * 86400, NOW),
        bytes=st.integers(1, 1000),
        verified=st.booleans(),
        corrupt=st.booleans(),
        partial=st.booleans(),
        in_flight=st.booleans(),
        pinned=st.booleans(),
        final=st.booleans(),
        metric=st.one_of(st.none(), st.floats(0, 10)),
    ),
    max_size=40,
    unique_by=lambda i: i.id,
)


rules_st = st.builds(
    Rules,
    keep_last=st.one_of(st.none(), st.integers(0, 6)),
    keep_best=st.one_of(st.none(), st.integers(0, 3)),
    best_mode=st.sampled_from(["min", "max"]),
    keep_every_steps=st.one_of(st.none(), st.integers(1, 100)),
    keep_hourly=st.one_of(st.none(), st.integers(0, 5)),
    keep_daily=st.one_of(st.none(), st.integers(0, 5)),
    keep_within=st.one_of(st.none(), st.floats(0, 5 * 86400)),
    keep_final=st.booleans(),
)


def good(i: Item) -> bool:
    return i.verified and not i.corrupt and not i.partial and not i.in_flight


def newest(items: list[Item]) -> Item | None:
    g = [i for i in items if good(i)]
    return max(g, key=lambda i: (i.step, i.created, i.id)) if g else None


@settings(max_examples=500, deadline=None)
@given(items_st, rules_st)
def test_retention_guarantees(items: list[Item], rules: Rules) -> None:
    verdicts = retention.judge(items, rules, NOW)
    keep = {v.item.id: v.keep for v in verdicts}
    assert sorted(keep) == sorted(i.id for i in items)
    n = newest(items)
    if n is not None:
        assert keep[n.id], "the newest verified checkpoint was deleted"
    for i in items:
        if i.in_flight:
            assert keep[i.id], "in-flight deleted"
        elif i.corrupt or i.partial:
            assert not keep[i.id], "corrupt or partial kept"
        elif not i.verified:
            assert keep[i.id], "an unverified (unjudged) checkpoint was deleted"
        elif i.pinned:
            assert keep[i.id], "pinned deleted"
    if rules.keep_best:
        scored = sorted(
            (i for i in items if good(i) and i.metric is not None),
            key=lambda i: (i.metric if rules.best_mode == "min" else -i.metric, -i.step, -i.created, i.id),
        )
        for i in scored[: rules.keep_best]:
            assert keep[i.id], "best-K deleted"


@settings(max_examples=300, deadline=None)
@given(items_st, rules_st, st.randoms())
def test_retention_does_not_depend_on_input_order(items: list[Item], rules: Rules, rnd: random.Random) -> None:
    shuffled = list(items)
    rnd.shuffle(shuffled)
    a = {v.item.id: (v.keep, v.reasons) for v in retention.judge(items, rules, NOW)}
    b = {v.item.id: (v.keep, v.reasons) for v in retention.judge(shuffled, rules, NOW)}
    assert a == b


@settings(max_examples=300, deadline=None)
@given(items_st, st.integers(1, 8))
def test_keep_last_leaves_exactly_the_n_newest_verified(items: list[Item], n: int) -> None:
    items = [Item(**{**i.__dict__, "pinned": False}) for i in items]
    verdicts = retention.judge(items, Rules(keep_last=n, keep_final=False), NOW)
    kept_good = {v.item.id for v in verdicts if v.keep and good(v.item)}
    expected = {
        i.id for i in sorted((i for i in items if good(i)), key=lambda i: (i.step, i.created, i.id), reverse=True)[:n]
    }
    assert kept_good == expected


def test_rules_are_named_like_borg() -> None:
    day = 86400.0
    items = [Item(f"c{s}", s, NOW - (10 - s) * day) for s in range(10)]
    verdicts = {v.item.id: v for v in retention.judge(items, Rules(keep_last=2, keep_daily=4, keep_every_steps=5), NOW)}
    assert verdicts["c9"].reasons == ("newest_verified", "keep_last #1", "keep_daily #1")
    assert verdicts["c7"].reasons == ("keep_daily #3",)
    assert verdicts["c5"].reasons == ("keep_every_steps",)
    assert verdicts["c0"].reasons == ("keep_every_steps",)
    assert not verdicts["c1"].keep and verdicts["c1"].rule == "no rule keeps it"


def test_a_checkpoint_whose_holder_is_gone_or_bad_is_not_the_newest_verified() -> None:
    """SPEC §13: complete only when every tensor it refers to is present and verified. Newer
    items referring to a missing, a corrupt, or an incomplete holder are kept as "unverified",
    and the newest one that is complete is the newest verified (kept whatever the rules)."""
    items = [
        Item("good", 1, NOW - 50),
        Item("bad", 2, NOW - 40, corrupt=True),
        Item("dangling", 3, NOW - 30, refs=("gone",)),
        Item("on-bad", 4, NOW - 20, refs=("bad",)),
        Item("on-dangling", 5, NOW - 10, refs=("dangling",)),
    ]
    verdicts = {v.item.id: v for v in retention.judge(items, Rules(keep_last=1), NOW)}
    assert verdicts["good"].keep and verdicts["good"].rule.rule == "newest_verified", verdicts["good"]
    for i in ("dangling", "on-bad", "on-dangling"):
        assert verdicts[i].keep and verdicts[i].rule.rule == "unverified", verdicts[i]


def test_no_rules_deletes_nothing_verified() -> None:
    items = [Item("a", 1, NOW), Item("b", 2, NOW), Item("bad", 3, NOW, corrupt=True)]
    keep = {v.item.id: v.keep for v in retention.judge(items, Rules(), NOW)}
    assert keep == {"a": True, "b": True, "bad": False}


@settings(max_examples=300, deadline=None)
@given(
    items_st,
    rules_st,
    st.integers(0, 5000),
    st.one_of(st.none(), st.integers(0, 20000)),
    st.one_of(st.none(), st.integers(0, 20000)),
    st.integers(0, 2000),
)
def test_quota_never_deletes_protected_and_refuses_without_harm(
    items: list[Item], rules: Rules, reserve: int, max_bytes: int | None, free: int | None, min_free: int
) -> None:
    verdicts = retention.judge(items, rules, NOW)
    kept = [v for v in verdicts if v.keep]
    budget = quota.Budget(reserve, sum(v.item.bytes for v in kept), max_bytes, free, min_free)
    result = quota.choose(kept, budget)
    protected = {v.item.id for v in kept if v.protected}
    n = newest(items)
    if n is not None:
        protected.add(n.id)
    assert not protected & {i.id for i in result.delete}
    if result.ok:
        assert quota.shortfall(budget, sum(i.bytes for i in result.delete)) == 0
        order = [(i.step, i.created, i.id) for i in result.delete]
        assert order == sorted(order), "quota deletes oldest first"
    else:
        assert result.delete == () and "missing" in result.reason


def test_remove_refuses_paths_outside_the_roots(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    victim = outside / "precious.safetensors"
    victim.write_text("x")
    with pytest.raises(RemovalError, match="outside the configured roots"):
        remove(str(root / ".." / "outside" / "precious.safetensors"), [str(root)])
    (root / "link").symlink_to(outside)
    with pytest.raises(RemovalError, match="outside the configured roots"):
        remove(str(root / "link" / "precious.safetensors"), [str(root)])
    assert victim.exists()


def test_symlink_planted_in_a_checkpoint_directory_spares_its_target(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "checkpoint-100").mkdir(parents=True)
    outside.mkdir()
    precious = outside / "precious.bin"
    precious.write_text("keep me")
    (root / "checkpoint-100" / "model.safetensors").write_text("x")
    (root / "checkpoint-100" / "evil").symlink_to(outside)
    (root / "checkpoint-100" / "evil-file").symlink_to(precious)
    remove(str(root / "checkpoint-100"), [str(root)])
    assert not (root / "checkpoint-100").exists()
    assert precious.read_text() == "keep me"
    (root / "planted.safetensors").symlink_to(precious)
    remove(str(root / "planted.safetensors"), [str(root)])
    assert precious.exists() and not (root / "planted.safetensors").is_symlink()


def test_quarantine_moves_instead_of_deleting(tmp_path: Path) -> None:
    path = small_checkpoint(tmp_path, "j-step00000001.safetensors")
    remove(path, [str(tmp_path)], quarantine_dir=str(tmp_path / "q"))
    assert not os.path.exists(path) and verify_file(tmp_path / "q" / "j-step00000001.safetensors").ok

"""The one resume search: newest first, the first checkpoint that verifies now.

The hook's ``resume()``, ``ckptd latest``, the HF and Lightning callbacks and a sharded
rank (which verifies its own shard and agrees with its peers through ``check``) all ask
this, so they can never disagree about which checkpoint a run continues from.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Iterable, TypeVar

from ckptd.disk.scan import Checkpoint, scan
from ckptd.disk.verify import VerifyResult, verify_file
from ckptd.save.owned import verified_if_owned

__all__ = ["agreed_order", "first_verified", "newest_verified", "reread"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def reread(c: Checkpoint) -> VerifyResult:
    """Every tensor read back from disk (a sharded unit: every shard's)."""
    return verify_file(c.path)


def first_verified(candidates: Iterable[T], check: Callable[[T], VerifyResult]) -> T | None:
    """The first candidate (callers pass them newest first) that verifies now."""
    for c in candidates:
        result = check(c)
        if result.ok:
            return c
        log.warning("ckptd: skipping %s: %s", result.path, result.reason)
    return None


def newest_verified(
    directory: str,
    job: str | None = None,
    *,
    units: bool = True,
    check: Callable[[Checkpoint], VerifyResult] = reread,
    owner: int | None = None,
) -> Checkpoint | None:
    """The newest checkpoint of ``job`` in ``directory`` that verifies now (None if none does).

    ``units=False`` skips sharded units (for readers that load a single file);
    ``check`` lets a sharded rank verify its own shard and agree with its peers (so
    every rank must see the same candidates: uncommitted units are checked, not skipped, and
    a sharded resume passes ``first_verified`` the units every rank holds).
    ``owner``: only what that uid owns counts (``ckptd.save.owned``; what a trainer resumes),
    each other candidate skipped with a line saying whose it is.
    """
    if not os.path.isdir(directory):
        return None
    if owner is not None:
        check = _owned(check, directory, owner)
    return first_verified([c for c in reversed(scan(directory, job)) if units or not c.shards], check)


def _owned(
    check: Callable[[Checkpoint], VerifyResult], directory: str, uid: int
) -> Callable[[Checkpoint], VerifyResult]:
    """``check`` of each candidate that is ``uid``'s (its file, its holders)."""
    return lambda c: verified_if_owned(c.path, directory, uid, lambda _: check(c))


def agreed_order(held: list[list[tuple[str, int, bool]]], common: set[str]) -> list[str]:
    """The units every rank holds, newest first, in one order that every rank computes alike
    from the gathered listings (by the highest step any rank read for it, then by name): a
    unit whose header one rank cannot read sorts differently in that rank's own listing, and
    ranks walking different orders would verify different units in the same round."""
    step: dict[str, int] = {}
    for names in held:
        for name, s, _ in names:
            if name in common:
                step[name] = max(step.get(name, -1), int(s))
    return sorted(common, key=lambda name: (step[name], name), reverse=True)

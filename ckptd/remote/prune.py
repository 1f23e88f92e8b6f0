"""Remote retention: SPEC §5's rules with a ``remote_`` prefix, over the committed remote
checkpoints, through the same item builder and the same applier as local and watched trees
(``retention.item_of``, ``retention.carry_out``). A deletion removes the commit object first,
then the data, so a half-deleted checkpoint is never listed; leftovers of cut-off uploads older
than the newest committed checkpoint go too. A unit some host began to upload as its part of a
spread unit may still be waiting for the other hosts' parts, which come newest first after an
outage: it goes only once a disk its manifest names still lacks its part a day after the first
part was uploaded (``ABANDONED_AFTER``: a host that never came back), and never on something
that could not be read. Local files are never touched here.
"""

from __future__ import annotations

import logging
import re
from typing import Mapping

from ckptd.core import retention
from ckptd.core.settings import Settings
from ckptd.disk import manifest as mf
from ckptd.remote.listing import PART_RE, RemoteCheckpoint, committed, read_spread, uncommitted
from ckptd.remote.stores import Store

__all__ = ["prune_remote", "remote_rules"]

log = logging.getLogger(__name__)
ABANDONED_AFTER = 86400.0  # seconds after its save that a spread unit still lacking a host's part is given up


def remote_rules(settings: Settings) -> retention.Rules:
    """The ``remote_keep_*`` keys read as §5's rules (``remote_keep_last`` -> ``keep_last``)."""
    return retention.Rules.from_settings(settings.remote_retention())


def prune_remote(store: Store, prefix: str, settings: Settings, now: float) -> list[retention.Verdict]:
    """Remote retention for the job whose objects are under ``prefix`` (``layout.job_prefix``:
    its owner's and its directory's, so it sees, and deletes, only what this job wrote);
    returns the verdicts. A deletion the store refuses is logged and tried again at the next
    prune (the checkpoint stays listed until then)."""
    listing = store.list(f"{prefix}/")
    commits = committed(store, prefix, listing)
    rules = remote_rules(settings)
    items = [
        retention.item_of(
            c.key,
            c.step,
            c.created,
            c.bytes,
            trigger=c.trigger,
            metrics=c.metrics,
            best_metric=rules.best_metric,
            refs=tuple(f"{prefix}/{h}" for h in c.refs),
        )
        for c in commits
    ]
    verdicts = retention.judge(items, rules, now)
    by_key = {c.key: c for c in commits}
    for r in retention.carry_out(verdicts, lambda item: _delete(store, by_key[item.id], listing)):
        if r.done:
            log.info("remote: deleted %s/%s (%s)", store.url, r.verdict.item.id, r.verdict.rule)
        else:
            log.error("remote: could not delete %s/%s: %s", store.url, r.verdict.item.id, r.error)
    steps = [c.step for c in commits]
    for key, objects in uncommitted(listing, prefix, {c.key for c in commits}).items():
        why = _abandoned(store, key, objects, steps, listing, now)
        if why:
            for k in sorted(objects, key=lambda k: not PART_RE.match(k.rsplit("/", 1)[-1])):  # parts first
                store.delete(k)
            log.info("remote: deleted %s/%s (%s)", store.url, key, why)
    return verdicts


def _abandoned(
    store: Store, key: str, objects: list[str], steps: list[int], listing: Mapping[str, int], now: float
) -> str:
    """Why the objects of ``key``, not committed, are given up ("" = not now). Only what is older
    than the newest committed checkpoint, and of a unit uploaded host by host only once its
    manifest was read and a disk it names still lacks its part a day after the first part came
    (``ABANDONED_AFTER``): after an outage the hosts upload newest first, and a part that cannot be
    read now (a store that throttles, an object that is no part) is judged at a later prune."""
    step = _step_of(key)
    if step is None or not steps or step >= max(steps):
        return ""
    names = {k.rsplit("/", 1)[-1] for k in objects}
    if mf.MANIFEST not in names:
        return "an upload that never committed"
    got = read_spread(store, key, listing)
    if got.manifest is None or got.unread or not got.missing:
        return ""  # unreadable now, or whole yet not counted (its parts disagree): nothing is deleted
    if len({s.disk for s in got.manifest.shards}) < 2 and not got.parts:
        return "an upload that never committed"
    first = min((p.uploaded or p.created for p in got.parts.values()), default=None)
    if first is not None and now - first > ABANDONED_AFTER:
        return f"a spread unit whose other hosts' parts did not come within {ABANDONED_AFTER / 3600:.0f} hours"
    return ""


def _delete(store: Store, c: RemoteCheckpoint, listing: Mapping[str, int]) -> None:
    """The commit object (or every part's, and any part left beside a whole commit) first: a
    checkpoint half deleted is never listed as committed."""
    parts = [k for k in listing if k.startswith(f"{c.key}/") and PART_RE.match(k.rsplit("/", 1)[-1])]
    for key in dict.fromkeys([*c.commits, *parts, *c.objects]):
        store.delete(key)


def _step_of(key: str) -> int | None:
    m = re.search(r"-step(\d+)", key)
    return int(m.group(1)) if m else None

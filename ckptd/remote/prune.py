"""Remote retention: SPEC §5's rules with a ``remote_`` prefix, over the committed remote
checkpoints, through the same item builder and the same applier as local and watched trees
(``retention.item_of``, ``retention.carry_out``). A deletion removes the commit object first,
then the data, so a half-deleted checkpoint is never listed; leftovers of cut-off uploads older
than the newest committed checkpoint go too. Local files are never touched here.
"""

from __future__ import annotations

import logging
import re

from ckptd.core import retention
from ckptd.core.settings import Settings
from ckptd.remote.listing import COMMIT, RemoteCheckpoint, committed, uncommitted
from ckptd.remote.stores import Store

__all__ = ["prune_remote", "remote_rules"]

log = logging.getLogger(__name__)


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
    for r in retention.carry_out(verdicts, lambda item: _delete(store, by_key[item.id])):
        if r.done:
            log.info("remote: deleted %s/%s (%s)", store.url, r.verdict.item.id, r.verdict.rule)
        else:
            log.error("remote: could not delete %s/%s: %s", store.url, r.verdict.item.id, r.error)
    newest = max((c.step for c in commits), default=None)
    for key in uncommitted(store, prefix, listing):
        info_step = _step_of(key)
        if newest is not None and info_step is not None and info_step < newest:
            store.delete(key)
            log.info("remote: deleted %s/%s (an upload that never committed)", store.url, key)
    return verdicts


def _delete(store: Store, c: RemoteCheckpoint) -> None:
    """The commit object first: a checkpoint half deleted is never listed as committed."""
    store.delete(c.key + COMMIT)
    for key in c.objects:
        store.delete(key)


def _step_of(key: str) -> int | None:
    m = re.search(r"-step(\d+)", key)
    return int(m.group(1)) if m else None

"""Retention of a watched tree: what another tool's checkpoints keep, and who deletes them.

In order, after a tick adopted something: (1) the rules (``keep_last``, ``keep_every``, ...)
of the ``[[watch]]`` table; none, nothing is deleted; (2) what is protected whatever the
rules say: the checkpoint a trainer will read again (HF's ``best_model_checkpoint``) and a file
the trainer overwrites in place (its versions are retention's, not the file); (3) the tree's
catalogued units grouped per owner and directory, so one user's or one run's new checkpoints
never count against another's, units still pending counted as in flight; (4) each group
judged by ``core.retention`` and applied with its owner's rights (a deletion or a quarantine
move the owner could make themselves), or only logged with ``dry_run``.

A foreign checkpoint that fails verification is kept (and alerted on) unless ``on_corrupt``
says otherwise: a partly damaged checkpoint may be the only one left.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Sequence

from ckptd.core import retention
from ckptd.core.config import WatchSpec
from ckptd.core.vocab import NEVER, Outcome, Rule
from ckptd.daemon import history
from ckptd.daemon.catalog import Catalog
from ckptd.daemon.jobkey import JobKey
from ckptd.disk.owner import Identity, OwnerError, acting_as, owner_of, uid_of
from ckptd.disk.remove import Removal
from ckptd.disk.remove import apply as apply_removals
from ckptd.disk.safepath import open_regular
from ckptd.foreign import formats as foreign

log = logging.getLogger(__name__)


def apply(
    spec: WatchSpec,
    root: str,
    key: JobKey,
    units: list[foreign.Found],
    busy: set[str],
    now: float,
    catalog: Catalog,
    roots: Sequence[str],
) -> list[Removal]:
    """Steps 1 to 4 for the tree at ``root`` (``units``: what is on its disk now; ``busy``: the
    units still pending). What was removed, for the ledger."""
    rules = retention.Rules.from_settings(spec.settings.retention())
    if not rules.any_window:
        return []
    protected = _trainer_needs(units) | {u.path for u in units if history.overwritten_in_place(u)}
    removals: list[Removal] = []
    for (uid, _directory), items in _groups(spec, key, busy, protected, now, catalog).items():
        verdicts = [v for v in retention.judge(items, rules, now) if not v.item.in_flight]
        if spec.dry_run:
            for v in verdicts:
                verb = "keep" if v.keep else "delete"
                log.info("watch %s: would %s %s (%s)", root, verb, v.item.id, ", ".join(v.reasons))
            continue
        try:
            with acting_as(Identity.of(uid)):  # deletions and quarantine moves as the owner could
                removals += _remove(spec, root, verdicts, roots)
        except OwnerError as exc:
            log.error("watch %s: retention for uid %d not applied: %s", root, uid, exc)
    return removals


def _groups(
    spec: WatchSpec, key: JobKey, busy: set[str], protected: set[str], now: float, catalog: Catalog
) -> dict[tuple[int, str], list[retention.Item]]:
    """Step 3: the items of each (owner uid, directory)."""
    keep_corrupt = spec.on_corrupt == "keep"
    groups: dict[tuple[int, str], list[retention.Item]] = {}
    for r in catalog.checkpoints(*key):
        owner = uid_of(r.path)
        if owner is None:
            continue
        corrupt = r.outcome == Outcome.CORRUPT and not keep_corrupt
        # unsafe (a pickle we refuse to run) is unverified, not corrupt: kept, never deleted by rules
        groups.setdefault((owner, os.path.dirname(r.path)), []).append(
            retention.item_of(
                r.path,
                r.step,
                r.created,
                r.bytes,
                verified=r.verified,
                corrupt=corrupt,
                in_flight=r.path in busy,
                pinned=r.pinned or r.path in protected,
            )
        )
    for unit in busy:
        owner = uid_of(unit)
        if owner is not None:
            groups.setdefault((owner, os.path.dirname(unit)), []).append(
                retention.item_of(unit, NEVER, now, 0, in_flight=True)
            )
    return groups


def _remove(spec: WatchSpec, root: str, verdicts: list[retention.Verdict], roots: Sequence[str]) -> list[Removal]:
    """Deletions; with ``on_corrupt = "quarantine"`` the corrupt ones are moved aside instead
    (into ``quarantine_dir``, else ``.ckptd-quarantine`` at the top of the tree)."""
    quarantine = spec.settings.quarantine_dir
    corrupt_to = quarantine or os.path.join(root, ".ckptd-quarantine")
    if spec.on_corrupt != "quarantine":
        return apply_removals(verdicts, roots, quarantine)
    bad = [v for v in verdicts if v.rule.rule == Rule.CORRUPT]
    rest = [v for v in verdicts if v.rule.rule != Rule.CORRUPT]
    return apply_removals(bad, roots, corrupt_to) + apply_removals(rest, roots, quarantine)


def _trainer_needs(units: list[foreign.Found]) -> set[str]:
    """Checkpoints the trainer will read again: the ``best_model_checkpoint`` named by the
    newest ``trainer_state.json`` of each HF output directory (older ones are stale)."""
    newest: dict[str, foreign.Found] = {}
    for unit in units:
        parent = os.path.dirname(unit.path)
        if unit.kind == "hf" and (parent not in newest or (unit.step or -1) > (newest[parent].step or -1)):
            newest[parent] = unit
    needed = set()
    for parent, unit in newest.items():
        try:
            with acting_as(owner_of(unit.path)), open_regular(os.path.join(unit.path, "trainer_state.json")) as f:
                best = json.load(f).get("best_model_checkpoint")
        except (OSError, ValueError, AttributeError):
            continue
        if best:
            needed.add(os.path.realpath(os.path.join(parent, os.path.basename(str(best).rstrip("/")))))
    return needed

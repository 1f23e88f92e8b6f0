"""Scrubbing (``scrub_every``): re-verify every catalogued checkpoint with no trainer involved,
so bit rot is found while there is still an older good copy, not at the next resume."""

from __future__ import annotations

import logging
import os

from ckptd.core.vocab import Outcome, Trigger
from ckptd.daemon.catalog import Catalog, Row, gone
from ckptd.daemon.ledger import Ledger
from ckptd.disk.owner import OwnerError, acting_as
from ckptd.disk.verify import VerifyResult, verify_file
from ckptd.foreign import formats as foreign
from ckptd.foreign.deepspeed import verify_ours

log = logging.getLogger(__name__)


def scrub(catalog: Catalog, ledger: Ledger) -> dict[str, int]:
    """Re-verify every catalogued checkpoint, with no trainer involved (``scrub_every``).

    A checkpoint that no longer verifies is marked and counted
    (``ckptd_verify_total{outcome="corrupt"}``), never deleted here: a transient read
    error must not cost a good checkpoint. One that is gone by the time it is read is
    ``missing``: forgotten by the catalogue, counted as nothing. So is a known-corrupt one
    deleted since (the runbook's fix): ``ckptd_corrupt_checkpoints`` drops and
    ``CkptdVerifyFailed`` resolves, without waiting for a daemon restart's reconcile.
    """
    counts = {"ok": 0, "corrupt": 0, "missing": 0}
    for row in catalog.checkpoints():
        if not row.verified:
            if row.outcome == Outcome.CORRUPT and _gone(catalog, row):
                counts["missing"] += 1
                ledger.scrubbed_missing(row.key, row.path)
            continue
        try:
            with acting_as(catalog.owner(row.key, row.path)):  # read as its owner could (ckptd.disk.owner)
                result = _verify(row)
                gone = not result.ok and not os.path.lexists(row.path)
        except OwnerError as exc:  # not judged at all: the daemon may not read it as its owner
            log.warning("scrub: %s not checked: %s", row.path, exc)
            continue
        if result.ok:
            counts["ok"] += 1
        elif gone:  # deleted meanwhile (retention, a trainer in embedded mode, a user):
            counts["missing"] += 1  # gone is not corrupt, and pages nobody
            ledger.scrubbed_missing(row.key, row.path)
        else:
            counts["corrupt"] += 1
            ledger.scrubbed_corrupt(row.key, row.path, result.reason)
    ledger.refresh_all()
    return counts


def _gone(catalog: Catalog, row: Row) -> bool:
    """Gone for sure, looked up as its owner (``catalog.gone``); one the daemon may not look up
    as its owner is not judged."""
    try:
        with acting_as(catalog.owner(row.key, row.path)):
            return gone(row.path)
    except OwnerError:
        return False


def _verify(row: Row) -> VerifyResult:
    if row.trigger != Trigger.WATCH:
        return verify_ours(row.path)  # a file, a sharded unit or an engine job's DeepSpeed tag
    found = foreign.classify(row.path)
    result = foreign.verify(found) if found else verify_file(row.path)
    changed = foreign.changed_since(found, row.digests) if found and result.ok and row.digests else ""
    return VerifyResult(row.path, False, changed) if changed else result

"""Scrubbing (``scrub_every``): re-verify every catalogued checkpoint with no trainer involved,
so bit rot is found while there is still an older good copy, not at the next resume."""

from __future__ import annotations

import os

from ckptd.core.vocab import Trigger
from ckptd.daemon.catalog import Catalog
from ckptd.daemon.ledger import Ledger


def scrub(catalog: Catalog, ledger: Ledger) -> dict[str, int]:
    """Re-verify every catalogued checkpoint, with no trainer involved (``scrub_every``).

    A checkpoint that no longer verifies is marked and counted
    (``ckptd_verify_total{outcome="corrupt"}``), never deleted here: a transient read
    error must not cost a good checkpoint. One that is gone by the time it is read is
    ``missing``: forgotten by the catalogue, counted as nothing.
    """
    from ckptd.disk.verify import VerifyResult, verify_file
    from ckptd.foreign import formats as foreign

    counts = {"ok": 0, "corrupt": 0, "missing": 0}
    for row in catalog.checkpoints():
        if not row.verified:
            continue
        if row.trigger == Trigger.WATCH:
            found = foreign.classify(row.path)
            result = foreign.verify(found) if found else verify_file(row.path)
            changed = foreign.changed_since(found, row.digests) if found and result.ok and row.digests else ""
            if changed:
                result = VerifyResult(row.path, False, changed)
        else:
            result = verify_file(row.path)
        if result.ok:
            counts["ok"] += 1
            continue
        if not os.path.lexists(row.path):  # deleted meanwhile (retention, a trainer in embedded mode,
            counts["missing"] += 1  # a user): gone is not corrupt, and pages nobody
            ledger.scrubbed_missing(row.key, row.path)
            continue
        counts["corrupt"] += 1
        ledger.scrubbed_corrupt(row.key, row.path, result.reason)
    ledger.refresh_all()
    return counts

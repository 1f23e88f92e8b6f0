"""A hostile local user and the daemon's catalogue walk: markers that make a directory one
checkpoint (``ckptd-commit.json``, a manifest, a shard name), planted where that user may write
(the 1777 root, a shared scratch directory), hide nothing from the start-up reconcile and the
sweep. In process (the catalogue acts as each file's owner, which needs root for another uid)."""

from __future__ import annotations

import os
from pathlib import Path

from ckptd.daemon.catalog import Catalog
from ckptd.foreign.deepspeed import COMMIT
from tests.unit.test_catalog_tags import _tag


def test_a_marker_planted_in_a_shared_root_or_by_another_uid_hides_nothing(tmp_path: Path) -> None:
    """The root is 1777: anyone may create ``ckptd-commit.json``, a manifest or a shard name in it.
    Such a file once made the daemon take the whole root for one checkpoint and catalogue nothing
    under it (start-up reconcile, sweep). A root is never a checkpoint; a unit's marker counts only
    when it is its directory owner's."""
    root = tmp_path / "root"
    _tag(root / "alice", 4)
    for planted in (COMMIT, "ckptd-manifest.json", "rank00000-of-00002.safetensors"):
        (root / planted).write_text("{}")
    forged = _tag(root / "alice", 8)
    _tag(root / "scratch" / "bob", 12)  # below a shared directory, where another uid plants markers
    planted = [forged / COMMIT, root / "scratch" / COMMIT, root / "scratch" / "rank00000-of-00002.safetensors"]
    for p in planted[1:]:
        p.write_text("{}")
    if os.geteuid() == 0:  # as another uid would, in directories it may write
        for p in planted:
            os.chown(p, 65534, 65534)
    cat = Catalog(str(tmp_path / "state"))
    try:
        cat.reconcile([str(root)])
        rows = cat.checkpoints("ds")
    finally:
        cat.close()
    found = sorted(Path(r.path).name for r in rows)
    if os.geteuid() == 0:
        assert found == ["global_step12", "global_step4"]
    else:  # nobody else's markers to plant: every directory is its owner's
        assert found == ["global_step4", "global_step8"]

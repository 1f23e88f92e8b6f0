"""An engine job's DeepSpeed tags that rank 0 committed while no daemon was up are catalogued
when the job says hello again (``Catalog.adopt``) and at the daemon's start, like a plain
job's embedded saves: ``list`` and ``latest`` through the daemon then name them."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ckptd.daemon.catalog import Catalog
from ckptd.foreign.deepspeed import COMMIT


def _tag(directory: Path, step: int, job: str = "ds", committed: bool = True) -> Path:
    tag = directory / f"global_step{step}"
    tag.mkdir(parents=True)
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"PK" + bytes(64))
    if committed:
        record = {"job": job, "step": step, "trigger": "time", "created": 1000.0 + step, "metrics": {"loss": 0.5}}
        (tag / COMMIT).write_text(json.dumps(record))
    return tag


def test_committed_tags_written_while_the_daemon_was_away_are_catalogued(tmp_path: Path) -> None:
    d = tmp_path / "run"
    _tag(d, 4)
    _tag(d, 8)
    _tag(d, 12, committed=False)  # DeepSpeed's own save (or a partial one): not ours to catalogue
    os.symlink(d / "global_step8", d / "global_step16")  # a link is never a tag
    cat = Catalog(str(tmp_path / "state"))
    try:
        assert cat.adopt(str(d)) == 2
        rows = cat.checkpoints("ds", str(d))
        assert cat.adopt(str(d)) == 0  # once
    finally:
        cat.close()
    assert [(Path(r.path).name, r.step, r.trigger, r.metrics) for r in rows] == [
        ("global_step4", 4, "time", {"loss": 0.5}),
        ("global_step8", 8, "time", {"loss": 0.5}),
    ]

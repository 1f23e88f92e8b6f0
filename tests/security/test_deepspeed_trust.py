"""A DeepSpeed tag a client announces as committed is read by the daemon as the job's owner and
only through plain files: a rank file that is a link (to a file only root may read) or a FIFO
(which would hang the session's reader on open) fails the save, named, and nothing of it is read."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import PYTHON, ROOT, ckptd_cli, project_env
from tests.test_security import NOBODY, as_root, nobody_dir, start_daemon


@as_root
@pytest.mark.slow
@pytest.mark.parametrize("entry", ["link", "fifo"])
def test_a_hostile_deepspeed_tag_is_refused_without_being_read(open_base: Path, entry: str) -> None:
    d = start_daemon(open_base)
    try:
        mine = nobody_dir(d, "tagger")
        secret = d.root / "secret.pt"  # root's own, 0600: what a link would have the daemon read
        torch.save({"dp_world_size": 1, "mp_world_size": 1, "module": {"w": torch.ones(4)}}, secret)
        os.chmod(secret, 0o600)
        tag = mine / "global_step4"
        tag.mkdir()
        (tag / "ckptd-commit.json").write_text(json.dumps({"job": "j", "step": 4, "created": 1.0}))
        rank_file = tag / "mp_rank_00_model_states.pt"
        if entry == "link":
            os.symlink(secret, rank_file)
        else:
            os.mkfifo(rank_file)
        subprocess.run(["chown", "-hR", f"{NOBODY}:{NOBODY}", str(tag)], check=True)
        args = {"job": "j", "dir": str(mine), "unit": "global_step4", "step": 4, "settings": {"keep_last": 1}}
        proc = subprocess.Popen(
            [PYTHON, str(ROOT / "tests" / "scripts" / "hostile.py"), "commit_later", d.socket, json.dumps(args)],
            env=project_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out, err = proc.communicate("go\n", timeout=120)
        assert proc.returncode == 0 and json.loads(out.strip().splitlines()[-1])["status"] == "reply", err[-3000:]
        assert d.metric("ckptd_save_failures_total", training_job="j", reason="verify_failed") == 1
        assert d.metric("ckptd_saves_total", training_job="j", trigger="step", outcome="ok") == 0
        rows = json.loads(ckptd_cli("status", "--json", "--socket", d.socket).stdout)
        row = next(r for r in rows if r["directory"] == str(mine))
        assert "mp_rank_00_model_states.pt is not a regular file" in (row["last_error"] or {}).get("error", ""), row
        assert tag.is_dir() and os.path.lexists(rank_file)  # refused, not deleted
    finally:
        d.stop()

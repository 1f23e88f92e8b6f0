"""Verification against real damaged files: every corruption is caught, none crashes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import ckptd_cli
from tests.helpers import small_checkpoint
from tests.unit.test_verify import damaged


@pytest.fixture
def good(tmp_path: Path) -> str:
    return small_checkpoint(tmp_path)


def test_cli_verify_exit_codes_and_json(good: str, tmp_path: Path) -> None:
    bad = damaged(good, tmp_path, "bad.safetensors", lambda d: d[:-3])
    ok = ckptd_cli("verify", good)
    assert ok.returncode == 0 and "ok" in ok.stdout
    mixed = ckptd_cli("verify", good, bad, "--json")
    assert mixed.returncode == 1
    rows = {Path(r["path"]).name: r for r in json.loads(mixed.stdout)}
    assert rows["c.safetensors"]["ok"] is True
    assert rows["bad.safetensors"]["ok"] is False and "truncated" in rows["bad.safetensors"]["reason"]
    missing = ckptd_cli("verify", str(tmp_path / "nope.safetensors"))
    assert missing.returncode == 1 and "MISSING" in missing.stdout and "no such file" in missing.stdout


def test_cli_verify_a_directory(good: str, tmp_path: Path) -> None:
    shutil.copy(good, tmp_path / "d.safetensors")
    out = ckptd_cli("verify", str(tmp_path))
    assert out.returncode == 0 and out.stdout.count("ok") == 2

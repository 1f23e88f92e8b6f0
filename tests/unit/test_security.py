"""A hostile file in-process (docs/security.md): DCP metadata too deep or huge, a deflate bomb, an
index naming files outside its directory."""

from __future__ import annotations

import json
import resource
import time
import zipfile
from pathlib import Path

import pytest

from ckptd.foreign import formats as foreign
from tests.helpers import small_checkpoint


def test_a_deep_or_huge_dcp_metadata_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / ".metadata").write_bytes(b"(" * 200_000 + b".")
    r = foreign.verify(foreign.classify(str(tmp_path / "deep")))  # type: ignore[arg-type]
    assert not r.ok and ".metadata" in r.reason


@pytest.mark.serial
def test_a_deflate_bomb_is_not_inflated(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb-step1.pt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\0" * (300 << 20))
    assert bomb.stat().st_size < 2 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    from ckptd.foreign.picklesafe import verify_torch

    r = verify_torch(str(bomb))
    assert not r.ok and r.unsafe and "inflate" in r.reason
    assert time.monotonic() - t0 < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 << 10  # KiB: under 100 MiB more


def test_an_index_naming_files_outside_its_directory_is_not_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret.safetensors"
    small_checkpoint(tmp_path, "secret.safetensors")
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../secret.safetensors"}}))
    found = foreign.classify(str(run / "model.safetensors.index.json"))
    assert found is not None
    assert not foreign.verify(found).ok
    assert secret.exists()

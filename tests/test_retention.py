"""Retention and quota: pure planning properties, safe deletion, and a real full tmpfs."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import torch

from ckptd.disk.scan import scan
from ckptd.disk.verify import verify_file
from tests.conftest import ckptd_cli, tmpfs_at
from tests.helpers import small_checkpoint
from trainer_hooks import Checkpointer


def test_cli_gc_dry_run_then_act(tmp_path: Path) -> None:
    for s in range(1, 6):
        small_checkpoint(tmp_path, f"t-step{s:08d}.safetensors", step=s)
    ckptd_cli("pin", str(tmp_path / "t-step00000001.safetensors"))
    dry = ckptd_cli("gc", str(tmp_path), "--dry-run", "--keep-last", "2")
    assert dry.returncode == 0, dry.stderr
    assert "would delete" in dry.stdout and "pinned" in dry.stdout
    assert len(scan(str(tmp_path))) == 5
    act = ckptd_cli("gc", str(tmp_path), "--keep-last", "2")
    assert act.returncode == 0, act.stderr
    assert [c.step for c in scan(str(tmp_path))] == [1, 4, 5]


@pytest.fixture
def tmpfs64(tmp_path: Path) -> Iterator[Path]:
    with tmpfs_at(tmp_path / "mnt", "64m") as mnt:
        yield mnt


@pytest.mark.slow
def test_training_on_a_full_tmpfs_keeps_running(tmpfs64: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 2048)  # 8 MiB per checkpoint: 64 MiB holds 7
    extra: dict[str, object] = {}
    ckpt = Checkpointer("full", tmpfs64, model=model, extra=extra, every_steps=1, keep_last=100, total_steps=30)
    for step in range(1, 31):
        if step == 20:
            extra["blob"] = torch.zeros(80 * 2**20 // 4)  # this checkpoint can never fit
        if step == 21:
            extra.pop("blob")
        with torch.no_grad():
            model.weight.add_(1.0)
        ckpt.step()
        ckpt.wait()
        if step == 20:
            assert ckpt.last_error is not None and ckpt.last_error.reason == "no_space"
            assert "existing checkpoints were left alone" in str(ckpt.last_error)
    ckpt.close()
    assert ckpt.stats["deleted"] >= 15, ckpt.stats  # quota made room many times
    assert ckpt.stats["failed"] == 1
    found = scan(str(tmpfs64), "full")
    assert found[-1].step == 30 and all(verify_file(c.path).ok for c in found)
    fresh = torch.nn.Linear(1024, 2048)
    again = Checkpointer("full", tmpfs64, model=fresh)
    assert again.resume() == 30
    again.close(final=False)
    assert torch.equal(fresh.weight, model.weight)

"""Watch mode on a trainer that overwrites one file in place (issue 36 #2): Minimind's
``pretrain_64.pth`` / ``pretrain_64_resume.pth``, written with torch.save to .tmp then os.replace."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from ckptd.foreign import formats as foreign
from tests.conftest import PYTHON, project_env, wait_until
from tests.test_watch import listed, metric, watcher  # noqa: F401  (the real `ckptd watch` fixture)

MINIMIND_SAVE = r"""
import os, sys, torch
d, step = sys.argv[1], int(sys.argv[2])
torch.manual_seed(step)
model = torch.nn.Linear(64, 64)           # hidden size 64: the 64 in the names is no step
opt = torch.optim.AdamW(model.parameters())
for path, obj in ((f"{d}/pretrain_64.pth", model.state_dict()),
                  (f"{d}/pretrain_64_resume.pth", {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                                   "epoch": 0, "step": step, "world_size": 1, "wandb_id": None})):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)
"""


def test_a_bare_number_in_a_name_is_no_step_and_the_recorded_step_is_read(tmp_path: Path) -> None:
    r = subprocess.run([PYTHON, "-c", MINIMIND_SAVE, str(tmp_path), "48"], env=project_env(), capture_output=True)
    assert r.returncode == 0, r.stderr
    weights = foreign.classify(str(tmp_path / "pretrain_64.pth"))
    resume = foreign.classify(str(tmp_path / "pretrain_64_resume.pth"))
    assert weights is not None and weights.step is None
    assert resume is not None and resume.step == 48
    for name, step in (
        ("epoch=3-step=1200.ckpt", 1200),
        ("iter_000300.pt", 300),
        ("model_epoch7.pt", 7),
        ("global_step42.pt", 42),
        ("model-768.pt", None),
        ("llama-7b.pt", None),
    ):
        assert foreign.step_from_name(name) == step, name


def test_the_inert_read_of_a_pickle_runs_nothing(tmp_path: Path) -> None:
    from tests.test_watch import Evil

    sentinel = tmp_path / "SENTINEL"
    torch.save({"step": 5, "x": Evil(str(sentinel))}, tmp_path / "evil.pt")
    found = foreign.classify(str(tmp_path / "evil.pt"))
    assert found is not None and found.step == 5 and not sentinel.exists()


@pytest.mark.slow
def test_watch_keeps_the_last_verified_versions_of_a_file_overwritten_in_place(
    watcher: tuple[Path, str, int],  # noqa: F811
    tmp_path: Path,
) -> None:
    tree, sock, port = watcher  # keep_last = 2
    history = tree / "ckptd-history" / "pretrain_64_resume.pth"
    for step in (10, 20, 30, 40):
        r = subprocess.run([PYTHON, "-c", MINIMIND_SAVE, str(tree), str(step)], env=project_env(), capture_output=True)
        assert r.returncode == 0, r.stderr
        wait_until(lambda: (history / f"pretrain_64_resume-step{step:08d}.pth").exists(), 30, f"version {step} kept")
    wait_until(
        lambda: (
            sorted(os.listdir(history))
            == ["pretrain_64_resume-step00000030.pth", "pretrain_64_resume-step00000040.pth"]
        ),
        30,
        "keep_last=2",
    )
    kept = torch.load(history / "pretrain_64_resume-step00000030.pth", weights_only=True)
    assert kept["step"] == 30  # the version as it was, not the file as it is now
    assert (tree / "pretrain_64.pth").exists() and (tree / "pretrain_64_resume.pth").exists()  # the trainer's own
    assert len(os.listdir(tree / "ckptd-history" / "pretrain_64.pth")) >= 1  # no step recorded: named by time
    wait_until(lambda: metric(port, "ckptd_last_saved_step", training_job="ext") == 40, 30, "the recorded step")
    log = (tmp_path / "watch.log").read_text()
    assert f"adopted {tree}/pretrain_64_resume.pth (torch, step 40), verified; this version kept as" in log
    assert "(torch, no step recorded)" in log

"""examples/minimind_style: a trainer that counts micro-batches per epoch, with gradient
accumulation and its own skip-sampler, made to use ckptd by the diff the README shows
(issue 36 #3). Real processes, a real SIGKILL."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from pathlib import Path

from tests.conftest import PYTHON, ROOT, project_env, run_py, wait_until

EXAMPLE = ROOT / "examples" / "minimind_style"
ARGS = ("--epochs", "2")
MICRO_PER_EPOCH, ACCUMULATION = 24, 4  # 96 samples in batches of 4; the script's defaults


def test_the_diff_in_the_readme_is_the_change_from_the_original_trainer(tmp_path: Path) -> None:
    shutil.copy(EXAMPLE / "train_pretrain_before.py", tmp_path / "train_pretrain.py")
    r = subprocess.run(
        ["patch", "-p1", "-i", str(EXAMPLE / "ckptd.diff")], cwd=tmp_path, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "train_pretrain.py").read_text() == (EXAMPLE / "train_pretrain.py").read_text()
    for readme in (EXAMPLE / "README.md", ROOT / "README.md"):
        assert (EXAMPLE / "ckptd.diff").read_text().strip() in readme.read_text(), readme


def digest(out: str) -> str:
    return out.split("final weights sha256 ", 1)[1].split()[0]


def test_resume_after_sigkill_lands_on_the_same_position_with_bit_identical_weights(tmp_path: Path) -> None:
    straight = run_py(str(EXAMPLE / "train_pretrain.py"), "--out", str(tmp_path / "a"), *ARGS, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    out = tmp_path / "b"
    proc = subprocess.Popen(
        [PYTHON, str(EXAMPLE / "train_pretrain.py"), "--out", str(out), *ARGS, "--sleep", "0.1"],
        env=project_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(
            lambda: (out / "pretrain-step00000006.safetensors").exists(), 300, "a save past the first epoch's middle"
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    resumed = run_py(str(EXAMPLE / "train_pretrain.py"), "--out", str(out), *ARGS, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    m = re.search(r"resumed at optimizer step (\d+): epoch (\d+), micro-batch (\d+)", resumed.stdout)
    assert m is not None, resumed.stdout
    step, epoch, micro = map(int, m.groups())
    assert step >= 6 and epoch * MICRO_PER_EPOCH + micro == step * ACCUMULATION  # the position of that save
    assert digest(resumed.stdout) == digest(straight.stdout)

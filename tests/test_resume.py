"""Resume, crash and interruption with real subprocesses and real SIGKILL."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from ckptd.disk.scan import scan
from ckptd.disk.verify import verify_file
from examples.train_toy import build
from tests.conftest import PYTHON, ROOT, project_env, run_py, wait_until
from trainer_hooks import Checkpointer

TOY = str(ROOT / "examples" / "train_toy.py")
ENV = project_env()


def straight_run(tmp_path: Path, steps: int) -> dict:
    out = tmp_path / "straight.json"
    r = run_py(TOY, "--dir", str(tmp_path / "straight"), "--steps", str(steps), "--every-steps", "5", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text())


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_identical(tmp_path: Path) -> None:
    steps = 40
    reference = straight_run(tmp_path, steps)
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [PYTHON, TOY, "--dir", str(run_dir), "--steps", str(steps), "--every-steps", "5", "--step-sleep", "0.05"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: any(c.step >= steps // 2 for c in scan(str(run_dir), "toy")))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved = [c.step for c in scan(str(run_dir), "toy")]
    assert saved and max(saved) < steps, saved  # it really died mid-run
    out = tmp_path / "resumed.json"
    r = run_py(TOY, "--dir", str(run_dir), "--steps", str(steps), "--every-steps", "5", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"starting at step {max(saved)}" in r.stdout
    assert json.loads(out.read_text())["fingerprint"] == reference["fingerprint"]


@pytest.mark.slow
def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    r = run_py(TOY, "--dir", str(tmp_path), "--steps", "20", "--every-steps", "5")
    assert r.returncode == 0, r.stderr
    newest = scan(str(tmp_path), "toy")[-1]
    assert newest.step == 20
    data = bytearray(Path(newest.path).read_bytes())
    data[-100] ^= 0xFF
    Path(newest.path).write_bytes(bytes(data))
    model, opt, sched = build()
    ckpt = Checkpointer("toy", tmp_path, model=model, optimizer=opt, scheduler=sched, every_steps=5)
    try:
        with caplog.at_level("WARNING", logger="trainer_hooks"):
            assert ckpt.resume() == 15
        assert any(newest.path in m and "digest mismatch" in m for m in caplog.messages)
    finally:
        ckpt.close(final=False)


WRITER = r"""
import sys, torch
from trainer_hooks import Checkpointer
big = torch.nn.Linear(2048, 4096)   # 32 MiB of weights: a write takes a while
ckpt = Checkpointer("big", sys.argv[1], model=big, every_steps=1)
print("ready", flush=True)
while True:
    with torch.no_grad():
        big.weight.add_(1.0)
    ckpt.step()
"""


@pytest.mark.slow
def test_sigkill_mid_write_never_leaves_a_bad_final_file(tmp_path: Path) -> None:
    """Kill the writer at random moments (at least 6, until one lands mid-write); every
    final name must verify after each kill."""
    rng = random.Random(3)
    kills, leftovers = 0, []
    while kills < 6 or (not leftovers and kills < 30):
        proc = subprocess.Popen(
            [PYTHON, "-c", WRITER, str(tmp_path)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.05, 0.8))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        kills += 1
        for p in (c.path for c in scan(str(tmp_path), "big")):
            r = verify_file(p)
            assert r.ok, (p, r.reason)
        leftovers = [n for n in os.listdir(tmp_path) if ".ckptd-tmp." in n]
    assert leftovers, "no kill landed during a write; the test proves nothing"
    ckpt = Checkpointer("big", tmp_path, model=torch.nn.Linear(2048, 4096))
    ckpt.close(final=False)
    assert not [n for n in os.listdir(tmp_path) if ".ckptd-tmp." in n]


def test_resume_says_where_it_resumed_from_on_stderr_unless_quiet(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """At the default log level a resume printed nothing: one line now says the job, the step, the
    file, that it verified, where from and the seconds taken; ``quiet=True`` silences it."""
    first = Checkpointer("said", tmp_path, model=torch.nn.Linear(2, 2), socket=False, quiet=True)
    assert first.resume() == 0
    for _ in range(3):
        first.step()
    first.close()
    assert "ckptd:" not in capfd.readouterr().err
    again = Checkpointer("said", tmp_path, model=torch.nn.Linear(2, 2), socket=False, save_final=False)
    assert again.resume() == 3
    again.close()
    err = capfd.readouterr().err
    assert re.search(
        rf"^ckptd: job said resumed at step 3 from {re.escape(str(tmp_path))}/said-step00000003"
        r"\.safetensors \(verified, from disk\) \[\d+\.\d\ds\]$",
        err,
        re.M,
    ), err
    fresh = Checkpointer("said", tmp_path / "empty", model=torch.nn.Linear(2, 2), socket=False, save_final=False)
    assert fresh.resume() == 0
    fresh.close()
    said = capfd.readouterr().err
    assert f"ckptd: job said: nothing to resume (no verified checkpoint in {tmp_path / 'empty'}), step 0" in said, said

"""One line in HF Trainer, Lightning, Accelerate and torchrun DDP: real libraries, real SIGKILL, exact resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from ckptd.disk.scan import scan
from tests.conftest import PYTHON, ROOT, DaemonProc, ckptd_cli, free_port, project_env, wait_until

pytestmark = pytest.mark.slow
ENV = project_env(CKPTD_SOCKET="/nonexistent/ckptd.sock")


def run(args: list[str], env: dict[str, str] | None = None, stderr: list[str] | None = None) -> str:
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env or ENV)
    assert r.returncode == 0, _failure(r)
    if stderr is not None:
        stderr.append(r.stderr)
    return r.stdout


def _failure(r: subprocess.CompletedProcess[str]) -> str:
    """What a failed run said: the end of each stream, and the first traceback (with torchrun the
    rank that failed first says why near the start of stderr, long before the launcher's own)."""
    first = r.stderr.find("Traceback")
    head = r.stderr[max(0, first - 200) : first + 2500] if 0 <= first < len(r.stderr) - 4000 else ""
    return "\n".join([r.stdout[-2000:], head, "...", r.stderr[-4000:]])


def kill_when(args: list[str], directory: Path, job: str, step: int, env: dict[str, str] | None = None) -> None:
    """Start a run in its own process group; SIGKILL all of it once ``step`` is checkpointed."""
    p = subprocess.Popen(
        args, env=env or ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_until(
            lambda: any(c.step >= step for c in scan(str(directory), job)) or p.poll() is not None,
            300,
            f"step {step} to be checkpointed",
        )
        assert p.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def fingerprint(out: str) -> str:
    return re.findall(r"FINGERPRINT (\w+)", out)[-1]


def test_hf_trainer_killed_and_resumed_is_bit_identical(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    script = str(ROOT / "examples" / "hf_trainer.py")
    straight = fingerprint(run([PYTHON, script, "--out", str(tmp_path / "a"), "--steps", "20"]))
    kill_when(
        [PYTHON, script, "--out", str(tmp_path / "b"), "--steps", "20", "--step-sleep", "0.3"],
        tmp_path / "b" / "ckptd",
        "hf-demo",
        10,
    )
    err: list[str] = []
    out = run([PYTHON, script, "--out", str(tmp_path / "b"), "--steps", "20"], stderr=err)
    assert re.search(r"resume from .*checkpoint-(10|15)", out), out
    # the resume says itself on stderr at the default log level (job, step, file, verified, seconds)
    assert re.search(
        r"ckptd: job hf-demo resumed at step (10|15) from \S+hf-demo-step000000(10|15)\.safetensors "
        r"\(verified, from disk\) \[\d+\.\d\ds\]",
        err[0],
    ), err[0][-3000:]
    assert fingerprint(out) == straight
    assert [c.step for c in scan(str(tmp_path / "b" / "ckptd"), "hf-demo")] == [15, 20]  # keep_last=2
    assert not (tmp_path / "b" / "ckptd" / ".hf-resume").exists(), "the materialised HF copy is left behind"


def test_hf_best_checkpoints_hold_the_evaluated_weights(tmp_path: Path) -> None:
    """HF evaluates at steps 6, 12, 18 and at the end (20): a best save is taken at exactly those
    steps (it was one step late, holding weights nobody evaluated), naming the metric it was judged by."""
    pytest.importorskip("transformers")
    run(
        [
            PYTHON,
            str(ROOT / "examples" / "hf_trainer.py"),
            "--out",
            str(tmp_path / "e"),
            "--steps",
            "20",
            "--eval-steps",
            "6",
        ]
    )
    best = [c for c in scan(str(tmp_path / "e" / "ckptd"), "hf-demo") if c.trigger == "best"]
    assert best and all(c.step in (6, 12, 18, 20) for c in best), [(c.step, c.trigger) for c in best]
    assert all("eval_loss" in c.metrics for c in best)


@pytest.mark.parametrize("shuffle", ["no", "global", "generator"])
def test_lightning_killed_and_resumed_is_bit_identical_at_epoch_boundaries(tmp_path: Path, shuffle: str) -> None:
    """Lightning restarts a plain DataLoader's epoch on resume, so mid-epoch resumes replay
    batches (Lightning's own checkpoints behave the same); at epoch boundaries it is exact, shuffled
    too: the global RNGs and the sampler's generator are restored (Lightning keeps neither)."""
    pytest.importorskip("lightning")
    script = str(ROOT / "examples" / "lightning_train.py")
    mode = ["--shuffle", shuffle]
    straight = fingerprint(run([PYTHON, script, "--root", str(tmp_path / "a"), "--steps", "40", *mode]))
    kill_when(
        [PYTHON, script, "--root", str(tmp_path / "b"), "--steps", "40", "--step-sleep", "0.2", *mode],
        tmp_path / "b" / "ckptd",
        "pl-demo",
        20,
    )
    ckpts = tmp_path / "b" / "ckptd"
    for c in scan(str(ckpts), "pl-demo"):
        if c.step % 20:  # keep only the epoch-boundary checkpoint for an exact comparison
            os.unlink(c.path)
    out = run([PYTHON, script, "--root", str(tmp_path / "b"), "--steps", "40", *mode])
    assert "resume from" in out and "step20.ckpt" in out, out
    assert fingerprint(out) == straight
    metrics = scan(str(ckpts), "pl-demo")[-1].metrics
    assert "train_loss" in metrics  # best_metric comes from Lightning's logged metrics


def test_accelerate_loop_killed_and_resumed_mid_epoch_is_bit_identical(tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    script = str(ROOT / "examples" / "accelerate_train.py")
    straight = fingerprint(run([PYTHON, script, "--dir", str(tmp_path / "a"), "--steps", "40"]))
    kill_when(
        [PYTHON, script, "--dir", str(tmp_path / "b"), "--steps", "40", "--step-sleep", "0.2"],
        tmp_path / "b",
        "accel-demo",
        15,
    )
    out = run([PYTHON, script, "--dir", str(tmp_path / "b"), "--steps", "40"])
    start = int(re.findall(r"starting at step (\d+)", out)[0])
    assert start >= 15 and start % 12, out  # mid-epoch (12 batches an epoch): skip_first_batches did its job
    assert fingerprint(out) == straight
    assert [c.step for c in scan(str(tmp_path / "b"), "accel-demo")] == [30, 35, 40]  # keep_last=3


def test_torchrun_ddp_rank0_saves_all_ranks_resume(tmp_path: Path) -> None:
    d = DaemonProc(tmp_path / "d").start()
    try:
        env = {**ENV, "CKPTD_SOCKET": d.socket}
        torchrun = str(Path(PYTHON).parent / "torchrun")
        script = str(ROOT / "examples" / "ddp_train.py")
        straight = run(
            [
                torchrun,
                "--nproc_per_node=2",
                f"--master_port={free_port()}",
                script,
                "--dir",
                str(d.root / "a"),
                "--steps",
                "30",
            ],
            env,
        )
        prints = set(re.findall(r"rank \d FINGERPRINT (\w+)", straight))
        assert len(prints) == 1 and "rank 1 FINGERPRINT" in straight and "saves 0" in straight
        status = {j["job"]: j for j in json.loads(ckptd_cli("status", "--json", "--socket", d.socket).stdout)}
        assert status["ddp-demo"]["world_size"] == 2 and status["ddp-demo"]["checkpoints"] == 6
        kill_when(
            [
                torchrun,
                "--nproc_per_node=2",
                f"--master_port={free_port()}",
                script,
                "--dir",
                str(d.root / "b"),
                "--steps",
                "30",
                "--step-sleep",
                "0.1",
            ],
            d.root / "b",
            "ddp-demo",
            15,
            env,
        )
        out = run(
            [
                torchrun,
                "--nproc_per_node=2",
                f"--master_port={free_port()}",
                script,
                "--dir",
                str(d.root / "b"),
                "--steps",
                "30",
            ],
            env,
        )
        starts = set(re.findall(r"rank \d starting at step (\d+)", out))
        assert len(starts) == 1 and int(starts.pop()) >= 15  # every rank resumed from the same checkpoint
        assert set(re.findall(r"rank \d FINGERPRINT (\w+)", out)) == prints
    finally:
        d.stop()

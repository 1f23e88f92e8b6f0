"""``ckptd demo``: the README's first command, end to end on a toy model.

Runs ``examples/train_toy.py`` with the hook, SIGKILLs it mid-run, resumes it, then
shows what was saved, that every file verifies, and that the resumed run ends with
exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from ckptd.scan import scan
from ckptd.units import format_bytes
from ckptd.verify import verify_file

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "examples" / "train_toy.py"
STEPS, EVERY = 60, 10


def _toy(directory: Path, *extra: str) -> list[str]:
    return [sys.executable, str(TOY), "--dir", str(directory), "--steps", str(STEPS),
            "--every-steps", str(EVERY), "--keep-last", "3", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_demo(directory: str | None) -> None:
    if not TOY.exists():
        raise click.ClickException(f"the demo needs the repository's examples/ ({TOY} not found)")
    base = Path(directory or tempfile.mkdtemp(prefix="ckptd-demo-"))
    run_dir = base / "run"
    click.secho(f"== 1. training a toy model for {STEPS} steps, saving every {EVERY}, into {run_dir}", bold=True)
    killed_at = _train_and_kill(run_dir)
    click.echo(f"   trainer SIGKILLed after step {killed_at} was checkpointed")
    click.secho("== 2. same command again: it resumes from the newest verified checkpoint", bold=True)
    resumed = _run(_toy(run_dir, "--out", str(base / "resumed.json")))
    click.echo("   " + next(line for line in resumed.splitlines() if line.startswith("starting at step")))
    click.secho("== 3. what is on disk (keep_last=3: older checkpoints were deleted by retention)", bold=True)
    for c in scan(str(run_dir), "toy"):
        r = verify_file(c.path)
        click.echo(f"   step {c.step:>3}  {c.trigger:<6} {format_bytes(c.bytes):>10}  "
                   f"{'verified' if r.ok else 'CORRUPT: ' + r.reason}  {Path(c.path).name}")
    click.secho("== 4. an uninterrupted run, for comparison", bold=True)
    _run(_toy(base / "straight", "--out", str(base / "straight.json")))
    a = json.loads((base / "resumed.json").read_text())["fingerprint"]
    b = json.loads((base / "straight.json").read_text())["fingerprint"]
    same = "bit-identical" if a == b else "DIFFERENT"
    click.echo(f"   weights + optimizer state after crash+resume vs straight run: {same} ({a[:16]})")
    click.secho(f"== done: try `ckptd list {run_dir}` and `ckptd verify {run_dir}`", bold=True)
    if a != b:
        raise click.ClickException("resumed run differs from the straight run")


def _run(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    if r.returncode != 0:
        raise click.ClickException(f"{' '.join(cmd)} failed:\n{r.stderr}")
    return r.stdout


def _train_and_kill(run_dir: Path) -> int:
    proc = subprocess.Popen(_toy(run_dir, "--step-sleep", "0.03"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            steps = [c.step for c in scan(str(run_dir), "toy")]
            if steps and max(steps) >= STEPS // 2:
                return max(steps)
            time.sleep(0.02)
        raise click.ClickException("the toy run did not reach its first checkpoints")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

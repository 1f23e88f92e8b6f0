"""``ckptd demo``: the README's first command, end to end on a toy model.

Starts a daemon on a private socket, runs ``examples/train_toy.py`` with the hook
against it, SIGKILLs the trainer mid-run, resumes it, then shows what was saved,
that every file verifies, ``ckptd status``, a few lines of ``/metrics``, and that
the resumed run ends with exactly the weights of an uninterrupted one.
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

from ckptd.core.units import format_bytes
from ckptd.disk.scan import scan
from ckptd.disk.verify import verify_file

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "examples" / "train_toy.py"
STEPS, EVERY = 60, 10


def _toy(directory: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(TOY),
        "--dir",
        str(directory),
        "--steps",
        str(STEPS),
        "--every-steps",
        str(EVERY),
        "--keep-last",
        "3",
        *extra,
    ]


SOCKET: dict[str, str] = {}


def _env() -> dict[str, str]:
    return {**os.environ, **SOCKET, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_demo(directory: str | None) -> None:
    if not TOY.exists():
        raise click.ClickException(f"the demo needs the repository's examples/ ({TOY} not found)")
    base = Path(directory or tempfile.mkdtemp(prefix="ckptd-demo-"))
    daemon, port = _start_daemon(base)
    try:
        _steps(base, port)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        click.echo(f"   daemon stopped (exit {daemon.returncode}); its log: {base / 'daemon.log'}")


def _start_daemon(base: Path) -> tuple[subprocess.Popen[bytes], int]:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sock = base / "ckptd.sock"
    SOCKET["CKPTD_SOCKET"] = str(sock)
    click.secho(f"== 0. starting the daemon: socket {sock}, metrics on 127.0.0.1:{port}", bold=True)
    log = open(base / "daemon.log", "ab")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ckptd.cli",
            "serve",
            "--socket",
            str(sock),
            "--state-dir",
            str(base / "state"),
            "--metrics-listen",
            f"127.0.0.1:{port}",
            "--root",
            str(base),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_env(),
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise click.ClickException(f"the daemon did not start; see {base / 'daemon.log'}")


def _steps(base: Path, port: int) -> None:
    import urllib.request

    run_dir = base / "run"
    click.secho(f"== 1. training a toy model for {STEPS} steps, saving every {EVERY}, into {run_dir}", bold=True)
    killed_at = _train_and_kill(run_dir)
    click.echo(f"   trainer SIGKILLed after step {killed_at} was checkpointed")
    click.secho("== 2. same command again: it resumes from the newest verified checkpoint", bold=True)
    resumed = _run(_toy(run_dir, "--out", str(base / "resumed.json")))
    click.echo(
        "   "
        + (
            "the hook handed its saves to the daemon"
            if "connected to the daemon" in LAST_STDERR[0]
            else "the hook ran in embedded mode"
        )
    )
    click.echo("   " + next(line for line in resumed.splitlines() if line.startswith("starting at step")))
    click.secho("== 3. what is on disk (keep_last=3: older checkpoints were deleted by retention)", bold=True)
    for c in scan(str(run_dir), "toy"):
        r = verify_file(c.path)
        click.echo(
            f"   step {c.step:>3}  {c.trigger:<6} {format_bytes(c.bytes):>10}  "
            f"{'verified' if r.ok else 'CORRUPT: ' + r.reason}  {Path(c.path).name}"
        )
    click.secho("== 4. an uninterrupted run, for comparison", bold=True)
    _run(_toy(base / "straight", "--job", "straight", "--out", str(base / "straight.json")))
    a = json.loads((base / "resumed.json").read_text())["fingerprint"]
    b = json.loads((base / "straight.json").read_text())["fingerprint"]
    same = "bit-identical" if a == b else "DIFFERENT"
    click.echo(f"   weights + optimizer state after crash+resume vs straight run: {same} ({a[:16]})")
    click.secho("== 5. ckptd status", bold=True)
    click.echo(_run([sys.executable, "-m", "ckptd.cli", "status"]).rstrip())
    click.secho(f"== 6. a few lines of http://127.0.0.1:{port}/metrics", bold=True)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    wanted = (
        "ckptd_saves_total",
        "ckptd_deleted_total",
        "ckptd_last_saved_step",
        "ckptd_missed_saves_total",
        "ckptd_checkpoints{",
    )
    for line in text.splitlines():
        if line.startswith(wanted) and 'job="toy"' in line:
            click.echo("   " + line)
    click.secho(f"== done: try `ckptd list {run_dir}` and `ckptd verify {run_dir}`", bold=True)
    if a != b:
        raise click.ClickException("resumed run differs from the straight run")


LAST_STDERR = [""]


def _run(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    if r.returncode != 0:
        raise click.ClickException(f"{' '.join(cmd)} failed:\n{r.stderr}")
    LAST_STDERR[0] = r.stderr
    return r.stdout


def _train_and_kill(run_dir: Path) -> int:
    proc = subprocess.Popen(
        _toy(run_dir, "--step-sleep", "0.03"), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
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

"""The reliability campaign: random corruptions, crashes at random moments, EIO on fsync,
hostile paths. CI runs it at a size that fits (a few minutes); ``make soak`` sets
CKPTD_SOAK=1 for the full size. Figures go to benchmarks/results/reliability*.json."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from ckptd.disk.scan import scan
from ckptd.disk.verify import verify_file
from tests.conftest import PYTHON, DaemonProc, ckptd_cli, project_env, wait_until
from tests.unit.test_reliability import SOAK, report
from trainer_hooks import Checkpointer

ENV = project_env()


@pytest.mark.slow
def test_scrub_finds_corruption_without_any_trainer(tmp_path: Path) -> None:
    d = DaemonProc(tmp_path / "d")
    d.config.write_text(d.config.read_text().replace("roots = [", 'scrub_every = "1s"\nroots = [', 1))
    d.start()
    try:
        run = d.root / "scrubbed"
        ckpt = Checkpointer("scrubbed", run, model=torch.nn.Linear(64, 64), every_steps=1, socket=d.socket)
        for _ in range(3):
            ckpt.step()
        ckpt.close(final=False)
        victim = scan(str(run), "scrubbed")[1].path
        data = bytearray(Path(victim).read_bytes())
        data[-10] ^= 0xFF
        Path(victim).write_bytes(bytes(data))
        wait_until(
            lambda: d.metric("ckptd_verify_total", training_job="scrubbed", outcome="corrupt") == 1, 20, "the scrub"
        )
        rows = {r["path"]: r for r in json.loads(ckptd_cli("list", "scrubbed", "--json", "--socket", d.socket).stdout)}
        assert rows[victim]["verified"] is False and "digest mismatch" in rows[victim]["problem"]
        assert sum(r["verified"] for r in rows.values()) == 2
    finally:
        d.stop()


EIO_TRAINER = r"""
import sys, torch
from trainer_hooks import Checkpointer
ckpt = Checkpointer("eio", sys.argv[1], model=torch.nn.Linear(32, 32), every_steps=2, socket=False)
for _ in range(6):
    ckpt.step(); ckpt.wait()
ckpt.close()
print("stats", ckpt.stats["verified"], ckpt.stats["failed"], ckpt.last_error.reason if ckpt.last_error else None)
"""


@pytest.mark.slow
def test_eio_on_fsync_fails_the_save_and_training_goes_on(tmp_path: Path, fsync_shim: str) -> None:
    run = tmp_path / "eio-target"
    r = subprocess.run(
        [PYTHON, "-c", EIO_TRAINER, str(run)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**ENV, "LD_PRELOAD": fsync_shim, "EIO_SHIM_MATCH": "eio-target"},
    )
    assert r.returncode == 0, r.stderr
    assert "stats 0 4 io_error" in r.stdout, r.stdout + r.stderr[-2000:]
    assert "Input/output error" in r.stderr
    assert scan(str(run), "eio") == [] and not [n for n in os.listdir(run) if ".ckptd-tmp." in n]


LOOPER = r"""
import sys, torch
from trainer_hooks import Checkpointer
torch.manual_seed(0)
width = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
m = torch.nn.Linear(width, 2 * width)   # 8 MiB by default: kills land in copies, writes, fsyncs, verifies, renames
ckpt = Checkpointer("crash", sys.argv[1], model=m, every_steps=1, reconnect_every=60)
print("ready", ckpt.mode, flush=True)
while True:
    with torch.no_grad():
        m.weight.add_(1.0)
    ckpt.step()
"""


def check_invariants(run: Path, before: set[str]) -> int:
    """Every new file under a final name verifies (corrupt accepted must be 0); every file seen
    verified before is still there (verified lost must be 0; no retention rules in these runs)."""
    finals = scan(str(run), "crash")
    for c in finals:
        if c.path not in before:
            r = verify_file(c.path)
            assert r.ok, (c.path, r.reason)
    lost = before - {c.path for c in finals}
    assert not lost, f"verified checkpoints lost: {lost}"
    return len(finals)


def kill_trainer_once(run: Path, env: dict[str, str], rng: random.Random) -> None:
    p = subprocess.Popen(
        [PYTHON, "-c", LOOPER, str(run)], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert p.stdout is not None and p.stdout.readline().startswith("ready")
        time.sleep(rng.uniform(0.0, 0.6))
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()


@pytest.mark.slow
def test_trainer_killed_at_random_moments(tmp_path: Path) -> None:
    kills = 200 if SOAK else 12
    rng = random.Random(7)
    d = DaemonProc(tmp_path / "d").start()
    run = d.root / "crash"
    run.mkdir()
    seen: set[str] = set()
    try:
        for i in range(kills):
            env = {**ENV, "CKPTD_SOCKET": d.socket if i % 2 == 0 else str(tmp_path / "none.sock")}
            kill_trainer_once(run, env, rng)  # half through the daemon, half embedded
            time.sleep(0.3)  # the daemon finishes what it was handed
            check_invariants(run, seen)
            seen |= {c.path for c in scan(str(run), "crash")}
        fresh = torch.nn.Linear(1024, 2048)
        ckpt = Checkpointer("crash", run, model=fresh, socket=False)
        newest = scan(str(run), "crash")[-1]
        assert ckpt.resume() == newest.step
        ckpt.close(final=False)
    finally:
        d.stop()
    report(
        "trainer_kills", {"kills": kills, "checkpoints_verified": len(seen), "corrupt_accepted": 0, "verified_lost": 0}
    )


@pytest.mark.slow
def test_daemon_killed_at_random_moments(tmp_path: Path) -> None:
    kills = 200 if SOAK else 6
    rng = random.Random(11)
    base = tmp_path / "d"
    d = DaemonProc(base).start()
    run = d.root / "crash"
    run.mkdir()
    width = "256" if SOAK else "1024"  # 0.5 MiB in the soak: 200 kills of a run that saves every step
    trainer = subprocess.Popen(
        [PYTHON, "-c", LOOPER, str(run), width],
        env={**ENV, "CKPTD_SOCKET": d.socket},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    seen: set[str] = set()
    try:
        assert trainer.stdout is not None and trainer.stdout.readline().startswith("ready daemon")
        for _ in range(kills):
            time.sleep(rng.uniform(0.2, 1.0))
            d.kill(signal.SIGKILL)
            check_invariants(run, seen)
            seen |= {c.path for c in scan(str(run), "crash")}
            restarted = time.time()
            d = DaemonProc(base).start()  # restart: catalogue reconciled, temp files removed
            listed = {r["path"] for r in json.loads(ckptd_cli("list", "crash", "--json", "--socket", d.socket).stdout)}
            on_disk = {c.path for c in scan(str(run), "crash")}
            # everything under a final name before the restart is listed; the trainer's embedded saves
            # renamed into place since (ctime: a rename sets it) are the next reconcile's, or its hello's
            assert on_disk <= listed | {p for p in on_disk if os.stat(p).st_ctime >= restarted - 0.05}
            assert not [n for n in os.listdir(run) if ".ckptd-tmp." in n and f".{d.proc.pid}." in n]
        assert trainer.poll() is None, "training must survive every daemon death"
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        d.stop()
    report(
        "daemon_kills",
        {
            "kills": kills,
            "checkpoints_verified": len(seen),
            "corrupt_accepted": 0,
            "verified_lost": 0,
            "trainer_survived": True,
        },
    )

"""The memory tier (SPEC §14, issue 28): the daemon keeps each job's newest verified snapshot;
a trainer that crashed resumes from it without reading the checkpoint file; a dead daemon means
disk, said in the log; the budget drops the oldest job first."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from ckptd.disk.scan import scan
from tests.conftest import PYTHON, ROOT, DaemonProc, ckptd_cli, project_env, wait_until
from tests.wire_client import Client, snapshot
from trainer_hooks import Checkpointer, load

LORA = str(ROOT / "tests" / "scripts" / "lora_train.py")


def save(c: Client, job: str, step: int, nbytes: int) -> dict:  # type: ignore[type-arg]
    fd, length = snapshot(job, step, {"w": struct.pack("<f", step) * (nbytes // 4)})
    try:
        assert (
            c.ask(
                {
                    "type": "save",
                    "id": step,
                    "step": step,
                    "trigger": "step",
                    "rule": "r",
                    "filename": f"{job}-step{step:08d}.safetensors",
                    "length": length,
                },
                fd=fd,
            )["type"]
            == "accepted"
        )
        return c.recv()
    finally:
        os.close(fd)


def test_the_budget_keeps_each_jobs_newest_and_drops_the_oldest_job_first(inproc_daemon) -> None:  # type: ignore[no-untyped-def]
    d = inproc_daemon
    d.memory.budget = 3 << 20
    runs = {}
    for job in ("first", "second"):
        runs[job] = os.path.join(d.roots[0], job)
        os.mkdir(runs[job])
    a, b = Client(d.socket_path), Client(d.socket_path)
    try:
        for c, job in ((a, "first"), (b, "second")):
            c.ask({"type": "hello", "job": job, "directory": runs[job], "settings": {}, "pid": os.getpid(), "step": 0})
        assert save(a, "first", 1, 1 << 20)["ok"] and save(a, "first", 2, 1 << 20)["ok"]
        held = {r["job"]: r["memory_bytes"] for r in a.ask({"type": "status"})["jobs"]}
        assert held["first"] > 1 << 20 and held["second"] == 0  # the newest only: step 2 replaced step 1
        assert save(b, "second", 1, 2 << 20)["ok"]  # 1 + 2 MiB and headers exceed 3 MiB: the oldest job goes
        held = {r["job"]: r["memory_bytes"] for r in a.ask({"type": "status"})["jobs"]}
        assert held["first"] == 0 and held["second"] > 2 << 20, held
        labels = {"training_job": "second", "directory": runs["second"]}
        assert d.metrics.registry.get_sample_value("ckptd_memory_bytes", labels) == held["second"]
        assert save(b, "second", 2, 4 << 20)["ok"]  # larger than the whole budget: saved, not held
        assert {r["job"]: r["memory_bytes"] for r in a.ask({"type": "status"})["jobs"]}["second"] == 0
    finally:
        a.close()
        b.close()


@pytest.mark.slow
def test_a_crashed_trainer_resumes_from_the_daemons_memory(tmp_path: Path) -> None:
    """SIGKILL the trainer; the daemon still holds step N's snapshot. With the file of step N
    gone from the disk (so only memory can have it), resume restores step N bit for bit from
    the daemon and says so; it is the state that file held."""
    d = DaemonProc(tmp_path / "d").start()
    run = d.root / "lora"
    try:
        p = subprocess.Popen(
            [PYTHON, LORA, str(run), "1000", "--step-sleep", "0.05", "--socket", d.socket],
            env=project_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: len(scan(str(run), "lora")) >= 3, 60, "three saves")
        p.send_signal(signal.SIGKILL)
        p.wait(60)
        # the save handed over before the kill is finished by the daemon: the newest is known once the
        # session is gone (it unregisters after its in-flight saves), not at the kill
        wait_until(lambda: d.metric("ckptd_job_up", training_job="lora") == 0, 60, "the disconnect")
        newest = scan(str(run), "lora")[-1]
        wait_until(lambda: d.metric("ckptd_memory_bytes", training_job="lora") > 0, 30, "the memory tier")
        status = json.loads(ckptd_cli("status", "--json", "--socket", d.socket).stdout)
        assert next(j for j in status if j["job"] == "lora")["memory_bytes"] > 0, status
        expected = load(newest.path)["model"]
        os.rename(newest.path, str(tmp_path / "moved.safetensors"))
        from tests.scripts.lora_train import build

        model, opt = build(seed=5)
        r = subprocess.run(
            [PYTHON, "-c", RESUME, str(run), d.socket], env=project_env(), capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"resumed at step {newest.step} from {newest.path} (verified, from memory)" in r.stderr, r.stderr
        got = torch.load(r.stdout.strip(), weights_only=True)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())
        del model, opt
    finally:
        d.stop()


RESUME = r"""
import sys, tempfile, torch
from tests.scripts.lora_train import build
from trainer_hooks import Checkpointer
model, opt = build(seed=5)
ckpt = Checkpointer("lora", sys.argv[1], model=model, optimizer=opt, socket=sys.argv[2], save_final=False)
ckpt.resume()
out = tempfile.mktemp(suffix=".pt")
torch.save(model.state_dict(), out)
ckpt.close(final=False)
print(out)
"""


@pytest.mark.slow
def test_a_dead_daemon_means_resume_from_disk_and_a_line_saying_so(tmp_path: Path, capfd, caplog) -> None:  # type: ignore[no-untyped-def]
    d = DaemonProc(tmp_path / "d").start()
    run = d.root / "mem"
    model = torch.nn.Linear(8, 8)
    ckpt = Checkpointer("mem", run, model=model, every_steps=1, socket=d.socket, quiet=True)
    for _ in range(2):
        ckpt.step()
    ckpt.wait()
    d.kill(signal.SIGKILL)
    ckpt.close(final=False)
    capfd.readouterr()
    with caplog.at_level("WARNING", logger="trainer_hooks"):
        again = Checkpointer("mem", run, model=torch.nn.Linear(8, 8), socket=d.socket, save_final=False)
        assert again.resume() == 2
        again.close(final=False)
    assert "the daemon's memory tier is unavailable" in caplog.text and "resuming from disk" in caplog.text
    err = capfd.readouterr().err
    assert "ckptd: job mem resumed at step 2" in err and "(verified, from disk)" in err, err


MEMORY_TRAIN = r"""
import sys, time, torch
from trainer_hooks import Checkpointer
w = torch.nn.Parameter(torch.zeros(1 << 16))
opt = torch.optim.SGD([w], lr=1.0)
ckpt = Checkpointer("often", sys.argv[1], model=torch.nn.ParameterList([w]), optimizer=opt, every_steps=1000,
                    every_memory="0.2s", socket=sys.argv[2])
start = ckpt.resume()
print("START", start, float(w[0]), float(w[-1]), flush=True)
for _ in range(start, 100000):
    w.grad = torch.full_like(w, -1.0)
    opt.step()
    ckpt.step()
    time.sleep(0.02)
"""


@pytest.mark.slow
def test_every_memory_saves_to_the_memory_tier_only_and_a_crash_resumes_there(tmp_path: Path) -> None:
    """``every_memory="0.2s"`` with a disk save every 1000 steps: the daemon holds a snapshot a
    fraction of a second old, no file is written for it, and after a SIGKILL the run resumes from
    it (its weights are its step: SGD with lr 1 and gradient -1), far past the last file."""
    d = DaemonProc(tmp_path / "d").start()
    run = d.root / "often"
    try:
        p = subprocess.Popen(
            [PYTHON, "-c", MEMORY_TRAIN, str(run), d.socket],
            env=project_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(
            lambda: d.metric("ckptd_saves_total", training_job="often", trigger="memory", outcome="ok") >= 3,
            60,
            "three memory saves",
        )
        p.send_signal(signal.SIGKILL)
        p.wait(60)
        assert scan(str(run), "often") == []  # every_steps=1000 never came: nothing on disk
        assert d.metric("ckptd_unsaved_steps", training_job="often") > 0  # memory is not a saved step
        r = subprocess.run(
            [PYTHON, "-c", MEMORY_TRAIN.replace("range(start, 100000)", "range(0)"), str(run), d.socket],
            env=project_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        start, first, last = r.stdout.split("START")[1].split()[:3]
        assert float(first) == float(last) == int(start), r.stdout  # the weights are the state of that step
        assert int(start) > 5 and "(a memory-only save: not on disk) (verified, from memory)" in r.stderr, r.stderr
    finally:
        d.stop()


TIERED_TRAIN = r"""
import sys, time, torch
from trainer_hooks import Checkpointer
w = torch.nn.Parameter(torch.zeros(1 << 20))
opt = torch.optim.SGD([w], lr=1.0)
ckpt = Checkpointer("tiered", sys.argv[1], model=torch.nn.ParameterList([w]), optimizer=opt, every="auto",
                    mtbf="5s", max_overhead="50%", socket=sys.argv[2])
start = ckpt.resume()
print("START", start, float(w[0]), float(w[-1]), flush=True)
for _ in range(start, 100000):
    w.grad = torch.full_like(w, -1.0)
    opt.step()
    ckpt.step()
    time.sleep(0.01)
"""


@pytest.mark.slow
def test_every_auto_plans_memory_saves_when_the_disk_is_slow(tmp_path: Path, fsync_shim: str) -> None:
    """Multilevel every="auto": on a disk whose fsync takes 2 s (a network filesystem), a disk
    save cannot come as often as a 5 s MTBF calls for; the daemon plans memory-only saves in
    between, asks the trainer for them, and says so in status and metrics. A SIGKILL then
    resumes from memory at a step past the newest file."""
    d = DaemonProc(
        tmp_path / "d", env={"LD_PRELOAD": fsync_shim, "SLOW_SHIM_MATCH": "/tiered/", "SLOW_SHIM_MS": "2000"}
    ).start()
    run = d.root / "tiered"
    try:
        p = subprocess.Popen(
            [PYTHON, "-c", TIERED_TRAIN, str(run), d.socket],
            env=project_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(
            lambda: d.metric("ckptd_saves_total", training_job="tiered", trigger="memory", outcome="ok") >= 3,
            90,
            "three memory-only saves asked by the daemon",
        )
        memory = d.metric("ckptd_auto_memory_interval_seconds", training_job="tiered")
        disk = d.metric("ckptd_auto_interval_seconds", training_job="tiered")
        assert 0 < memory < disk, (memory, disk)
        (status,) = json.loads(ckptd_cli("status", "--json", "--socket", d.socket).stdout)
        plan = status["auto"]["memory"]
        assert plan["disk_every"] >= 2 and plan["share_source"] == "prior", status["auto"]
        assert "one in" in status["auto"]["reason"] and status["auto"]["rule"] in ("persist", "multilevel")
        assert "a memory-only save every" in ckptd_cli("status", "--socket", d.socket).stdout
        p.send_signal(signal.SIGKILL)
        p.wait(60)
        on_disk = max((c.step for c in scan(str(run), "tiered")), default=0)
        held = json.loads(ckptd_cli("status", "--json", "--socket", d.socket).stdout)[0]["memory_bytes"]
        assert held > 4 << 20
        r = subprocess.run(
            [PYTHON, "-c", TIERED_TRAIN.replace("range(start, 100000)", "range(0)"), str(run), d.socket],
            env=project_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        start, first, last = r.stdout.split("START")[1].split()[:3]
        assert float(first) == float(last) == int(start) >= on_disk, (r.stdout, on_disk)
        assert "from memory" in r.stderr, r.stderr
    finally:
        p.kill()
        p.wait(60)
        d.stop()


HANDBACK_TRAIN = r"""
import sys, time, torch
from trainer_hooks import Checkpointer
w = torch.nn.Parameter(torch.zeros(1 << 18))
opt = torch.optim.SGD([w], lr=1.0)
ckpt = Checkpointer("handback", sys.argv[1], model=torch.nn.ParameterList([w]), optimizer=opt, every_steps=50,
                    every_memory="0.2s", socket=sys.argv[2], reconnect_every=3600)
for _ in range(400):
    w.grad = torch.full_like(w, -1.0)
    opt.step()
    if ckpt.step() == 50:
        print("HANDED", flush=True)  # the step-50 save is the daemon's now
    time.sleep(0.02)
ckpt.close()
print("STATS", ckpt.stats["verified"], ckpt.stats["failed"], ckpt.stats["memory"], flush=True)
"""


@pytest.mark.slow
def test_memory_saves_run_beside_a_slow_disk_save_and_a_dead_daemon_hands_it_back(
    tmp_path: Path, fsync_shim: str
) -> None:
    """Memory-only saves have a buffer of their own: they go on while the first disk save is still
    being written (its fsync takes 30 s: the daemon is killed inside it, so no run waits that long;
    4 s was within reach of three memory saves seen through a loaded machine's scrapes), and when the daemon is killed with that disk save in
    flight, the trainer still has it whole in its own buffer and persists it itself; no file is
    ever written for a memory-only save."""
    d = DaemonProc(
        tmp_path / "d", env={"LD_PRELOAD": fsync_shim, "SLOW_SHIM_MATCH": "/handback/", "SLOW_SHIM_MS": "30000"}
    ).start()
    run = d.root / "handback"
    p = subprocess.Popen(
        [PYTHON, "-c", HANDBACK_TRAIN, str(run), d.socket],
        env=project_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "HANDED"

        def memory() -> float:
            return d.metric("ckptd_saves_total", training_job="handback", trigger="memory", outcome="ok")

        before = memory()
        wait_until(lambda: memory() >= before + 3, 60, "memory saves beside the disk save in flight")
        assert d.metric("ckptd_saves_total", training_job="handback", trigger="step", outcome="ok") == 0
        d.kill(signal.SIGKILL)  # the step-50 save is still in its fsync
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
        d.stop()
    assert p.returncode == 0, err[-3000:]
    assert "the daemon went away with step 50 in flight; persisting it here" in err, err[-3000:]
    steps = [c.step for c in scan(str(run), "handback")]
    assert 50 in steps and steps[-1] == 400, steps  # every disk save (then embedded) and the final one
    assert all(c.ok for c in scan(str(run), "handback"))
    verified, failed, memory = (int(x) for x in out.split("STATS")[1].split()[:3])
    assert failed == 0 and verified >= 2 and memory >= 3, out

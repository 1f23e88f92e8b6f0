"""``snapshot="overlap"`` (SPEC §14, issue 28): step() returns before the parameters and the
optimizer state are copied; the copy is done before the optimizer next writes them, so a
checkpoint holds the state at its step, bit for bit, never two steps mixed."""

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
from tests.conftest import PYTHON, ROOT, DaemonProc, ckptd_cli, project_env, run_py, wait_until
from trainer_hooks import Checkpointer, load

TRAIN = str(ROOT / "tests" / "scripts" / "overlap_train.py")


KILLS = 200 if os.environ.get("CKPTD_SOAK") else 10


def at_step(n: int) -> tuple[float, float]:
    """What overlap_train.py's weight and momentum are after n steps (the same float32 arithmetic)."""
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=1.0, momentum=0.5)
    for _ in range(n):
        w.grad = torch.full_like(w, -1.0)
        opt.step()
    return float(w.detach()[0]), float(opt.state[w]["momentum_buffer"][0]) if n else 0.0


def assert_one_step(path: str) -> int:
    state = load(path)
    step = state["trainer"]["step"]
    w, m = at_step(step)
    weights, momentum = state["model"]["0"], state["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.all(weights == w) and torch.all(momentum == m), (
        f"{path}: step {step} mixed with another ({weights.unique()[:4].tolist()}, {momentum.unique()[:4].tolist()})"
    )
    return int(step)


def train(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    ckpt: Checkpointer,
    steps: int,
    at_save: dict[int, dict[str, torch.Tensor]],
) -> None:
    for _ in range(steps):
        model(torch.randn(32, 256)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        saves = ckpt.stats["saves"]
        ckpt.step()
        if ckpt.stats["saves"] > saves:
            at_save[ckpt.step_count] = {k: v.clone() for k, v in model.state_dict().items()}
            at_save[ckpt.step_count].update(
                {f"opt/{i}/{k}": v.clone() for i, s in opt.state_dict()["state"].items() for k, v in s.items()}
            )


@pytest.mark.parametrize("through", ["embedded", "daemon"])
def test_the_checkpoint_holds_the_state_of_its_step_though_training_went_on(tmp_path: Path, through: str) -> None:
    """Right after each saving step(): a forward that moves BatchNorm's running statistics in place,
    and an optimizer step that writes every parameter and moment in place. The checkpoint is the
    state of the saving step, bit for bit, in both."""
    d = DaemonProc(tmp_path / "d").start() if through == "daemon" else None
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.BatchNorm1d(256), torch.nn.Linear(256, 256))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        directory = (d.root if d else tmp_path) / "ov"
        ckpt = Checkpointer(
            "ov",
            directory,
            model=model,
            optimizer=opt,
            every_steps=3,
            snapshot="overlap",
            keep_last=10,
            socket=d.socket if d else False,
            quiet=True,
        )
        at_save: dict[int, dict[str, torch.Tensor]] = {}
        train(model, opt, ckpt, 12, at_save)
        assert ckpt.mode == through
        ckpt.close(final=False)
        saved = scan(str(directory), "ov")
        assert [c.step for c in saved] == [3, 6, 9, 12] and all(verify_file(c.path).ok for c in saved)
        for c in saved:
            state = load(c.path)
            got = {
                **state["model"],
                **{f"opt/{i}/{k}": v for i, s in state["optimizer"]["state"].items() for k, v in s.items()},
            }
            assert got.keys() == at_save[c.step].keys()
            assert all(torch.equal(got[k], v) for k, v in at_save[c.step].items()), c.path
    finally:
        if d is not None:
            d.stop()


def test_what_the_next_forward_may_write_is_held_at_the_saving_step(tmp_path: Path) -> None:
    """The copy thread composes the header after step() returned: the progress, the metrics passed in,
    ``extra`` (its tensors and its plain values) and the RNG are as they were at the saving step,
    though the trainer changes them all in place before the optimizer's next step."""
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    extra = {"ema": torch.zeros(64), "seen": [0], "note": "a"}
    ckpt = Checkpointer(
        "held",
        tmp_path,
        model=model,
        optimizer=opt,
        extra=extra,
        every_steps=2,
        snapshot="overlap",
        keep_last=10,
        socket=False,
        quiet=True,
    )
    metrics = {"loss": 0.0}
    expected: dict[int, tuple[float, list[int], str, torch.Tensor]] = {}
    for i in range(1, 7):
        model(torch.randn(8, 64)).sum().backward()
        opt.step()
        metrics["loss"] = float(i)
        ckpt.step(metrics=metrics)
        if i % 2 == 0:
            expected[i] = (float(i), list(extra["seen"]), str(extra["note"]), torch.get_rng_state())
        extra["ema"].add_(1.0)  # in place, before the copy thread could have run
        extra["seen"].append(i)
        extra["note"] += "b"
        metrics["loss"] = -1.0
        torch.rand(1000)  # moves the RNG
    ckpt.close(final=False)
    saved = scan(str(tmp_path), "held")
    assert [c.step for c in saved] == [2, 4, 6]
    for c in saved:
        state, loss = load(c.path), c.metrics["loss"]
        assert (loss, state["extra"]["seen"], state["extra"]["note"]) == expected[c.step][:3]
        assert torch.equal(state["extra"]["ema"], torch.full((64,), float(c.step - 1)))
        assert torch.equal(state["rng"]["torch"], expected[c.step][3])
        assert state["trainer"]["step"] == c.step


def test_every_auto_weighs_what_an_overlapped_copy_costs_not_only_the_stall(tmp_path: Path) -> None:
    """On CPU the copy beside training takes about its own time from training (the README's
    figures): the hook reports it as ``cost`` beside the stall, the daemon's plan and overhead
    ratio weigh it (``status``' stall is the plan's), and the stall histogram keeps the stall."""
    d = DaemonProc(tmp_path / "d").start()
    try:
        model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, bias=False) for _ in range(4)])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # 48 MiB with its moments
        ckpt = Checkpointer(
            "cost",
            d.root / "cost",
            model=model,
            optimizer=opt,
            every_steps=1,
            snapshot="overlap",
            keep_last=2,
            socket=d.socket,
            quiet=True,
        )
        for _ in range(6):
            model(torch.randn(8, 1024)).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ckpt.step()
            ckpt.wait()
        ckpt.close(final=False)
        assert ckpt.stats["verified"] == 6
        status = {j["job"]: j for j in json.loads(ckptd_cli("status", "--json", "--socket", d.socket).stdout)}
        stalls = d.metric("ckptd_save_duration_seconds_sum", training_job="cost", phase="stall")
        assert d.metric("ckptd_save_duration_seconds_count", training_job="cost", phase="stall") == 6
        assert 0 < 3 * stalls / 6 < status["cost"]["stall"], (stalls, status["cost"])  # about 17x here
    finally:
        d.stop()


def test_a_checkpoint_never_mixes_two_steps_under_a_racing_optimizer(tmp_path: Path) -> None:
    r = run_py(TRAIN, str(tmp_path), "12", "--mib", "32")
    assert r.returncode == 0, r.stderr[-2000:]
    saved = scan(str(tmp_path), "ov")
    assert [assert_one_step(c.path) for c in saved] == [10, 11, 12]


def settled(run: Path) -> None:
    names: list[str] = []
    while names != (names := sorted(os.listdir(run))):
        time.sleep(0.3)


@pytest.mark.slow
def test_trainer_killed_at_random_moments_of_overlapped_saves(tmp_path: Path) -> None:
    """KILLS SIGKILLs of a trainer saving every step with snapshot="overlap" through the daemon
    (200 with CKPTD_SOAK=1): no file under a final name fails to verify or mixes two steps, and
    each restart resumes from the newest one."""
    d = DaemonProc(tmp_path / "d").start()
    run = d.root / "ov"
    rng = random.Random(28)
    seen = 0
    try:
        for _ in range(KILLS):
            p = subprocess.Popen(
                [PYTHON, TRAIN, str(run), "100000", "--socket", d.socket, "--mib", "8"],
                env=project_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            before = max((c.step for c in scan(str(run), "ov")), default=0)
            wait_until(
                lambda: max((c.step for c in scan(str(run), "ov")), default=0) > before or p.poll() is not None,
                120,
                "a save",
            )
            time.sleep(rng.uniform(0.0, 0.4))
            p.send_signal(signal.SIGKILL)
            p.wait(60)
            wait_until(lambda: d.metric("ckptd_job_up", training_job="ov") == 0, 30, "the disconnect")
            settled(run)  # the daemon finishes (and prunes after) what it was handed before the kill
            for c in scan(str(run), "ov"):
                if c.ok:
                    assert verify_file(c.path).ok, c.path
                    assert_one_step(c.path)
                    seen += 1
    finally:
        d.stop()
    assert seen >= KILLS

"""The save policy: SPEC §1 regressions by name, and properties over random schedules."""

from __future__ import annotations

import json
from pathlib import Path

from ckptd.core.policy import (
    SavePolicy,
    plan,
)
from tests.conftest import ckptd_cli, run_py


def test_cli_plan_json_and_warnings() -> None:
    r = ckptd_cli("plan", "--total-steps", "1578", "--saves-per-epoch", "2", "--steps-per-epoch", "789", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [s["step"] for s in doc["saves"]] == [394, 789, 1183, 1578]
    assert doc["saves"][-1] == {"step": 1578, "trigger": "final", "rule": "save_final"}
    w = ckptd_cli("plan", "--total-steps", "39998", "--every-steps", "50000")
    assert "longer than the run" in w.stderr and "39998  final" in w.stdout
    late = ckptd_cli("plan", "--total-steps", "1000", "--every-steps", "950")
    assert "after 90% of the run" in late.stderr
    many = ckptd_cli("plan", "--total-steps", "5000", "--every-steps", "2")
    assert "more than 1000" in many.stderr
    bad = ckptd_cli("plan", "--total-steps", "100", "--every-steps", "zero")
    assert bad.returncode == 2 and "every_steps: expected an integer" in bad.stderr


def test_cli_plan_honours_ckptd_variables_and_says_a_typo() -> None:
    r = run_py(
        "-m",
        "ckptd.cli",
        "plan",
        "--total-steps",
        "100",
        env={"CKPTD_EVERY_STEPS": "40", "CKPTD_EVRY": "7", "CKPTD_KEEP_LAST": "2"},
    )
    assert r.returncode == 0, r.stderr
    assert "step         40  step   (every_steps)  deleted" in r.stdout
    assert "step         80  step   (every_steps)  kept: keep_last" in r.stdout
    assert "CKPTD_EVRY is not a ckptd setting (did you mean CKPTD_EVERY?)" in r.stderr
    over = run_py(
        "-m", "ckptd.cli", "plan", "--total-steps", "100", "--every-steps", "50", env={"CKPTD_EVERY_STEPS": "40"}
    )
    assert "step         50  step" in over.stdout  # options over variables, as in the hook
    bad = run_py("-m", "ckptd.cli", "plan", "--total-steps", "100", env={"CKPTD_EVERY_STEPS": "often"})
    assert bad.returncode == 2 and "CKPTD_EVERY_STEPS" in bad.stderr


def test_cli_plan_warns_only_about_what_is_true_with_a_time_rule() -> None:
    r = ckptd_cli("plan", "--total-steps", "1000", "--every", "30m")
    assert r.returncode == 0 and "no save rule" not in r.stderr, r.stderr
    both = ckptd_cli("plan", "--total-steps", "1000", "--every-steps", "5000", "--every", "30m")
    assert both.returncode == 0 and "longer than the run" not in both.stderr, both.stderr
    alone = ckptd_cli("plan", "--total-steps", "1000", "--every-steps", "5000")
    assert "longer than the run" in alone.stderr


def test_cli_plan_epochs_and_retention_at_the_end_of_the_run() -> None:
    r = ckptd_cli(
        "plan", "--epochs", "2", "--steps-per-epoch", "789", "--saves-per-epoch", "2", "--keep-last", "2", "--json"
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["total_steps"] == 1578
    assert [(s["step"], s["kept"]) for s in doc["saves"]] == [(394, False), (789, False), (1183, True), (1578, True)]
    assert "keep_final" in doc["saves"][-1]["kept_by"]
    derived = ckptd_cli("plan", "--epochs", "2", "--total-steps", "1578", "--saves-per-epoch", "2")
    assert [line.split()[1] for line in derived.stdout.splitlines()[1:]] == ["394", "789", "1183", "1578"]
    odd = ckptd_cli("plan", "--epochs", "2", "--total-steps", "1577", "--saves-per-epoch", "2")
    assert odd.returncode == 2 and "not a whole number of --epochs 2" in odd.stderr


def test_the_hook_saves_on_the_same_anchored_schedule(tmp_path: Path) -> None:
    import torch

    from ckptd.disk.scan import scan
    from trainer_hooks import Checkpointer

    ckpt = Checkpointer(
        "e",
        tmp_path,
        model=torch.nn.Linear(2, 2),
        saves_per_epoch=2,
        steps_per_epoch=5,
        total_steps=10,
        socket=False,
        quiet=True,
    )
    for _ in range(10):
        ckpt.step()
    ckpt.close()
    expected = plan(SavePolicy(saves_per_epoch=2, steps_per_epoch=5, total_steps=10)).steps
    assert [c.step for c in scan(str(tmp_path), "e")] == expected == [2, 5, 7, 10]

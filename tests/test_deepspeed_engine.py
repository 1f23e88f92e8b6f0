"""``Checkpointer(job, dir, engine=engine)`` and ``CkptdCallback`` under HF Trainer + DeepSpeed.

Real DeepSpeed 0.19 on CPU (gloo, 2 ranks under torchrun), a torch AdamW client optimizer
(nothing JIT-compiled): ZeRO-1/2/3 runs save through ckptd; a second run resumes from an
earlier committed tag and must end bit-identical (weights, every rank's optimizer partition,
scheduler) to the uninterrupted run. A rank SIGKILLed in the middle of a save leaves no tag
under its final name and ``latest`` on the previous one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ROOT, ckptd_cli, free_port, preempt_group, project_env

pytest.importorskip("deepspeed")

TORCHRUN = str(Path(PYTHON).parent / "torchrun")
ENV = project_env(DS_ACCELERATOR="cpu", CKPTD_SOCKET="/nonexistent/ckptd.sock", OMP_NUM_THREADS="1")
SCRIPT = str(ROOT / "examples" / "deepspeed_train.py")
HF_SCRIPT = str(ROOT / "tests" / "scripts" / "hf_ds_train.py")
# one worker for the module (its fixture is shared); a module fixture runs three 2-rank DeepSpeed
# jobs at once, which on a loaded 2-CPU machine can take longer than the suite's 300 s default
pytestmark = [pytest.mark.xdist_group("deepspeed"), pytest.mark.slow, pytest.mark.timeout(900)]


def torchrun(*args: str) -> list[str]:
    return [TORCHRUN, "--nproc_per_node=2", f"--master_port={free_port()}", *args]


def run_all(cmds: dict[str, list[str]]) -> dict[str, str]:
    """Several torchrun jobs at once (each is mostly waiting on its two ranks); their outputs."""
    procs = {
        k: subprocess.Popen(v, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for k, v in cmds.items()
    }
    outs = {}
    for k, p in procs.items():
        outs[k], _ = p.communicate(timeout=900)
        assert p.returncode == 0, f"{k}: {outs[k][-4000:]}"
    return outs


def fingerprints(out: str) -> dict[str, str]:
    return dict(re.findall(r"rank (\d) (?:STEP \d+ )?FINGERPRINT ([0-9a-f]{16})", out))


def keep_only(directory: Path, tag: str) -> None:
    """Roll a finished run's directory back to one committed tag (as if it had stopped there)."""
    for d in directory.glob("global_step*"):
        if d.name != tag:
            shutil.rmtree(d)


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """ZeRO-1, 2 and 3: 12 steps straight, saving every 4 (the three at once). ZeRO-3 passes the
    engine's pieces (model=engine.module, optimizer=engine.optimizer), as scripts did before
    ``engine=`` existed: the 0-element placeholders and the LossScaler are then the engine's to save."""
    root = tmp_path_factory.mktemp("ds-engine")
    outs = run_all(
        {
            f"zero{s}": torchrun(
                SCRIPT,
                "--dir",
                str(root / f"zero{s}"),
                "--stage",
                str(s),
                "--steps",
                "12",
                "--every",
                "4",
                *(["--pieces"] if s == 3 else []),
            )
            for s in (1, 2, 3)
        }
    )
    return {k: (root / k, out) for k, out in outs.items()}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_every_rank_partition_is_committed_and_verified(zero_runs: dict[str, tuple[Path, str]], stage: int) -> None:
    d, out = zero_runs[f"zero{stage}"]
    assert out.count("every rank verified") == 3
    assert (d / "latest").read_text() == "global_step12"
    assert not [n for n in os.listdir(d) if n.startswith(".ckptd-staging")]
    commit = json.loads((d / "global_step8" / "ckptd-commit.json").read_text())
    assert commit["step"] == 8 and commit["world_size"] == 2
    assert [r["rank"] for r in commit["ranks"]] == [0, 1] and all(r["tensors"] > 0 for r in commit["ranks"])
    r = ckptd_cli("verify", str(d), timeout=300)
    assert r.returncode == 0 and r.stdout.count("ok ") == 3, r.stdout
    if stage == 3:  # every rank's fp32 partition is there, none of them empty
        import torch

        from ckptd.foreign.picklesafe import safe_load

        for rank in (0, 1):
            o = safe_load(str(d / "global_step8" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
            flat = o["optimizer_state_dict"]["fp32_flat_groups"]
            assert sum(t.numel() for t in flat) > 0 and all(isinstance(t, torch.Tensor) for t in flat)


def test_deepspeed_own_tools_read_what_ckptd_committed(zero_runs: dict[str, tuple[Path, str]], tmp_path: Path) -> None:
    """zero_to_fp32 consolidates a ZeRO-3 tag ckptd committed into full weights."""
    d, _ = zero_runs["zero3"]
    out = tmp_path / "fp32"
    r = subprocess.run(
        [PYTHON, str(d / "zero_to_fp32.py"), str(d), str(out), "--tag", "global_step12"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    import torch

    weights = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert weights["0.weight"].shape == (16, 8) and weights["2.weight"].shape == (4, 16)


def test_resume_is_bit_identical_for_zero_1_2_3(zero_runs: dict[str, tuple[Path, str]], tmp_path: Path) -> None:
    cmds = {}
    for name, (d, _) in zero_runs.items():
        copy = tmp_path / name
        shutil.copytree(d, copy)
        keep_only(copy, "global_step4")
        stage = name[-1]
        cmds[name] = torchrun(SCRIPT, "--dir", str(copy), "--stage", stage, "--steps", "12", "--every", "4")
    outs = run_all(cmds)
    for name, out in outs.items():
        assert out.count("starting at step 4") == 2, out[-3000:]
        straight = fingerprints(zero_runs[name][1])
        assert len(straight) == 2 and fingerprints(out) == straight, name


def test_sigkill_of_one_rank_mid_save_commits_nothing(zero_runs: dict[str, tuple[Path, str]], tmp_path: Path) -> None:
    """Rank 1 is killed after it wrote its ZeRO-2 partition for step 8, before the ranks agreed:
    no global_step8, latest still on global_step4; the next run resumes at 4 and ends identical."""
    d = tmp_path / "killed"
    p = subprocess.Popen(
        torchrun(
            SCRIPT,
            "--dir",
            str(d),
            "--stage",
            "2",
            "--steps",
            "12",
            "--every",
            "4",
            "--pause-rank",
            "1",
            "--pause-at",
            "8",
        ),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen, pid = [], None
    assert p.stdout is not None
    for line in p.stdout:
        seen.append(line)
        if m := re.search(r"rank 1 pid (\d+)", line):
            pid = int(m.group(1))
        if "rank 1 PAUSED in save of global_step8" in line:
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            break
    else:
        pytest.fail("".join(seen[-50:]))
    p.communicate(timeout=300)
    assert p.returncode != 0
    assert not (d / "global_step8").exists()
    assert (d / "latest").read_text() == "global_step4"
    assert [n for n in os.listdir(d) if n.startswith(".ckptd-staging-global_step8")]  # the partial save, hidden
    assert ckptd_cli("latest", str(d)).stdout.strip() == str(d / "global_step4")
    out = run_all({"again": torchrun(SCRIPT, "--dir", str(d), "--stage", "2", "--steps", "12", "--every", "4")})[
        "again"
    ]
    assert out.count("starting at step 4") == 2
    assert fingerprints(out) == fingerprints(zero_runs["zero2"][1])
    assert not [n for n in os.listdir(d) if n.startswith(".ckptd-staging")]


def test_hf_trainer_with_deepspeed_zero2_and_ckptd_callback_trains_and_resumes(tmp_path: Path) -> None:
    """The callback saves the engine (no LossScaler error); resuming from step 4 through
    CkptdCallback.resume_dir ends with the weights of the uninterrupted run."""
    a = tmp_path / "a"
    straight = run_all({"a": torchrun(HF_SCRIPT, str(a), "12")})["a"]
    assert straight.count("every rank verified") == 3
    assert (a / "ckptd" / "global_step12" / "ckptd-commit.json").is_file()
    b = tmp_path / "b"
    shutil.copytree(a / "ckptd", b / "ckptd")
    keep_only(b / "ckptd", "global_step4")
    resumed = run_all({"b": torchrun(HF_SCRIPT, str(b), "12", "--resume")})["b"]
    assert "resumed at step 4" in resumed
    assert len(fingerprints(straight)) == 2 and fingerprints(resumed) == fingerprints(straight)
    assert not (b / "ckptd" / ".hf-resume" / "rank0").exists()  # the scratch HF view is removed once read


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a tag to another uid")
def test_a_tag_of_another_uid_is_never_resumed(
    zero_runs: dict[str, tuple[Path, str]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SPEC §6: the hook resumes only checkpoints its own uid owns; DeepSpeed's load_checkpoint
    unpickles, so a committed tag planted by another uid (here a copy of a real one, given to
    uid 65534) must be skipped, and the log says why, before any byte of it is loaded."""
    from trainer_hooks.deepspeed import newest_committed

    src, _ = zero_runs["zero2"]
    d = tmp_path / "run"
    shutil.copytree(src, d, symlinks=True)
    assert newest_committed(str(d)) == str(d / "global_step12")
    for path in [d / "global_step12", *(d / "global_step12").iterdir()]:
        os.lchown(path, 65534, 65534)
    with caplog.at_level("WARNING", logger="trainer_hooks"):
        assert newest_committed(str(d)) == str(d / "global_step8")
    assert "owned by uid 65534" in caplog.text, caplog.text


def test_time_rule_and_preemption_save_agreed_steps_and_resume_there(tmp_path: Path) -> None:
    """An engine job with ``every`` and no step save in reach: rank 0's clock fires, the ranks
    agree on a step and commit a ``time`` tag. Then SIGTERM to every process, as a scheduler
    preempts: one more tag, ``preempt``, committed before the ranks exit by the signal, though
    that save takes 3 s against a grace period of 1 s (the grace timer must not cut a save under
    way). The next run resumes at that tag's step on both ranks."""
    d, log = tmp_path / "ckpt", tmp_path / "run.log"
    env = {**ENV, "CKPTD_EVERY": "2s", "CKPTD_KEEP_LAST": "100"}
    args = ("--dir", str(d), "--stage", "2", "--steps", "400", "--every", "1000", "--step-sleep", "0.1")
    args += ("--grace", "1", "--slow-preempt-save", "3")
    with open(log, "wb") as out:
        p = subprocess.Popen(
            torchrun(SCRIPT, *args), env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    preempt_group(p, lambda: "(time, every rank verified" in log.read_text(), 300, "a time tag", exit_timeout=300)
    text = log.read_text()
    assert p.returncode != 0 and "(preempt, every rank verified" in text, text[-4000:]
    commits = {
        int(c.parent.name.removeprefix("global_step")): json.loads(c.read_text())
        for c in d.glob("global_step*/ckptd-commit.json")
    }
    triggers = [commits[s]["trigger"] for s in sorted(commits)]
    assert "time" in triggers and triggers[-1] == "preempt", triggers
    newest = max(commits)
    assert (d / "latest").read_text() == f"global_step{newest}" and newest > 0
    assert ckptd_cli("verify", str(d / f"global_step{newest}")).returncode == 0
    again = run_all({"again": torchrun(SCRIPT, "--dir", str(d), "--stage", "2", "--steps", str(newest + 2))})["again"]
    assert again.count(f"starting at step {newest}") == 2, again[-4000:]


def test_every_auto_starts_from_a_guess_of_the_engines_state_not_from_nothing() -> None:
    """Before its first save is timed, an engine job's ``every="auto"`` interval comes from a guess
    of one rank's state (16 bytes a parameter, ZeRO-3's placeholders at their full size): without
    it the interval would be a millisecond, a save at every exchange."""
    from types import SimpleNamespace

    import torch

    from ckptd.core.policy import SavePolicy
    from trainer_hooks._clock.timerules import TimeRules
    from trainer_hooks.deepspeed import state_guess

    model = torch.nn.Linear(1000, 1000)
    assert state_guess(SimpleNamespace(module=model), 2) == 16 * 1_001_000 // 2
    placeholder = torch.nn.Parameter(torch.empty(0))
    placeholder.ds_numel = 5000  # type: ignore[attr-defined]
    assert state_guess(SimpleNamespace(module=SimpleNamespace(parameters=lambda: [placeholder])), 1) == 80_000
    assert state_guess(SimpleNamespace(), 1) == 0  # no module: no guess, never an error
    policy = SavePolicy.from_settings({"every": "auto"})
    rules = TimeRules(policy, lambda _: None, lambda: True, "j", state_guess(SimpleNamespace(module=model), 2))
    try:
        assert rules.auto is not None and rules.auto.seconds > 10 and rules.auto.rule == "young_daly", rules.auto
    finally:
        rules.close()

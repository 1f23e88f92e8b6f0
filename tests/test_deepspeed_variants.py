"""The DeepSpeed variants users run, each killed and resumed bit for bit (issue 35).

Real DeepSpeed 0.19 on its CPU accelerator (gloo, 2 ranks under torchrun,
``tests/scripts/ds_variant_train.py``): bf16 under ZeRO-2 and ZeRO-3, DeepSpeed's own Adam
(DeepSpeedCPUAdam, the cpu_adam op ``make`` prebuilds) with its optimizer offloaded to the CPU,
and an engine built by Accelerate's DeepSpeed plugin. Each runs 12 steps saving every 4,
straight and, beside it, with one rank SIGKILLed between saves; the killed run's directory
holds only committed tags, and the run started again from it resumes there and must end with
the uninterrupted run's fingerprint on every rank (weights, fp32 master partitions, optimizer
moments, loss scaler, scheduler, step). fp16 (the loss scaler that moves) is GPU-only: the CPU
accelerator refuses it, see tests/test_gpu.py.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PYTHON, ROOT, ckptd_cli, free_port, project_env

pytest.importorskip("deepspeed")

TORCHRUN = str(Path(PYTHON).parent / "torchrun")
ENV = project_env(DS_ACCELERATOR="cpu", CKPTD_SOCKET="/nonexistent/ckptd.sock", OMP_NUM_THREADS="1")
SCRIPT = str(ROOT / "tests" / "scripts" / "ds_variant_train.py")
pytestmark = [pytest.mark.xdist_group("deepspeed"), pytest.mark.slow, pytest.mark.timeout(900)]


def launch(directory: Path, *args: str) -> subprocess.Popen[str]:
    cmd = [
        TORCHRUN,
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        SCRIPT,
        "--dir",
        str(directory),
        "--steps",
        "12",
        "--every",
        "4",
        *args,
    ]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def fingerprints(out: str) -> dict[str, str]:
    return dict(re.findall(r"rank (\d) FINGERPRINT (.+)", out))  # the hash, then dtype, optimizer, steps, scaler


def kill_and_resume(tmp_path: Path, *args: str, die_rank: int = 1, die_at: int = 10) -> tuple[str, Path, str]:
    """The straight run's output; the killed run's directory; the resumed run's output.
    Asserts what a user relies on: the kill left only committed tags (``latest`` on the last
    save before it), the next run resumed there on every rank, and it ended identical."""
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    straight = launch(straight_dir, *args)
    killed = launch(killed_dir, *args, "--die-rank", str(die_rank), "--die-at", str(die_at))
    out, _ = straight.communicate(timeout=900)
    dead, _ = killed.communicate(timeout=900)
    assert straight.returncode == 0, out[-4000:]
    assert killed.returncode != 0 and f"rank {die_rank} SIGKILL after step {die_at}" in dead, dead[-4000:]
    last = die_at // 4 * 4
    assert (killed_dir / "latest").read_text() == f"global_step{last}"
    assert sorted(p.name for p in killed_dir.glob("global_step*")) == sorted(
        f"global_step{s}" for s in range(4, last + 1, 4)
    )
    again = launch(killed_dir, *args)
    resumed, _ = again.communicate(timeout=900)
    assert again.returncode == 0, resumed[-4000:]
    assert resumed.count(f"starting at step {last}") == 2, resumed[-4000:]
    assert len(fingerprints(out)) == 2 and fingerprints(resumed) == fingerprints(out), (out[-1500:], resumed[-1500:])
    assert not [n for n in os.listdir(killed_dir) if n.startswith(".ckptd-staging")]
    return out, killed_dir, resumed


def test_bf16_zero2_resumes_bit_identical_after_sigkill(tmp_path: Path) -> None:
    out, d, _ = kill_and_resume(tmp_path, "--stage", "2", "--dtype", "bf16")
    assert out.count("dtype=bfloat16 optimizer=DeepSpeedZeroOptimizer/AdamW") == 2
    assert sorted(p.name for p in (d / "global_step8").glob("*optim_states.pt")) == [
        f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)
    ]
    r = ckptd_cli("verify", str(d), timeout=300)
    assert r.returncode == 0 and r.stdout.count("ok ") == 3, r.stdout  # global_step4, 8, 12


def test_bf16_zero3_resumes_bit_identical_and_every_parameter_is_in_a_partition(tmp_path: Path) -> None:
    """ZeRO-3 + bf16: every rank's fp32 master partition is saved, together covering every
    parameter element. DeepSpeed's model-states files list each parameter as a 0-element bf16
    placeholder (its layout: ``load_checkpoint`` rebuilds the bf16 weights from the fp32
    partitions); those placeholders are the only empty tensors, and the bit-identical resume of
    the bf16 weights shows nothing was lost."""
    import torch

    from ckptd.foreign.picklesafe import safe_load

    out, d, _ = kill_and_resume(tmp_path, "--stage", "3", "--dtype", "bf16")
    assert out.count("dtype=bfloat16 optimizer=DeepSpeedZeroOptimizer_Stage3/AdamW") == 2
    n_params = 8 * 16 + 16 + 16 * 4 + 4
    covered = 0
    for rank in (0, 1):
        optim = safe_load(str(d / "global_step8" / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
        flat = optim["optimizer_state_dict"]["fp32_flat_groups"]
        assert all(t.dtype == torch.float32 and t.numel() > 0 for t in flat)
        covered += sum(t.numel() for t in flat)
        state = optim["optimizer_state_dict"]["optimizer_state_dict"]["state"]
        assert all(s["exp_avg"].numel() == s["exp_avg_sq"].numel() > 0 for s in state.values())
        empty = [path for path, t in _tensors(optim) if t.numel() == 0]
        assert empty == [], empty
        model = safe_load(str(d / "global_step8" / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"))
        empty = [path for path, t in _tensors(model) if t.numel() == 0]
        assert sorted(empty) == sorted(f"module/{k}" for k in model["module"]), empty
    assert covered == n_params  # two ranks' partitions: every element once (no padding at this size)
    r = ckptd_cli("verify", str(d), timeout=300)
    assert r.returncode == 0 and r.stdout.count("ok ") == 3, r.stdout


def test_deepspeed_own_adam_with_cpu_offload_resumes_bit_identical(tmp_path: Path) -> None:
    """The config's optimizer ("type": "Adam") and scheduler (WarmupLR), ZeRO-2 with
    ``offload_optimizer: cpu``: DeepSpeedCPUAdam's state and DeepSpeed's scheduler resume too."""
    out, d, _ = kill_and_resume(tmp_path, "--stage", "2", "--ds-adam", "--offload")
    assert out.count("optimizer=DeepSpeedZeroOptimizer/DeepSpeedCPUAdam") == 2, out[-3000:]
    assert (d / "global_step8" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()


def test_accelerate_deepspeed_plugin_engine_resumes_bit_identical(tmp_path: Path) -> None:
    """Accelerate's DeepSpeedPlugin (ZeRO-2): ``Checkpointer(job, dir, model=model,
    optimizer=optimizer, scheduler=scheduler)`` on what ``accelerator.prepare`` returned, the loop
    written with ``accelerator.backward``; rank 0 killed after step 6 resumes at 4."""
    out, _, _ = kill_and_resume(tmp_path, "--stage", "2", "--accelerate", die_rank=0, die_at=6)
    assert out.count("optimizer=DeepSpeedZeroOptimizer/AdamW") == 2


def _tensors(obj: object, path: str = "") -> list[tuple[str, Any]]:
    """Every tensor in a loaded checkpoint, with its path ("module/0.weight")."""
    import torch

    if isinstance(obj, torch.Tensor):
        return [(path, obj)]
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    return [pt for k, v in items for pt in _tensors(v, f"{path}/{k}" if path else str(k))]

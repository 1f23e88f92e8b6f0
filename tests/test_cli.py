"""The CLI on other tools' checkpoints and on wrong input, as a new user types it (issue 17)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import ckptd_cli
from tests.helpers import small_checkpoint


def hf_output(root: Path, steps: tuple[int, ...] = (10, 20)) -> Path:
    for step in steps:
        ck = root / f"checkpoint-{step}"
        ck.mkdir(parents=True)
        save_file({"w": torch.ones(3) * step}, str(ck / "model.safetensors"))
        torch.save({"state": {}, "param_groups": []}, ck / "optimizer.pt")
        (ck / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return root


def test_verify_a_plain_torch_save_file_and_a_malicious_one(tmp_path: Path) -> None:
    plain = tmp_path / "model.pt"
    torch.save({"w": torch.ones(4)}, plain)
    r = ckptd_cli("verify", str(plain))
    assert r.returncode == 0 and r.stdout.startswith("ok") and "1 tensors" in r.stdout, r.stdout + r.stderr

    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {sentinel}",))

    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "x": Payload()}, evil, pickle_module=pickle)
    r = ckptd_cli("verify", str(evil), "--json")
    assert r.returncode == 1
    [doc] = json.loads(r.stdout)
    assert doc["outcome"] == "unsafe" and "could execute code" in doc["reason"]
    assert not sentinel.exists()


def test_verify_list_latest_and_pin_an_hf_output_directory(tmp_path: Path) -> None:
    out = hf_output(tmp_path / "hfout")
    r = ckptd_cli("verify", str(out))
    assert r.returncode == 0 and r.stdout.count("\nok") + r.stdout.startswith("ok") == 2, r.stdout
    listing = json.loads(ckptd_cli("list", str(out), "--json").stdout)
    assert [(c["step"], c["trigger"]) for c in listing] == [(10, "hf"), (20, "hf")]
    assert ckptd_cli("latest", str(out)).stdout.strip() == str(out / "checkpoint-20")
    (out / "checkpoint-20" / "model.safetensors").write_bytes(b"garbage")
    latest = ckptd_cli("latest", str(out))
    assert latest.stdout.strip() == str(out / "checkpoint-10"), latest.stderr
    r = ckptd_cli("pin", str(out / "checkpoint-10"))
    assert r.returncode == 0 and (out / ".checkpoint-10.pinned").exists(), r.stderr


def test_missing_paths_say_so(tmp_path: Path) -> None:
    r = ckptd_cli("verify", str(tmp_path / "nope.safetensors"))
    assert r.returncode == 1 and "MISSING" in r.stdout and "no such file" in r.stdout and "CORRUPT" not in r.stdout
    for verb in ("list", "latest", "gc"):
        r = ckptd_cli(verb, str(tmp_path / "runs" / "x"))
        assert r.returncode != 0 and "no such directory" in r.stderr and "daemon" not in r.stderr, (verb, r.stderr)


def test_verify_streams_one_line_per_checkpoint(tmp_path: Path) -> None:
    for i in range(3):
        small_checkpoint(tmp_path, f"c{i}.safetensors", step=i)
    r = ckptd_cli("verify", str(tmp_path))
    assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 3


def test_serve_refuses_a_missing_or_read_only_root(tmp_path: Path) -> None:
    r = ckptd_cli(
        "serve",
        "--root",
        str(tmp_path / "missing"),
        "--state-dir",
        str(tmp_path / "s"),
        "--socket",
        str(tmp_path / "s.sock"),
        "--metrics-listen",
        "127.0.0.1:0",
        timeout=30,
    )
    assert r.returncode != 0 and "does not exist" in r.stderr and not (tmp_path / "missing").exists()


def test_keep_best_needs_best_metric_and_unknown_env_vars_are_named(tmp_path: Path) -> None:
    small_checkpoint(tmp_path, "t-step00000001.safetensors")
    r = ckptd_cli("gc", str(tmp_path), "--keep-best", "2", "--dry-run")
    assert r.returncode == 2 and "keep_best=2 needs best_metric" in r.stderr
    from tests.conftest import run_py

    r = run_py(
        "-c",
        "import torch\nfrom trainer_hooks import Checkpointer\n"
        f"Checkpointer('j', {str(tmp_path / 'r')!r}, model=torch.nn.Linear(2, 2), total_steps=10, "
        "every_steps=50, socket=False).close()",
        env={"CKPTD_EVERY_STEP": "5"},
    )
    assert r.returncode == 0, r.stderr
    assert "CKPTD_EVERY_STEP is not a ckptd setting (did you mean CKPTD_EVERY_STEPS?)" in r.stderr
    assert "longer than the run" in r.stderr


def test_serve_names_a_bad_or_busy_metrics_address(tmp_path: Path) -> None:
    import socket

    base = ["serve", "--root", str(tmp_path), "--state-dir", str(tmp_path / "s"), "--socket", str(tmp_path / "s.sock")]
    r = ckptd_cli(*base, "--metrics-listen", "localhost", timeout=30)
    assert r.returncode == 1 and "expected host:port" in r.stderr and "Traceback" not in r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = ckptd_cli(*base, "--metrics-listen", f"127.0.0.1:{port}", timeout=30)
    assert r.returncode == 1 and f"127.0.0.1:{port}" in r.stderr and "in use" in r.stderr, r.stderr


def test_list_of_a_parent_of_job_directories_keeps_ckptds_own_metadata(tmp_path: Path) -> None:
    """``ckptd list DIR`` on a parent of job directories names each job and trigger as ``ckptd list
    DIR/job`` does (they showed a blank job and the trigger "safetensors"); a foreign file whose
    step cannot be known shows "-" (JSON: null), not 0 or -1."""
    from trainer_hooks import Checkpointer

    runs = tmp_path / "runs"
    for job in ("alpha", "beta"):
        ckpt = Checkpointer(job, runs / job, model=torch.nn.Linear(2, 2), every_steps=2, socket=False)
        for _ in range(3):
            ckpt.step()
        ckpt.close()
    save_file({"w": torch.ones(2)}, str(runs / "model.safetensors"))
    torch.save({"w": torch.ones(2)}, runs / "weights.pt")
    listed = json.loads(ckptd_cli("list", str(runs), "--json").stdout)
    ours = sorted((c["job"], c["step"], c["trigger"]) for c in listed if c["job"])
    assert ours == [("alpha", 2, "step"), ("alpha", 3, "final"), ("beta", 2, "step"), ("beta", 3, "final")]
    foreign = {Path(c["path"]).name: c for c in listed if not c["job"]}
    assert set(foreign) == {"model.safetensors", "weights.pt"}
    assert all(c["step"] is None for c in foreign.values()), foreign
    only_beta = json.loads(ckptd_cli("list", str(runs), "--job", "beta", "--json").stdout)
    assert [(c["job"], c["step"]) for c in only_beta] == [("beta", 2), ("beta", 3)]
    table = ckptd_cli("list", str(runs)).stdout.splitlines()
    row = next(line for line in table if line.endswith("weights.pt"))
    assert row.split()[:3] == ["-", "-", "torch"], row
    row = next(line for line in table if line.endswith("beta-step00000003.safetensors"))
    assert row.split()[:3] == ["3", "beta", "final"], row


def test_subprocesses_of_the_suite_keep_the_callers_pythonpath(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite's daemons and trainers put the project in front of the caller's PYTHONPATH instead
    of replacing it (on the GPU machine, watchdog was found only through it: 38 tests failed)."""
    from tests.conftest import ROOT, DaemonProc, run_py

    (tmp_path / "only_here.py").write_text("VALUE = 42\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    r = run_py("-c", "import only_here, ckptd.cli; print(only_here.VALUE)")
    assert r.returncode == 0 and r.stdout.strip() == "42", r.stderr
    assert DaemonProc(tmp_path / "d").env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), str(tmp_path)]

"""Issue 36 #5, the smaller findings: each as a user meets it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT


def test_make_demo_says_what_it_installs_and_shows_pip_progress(tmp_path: Path) -> None:
    r = subprocess.run(["make", "-n", "demo", f"VENV={tmp_path / 'venv'}"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    installs = [line for line in r.stdout.splitlines() if " install " in line]
    assert installs and not any(" -q" in line for line in installs), installs
    assert "installing torch" in r.stdout


def test_gc_on_a_foreign_directory_says_what_it_would_do_and_deletes_nothing(tmp_path: Path) -> None:
    import torch

    from tests.conftest import ckptd_cli

    for step in (10, 20, 30):
        torch.save({"w": torch.ones(3) * step}, tmp_path / f"model-step{step}.pt")
    (tmp_path / "bad-step40.pt").write_bytes(b"PK\x03\x04 no zip after all")
    before = sorted(p.name for p in tmp_path.iterdir())
    r = ckptd_cli("gc", str(tmp_path), "--keep-last", "1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any("would delete" in line and line.endswith("model-step10.pt") for line in lines), r.stdout
    assert any(
        line.strip().startswith("keep") and "keep_last" in line and line.endswith("model-step30.pt") for line in lines
    ), r.stdout
    assert any(
        line.strip().startswith("keep") and "unverified" in line and line.endswith("bad-step40.pt") for line in lines
    ), r.stdout
    assert "nothing deleted" in r.stdout and sorted(p.name for p in tmp_path.iterdir()) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    none = ckptd_cli("gc", str(empty))
    assert none.returncode == 1 and "no checkpoints here" in none.stderr


def test_an_hf_export_names_the_architecture_of_a_model_built_from_its_config(tmp_path: Path) -> None:
    """A model built locally from a config has ``architectures: null``; save_pretrained would write
    the class, and so does the export now (Auto classes pick a custom architecture by it)."""
    import json

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.conftest import ckptd_cli
    from trainer_hooks import Checkpointer

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    assert model.config.architectures is None
    Checkpointer("hf", tmp_path / "ck", model=model, socket=False, quiet=True).close()
    r = ckptd_cli("export", str(tmp_path / "ck"), str(tmp_path / "out"), "--format", "hf")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]


def test_max_bytes_smaller_than_one_checkpoint_is_refused_at_construction(tmp_path: Path) -> None:
    import torch

    from ckptd.core.settings import SettingsError
    from trainer_hooks import Checkpointer

    model = torch.nn.Linear(256, 256)  # 257 KiB of weights
    with pytest.raises(SettingsError, match=r"max_bytes=64(\.0)? KiB is smaller than one checkpoint of this job"):
        Checkpointer("q", tmp_path, model=model, max_bytes="64KiB", socket=False, quiet=True)
    assert not list(tmp_path.iterdir())


def test_a_checkpoint_that_outgrows_max_bytes_fails_its_save_saying_so(tmp_path: Path) -> None:
    """The size known at construction grew (an extra tensor): the save says max_bytes can never fit."""
    import torch

    from trainer_hooks import Checkpointer

    extra: dict[str, object] = {}
    ckpt = Checkpointer(
        "q",
        tmp_path,
        model=torch.nn.Linear(8, 4),
        extra=extra,
        max_bytes="64KiB",
        every_steps=1,
        save_final=False,
        socket=False,
        quiet=True,
    )
    try:
        extra["blob"] = torch.zeros(64 * 1024)  # 256 KiB
        ckpt.step()
        ckpt.wait()
        assert ckpt.last_error is not None and ckpt.last_error.reason == "no_space"
        assert "max_bytes=64" in str(ckpt.last_error) and "smaller than one checkpoint" in str(ckpt.last_error)
    finally:
        ckpt.close(final=False)

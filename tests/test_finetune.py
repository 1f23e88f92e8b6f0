"""Fine-tuning (SPEC §13, issue 27): a frozen base stored once and referenced, retention and
quota that know what is shared, ``save="trainable"``, and ``ckptd export`` to files that
``safetensors``, ``from_pretrained`` and ``PeftModel.from_pretrained`` load."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptd.core.format import read_header
from ckptd.disk.scan import scan
from ckptd.disk.verify import verify_file
from tests.conftest import PYTHON, ROOT, DaemonProc, ckptd_cli, project_env, run_py, wait_until
from tests.scripts.lora_train import build
from trainer_hooks import Checkpointer

LORA = str(ROOT / "tests" / "scripts" / "lora_train.py")


def train(model: Any, opt: Any, ckpt: Checkpointer, steps: int) -> None:
    for _ in range(steps):
        step = ckpt.step_count
        model(torch.randn(16, 512, generator=torch.Generator().manual_seed(step))).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        ckpt.step()


def trainable_bytes(model: Any, opt: Any) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    moments = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim())
    return params + moments


def test_a_frozen_base_is_written_once_and_kept_while_a_kept_checkpoint_refers_to_it(tmp_path: Path) -> None:
    """keep_last=2 over 10 saves: the first save holds the base, the later ones refer to it and
    cost what changed; retention keeps the holder ("referenced by step 10"), resume of the newest
    is bit for bit, ``ckptd verify`` follows the references, and a damaged base is named."""
    model, opt = build()
    ckpt = Checkpointer(
        "lora", tmp_path, model=model, optimizer=opt, every_steps=1, keep_last=2, socket=False, quiet=True
    )
    train(model, opt, ckpt, 10)
    ckpt.close()
    files = scan(str(tmp_path), "lora")
    assert [c.step for c in files] == [1, 9, 10]
    base = sum(p.numel() * 4 for p in model.base.parameters())
    assert files[0].bytes > base and files[0].refs == ()
    assert all(c.refs == (os.path.basename(files[0].path),) for c in files[1:])
    limit = 1.2 * trainable_bytes(model, opt) + 64 * 1024
    assert all(c.bytes <= limit for c in files[1:]), ([c.bytes for c in files], limit)
    verdicts = json.loads(ckptd_cli("gc", str(tmp_path), "--dry-run", "--keep-last", "1", "--json").stdout)
    holder = next(v for v in verdicts if v["step"] == 1)
    assert holder["keep"] and holder["reasons"] == ["referenced by step 10"], verdicts
    live = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    model2, opt2 = build(seed=7)
    again = Checkpointer("lora", tmp_path, model=model2, optimizer=opt2, socket=False, save_final=False, quiet=True)
    assert again.resume() == 10
    again.close(final=False)
    assert all(torch.equal(live[k], v) for k, v in model2.state_dict().items())
    assert all(torch.equal(moments[k], v) for k, v in opt2.state_dict()["state"][0].items())
    assert ckptd_cli("verify", str(tmp_path)).returncode == 0
    with open(files[0].path, "r+b") as f:  # one bit of the base, in the holder
        header = read_header(f, os.fstat(f.fileno()).st_size)
        entry = next(e for e in header.tensors if e.name == "model/base.1.weight")
        f.seek(header.data_start + entry.begin + 100)
        byte = f.read(1)[0]
        f.seek(header.data_start + entry.begin + 100)
        f.write(bytes([byte ^ 0x10]))
    bad = ckptd_cli("verify", files[-1].path)
    assert bad.returncode == 1 and f"(its bytes, in {os.path.basename(files[0].path)})" in bad.stdout, bad.stdout


def test_a_frozen_tensor_written_in_place_is_stored_again(tmp_path: Path) -> None:
    """Unchanged means the same storage at the same version counter: an in-place write to a
    frozen parameter (a merged adapter, a reloaded base) moves the counter, and the next save
    stores that tensor again rather than referring to stale bytes."""
    model, opt = build()
    ckpt = Checkpointer("lora", tmp_path, model=model, optimizer=opt, every_steps=1, socket=False, quiet=True)
    train(model, opt, ckpt, 2)
    with torch.no_grad():
        model.base[0].weight.mul_(0.5)
    train(model, opt, ckpt, 1)
    ckpt.close()
    files = scan(str(tmp_path), "lora")
    assert [c.step for c in files] == [1, 2, 3]
    assert files[1].bytes < files[0].bytes / 4 and files[2].bytes > files[0].bytes / 3  # base[0].weight again
    model2, opt2 = build(seed=3)
    again = Checkpointer("lora", tmp_path, model=model2, optimizer=opt2, socket=False, save_final=False, quiet=True)
    again.resume()
    again.close(final=False)
    assert torch.equal(model2.base[0].weight, model.base[0].weight)


def test_quota_counts_shared_bytes_once(tmp_path: Path) -> None:
    """A budget that holds the base once and each save's own bytes: no save fails ``no_space`` and
    nothing a kept checkpoint refers to is deleted (counting the base per file would need 6x it)."""
    model, opt = build()
    probe = Checkpointer("probe", tmp_path / "probe", model=model, optimizer=opt, socket=False, quiet=True)
    probe.close()
    full = scan(str(tmp_path / "probe"), "probe")[0].bytes
    budget = int(full * 1.6)
    ckpt = Checkpointer(
        "lora",
        tmp_path / "run",
        model=model,
        optimizer=opt,
        every_steps=1,
        keep_last=5,
        max_bytes=budget,
        socket=False,
        quiet=True,
    )
    train(model, opt, ckpt, 6)
    ckpt.close()
    files = scan(str(tmp_path / "run"), "lora")
    assert ckpt.stats["failed"] == 0 and ckpt.stats["verified"] == 6, ckpt.saved
    assert files[0].step == 1 and len(files) == 6 and all(verify_file(c.path).ok for c in files)
    assert sum(c.bytes for c in files) <= budget < 6 * full


def tiny_gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=32, bos_token_id=0, eos_token_id=0)
    )


def test_save_trainable_and_export_to_peft_and_hf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PEFT LoRA fine-tune with ``save="trainable"``: the checkpoint holds the adapter and its
    optimizer, not the base; the user's own code loads the base and resume restores the rest;
    ``ckptd export --format peft`` loads with ``PeftModel.from_pretrained`` and gives the same
    logits; a plain HF model's ``--format hf`` loads with ``from_pretrained``."""
    pytest.importorskip("peft")
    import tqdm
    from peft import LoraConfig, PeftModel, get_peft_model

    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)  # from_pretrained's progress bar: no monitor thread
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True)
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ckpt = Checkpointer(
        "lora", tmp_path / "ck", model=model, optimizer=opt, every_steps=2, save="trainable", socket=False, quiet=True
    )
    x = torch.randint(0, 128, (2, 16))
    for _ in range(4):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        ckpt.step()
    ckpt.close()
    model.eval()
    with torch.no_grad():
        want = model(input_ids=x).logits
    saved = scan(str(tmp_path / "ck"), "lora")[-1]
    names = set(load_file(saved.path))
    assert names and all("lora_" in n for n in names if n.startswith("model/")), sorted(names)[:5]
    resumed = get_peft_model(
        tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True)
    )
    opt2 = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2)
    again = Checkpointer(
        "lora",
        tmp_path / "ck",
        model=resumed,
        optimizer=opt2,
        save="trainable",
        socket=False,
        save_final=False,
        quiet=True,
    )
    assert again.resume() == 4
    again.close(final=False)
    resumed.eval()
    with torch.no_grad():
        assert torch.equal(resumed(input_ids=x).logits, want)
    r = ckptd_cli("export", str(tmp_path / "ck"), str(tmp_path / "adapter"), "--format", "peft", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["tensors"] == 4, r.stderr
    loaded = PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, want)
    wrong = ckptd_cli("export", str(tmp_path / "ck"), str(tmp_path / "hf"), "--format", "hf")
    assert wrong.returncode == 1 and "is a PEFT model: export its adapter with --format peft" in wrong.stderr

    plain = tiny_gpt2()
    Checkpointer("plain", tmp_path / "plain", model=plain, socket=False, quiet=True).close()
    r = ckptd_cli("export", str(tmp_path / "plain"), str(tmp_path / "hf"), "--format", "hf")
    assert r.returncode == 0, r.stderr
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        assert torch.equal(hf(input_ids=x).logits, plain.eval()(input_ids=x).logits)
    assert set(load_file(str(tmp_path / "hf" / "model.safetensors"))) == set(plain.state_dict())


def test_export_says_what_does_not_fit(tmp_path: Path) -> None:
    no_model = Checkpointer("nomodel", tmp_path / "a", extra={"w": torch.ones(3)}, socket=False, quiet=True)
    no_model.close()
    r = ckptd_cli("export", str(tmp_path / "a"), str(tmp_path / "out"))
    assert r.returncode == 1 and "holds no model weights" in r.stderr, r.stderr
    plain = Checkpointer("plain", tmp_path / "b", model=torch.nn.Linear(2, 2), socket=False, quiet=True)
    plain.close()
    r = ckptd_cli("export", str(tmp_path / "b"), str(tmp_path / "out"), "--format", "peft")
    assert r.returncode == 1 and "is not a PEFT model's checkpoint" in r.stderr, r.stderr
    r = ckptd_cli("export", str(tmp_path / "b"), str(tmp_path / "out"), "--format", "hf")
    assert r.returncode == 1 and "recorded no HF config" in r.stderr, r.stderr
    r = ckptd_cli("export", str(tmp_path / "b"), str(tmp_path / "out"), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["files"] == [str(tmp_path / "out" / "model.safetensors")]


@pytest.mark.slow
def test_sigkill_of_trainer_and_daemon_during_saves_that_refer_to_shared_bytes(tmp_path: Path) -> None:
    """Saves every step through the daemon, each referring to the base; the trainer is SIGKILLed
    at random moments, then the daemon: every file under a final name verifies with its
    references followed, the holder is never deleted while referred to, and the run resumed
    after all of it ends with the same weights as a run never killed."""
    straight = run_py(LORA, str(tmp_path / "straight"), "30")
    assert straight.returncode == 0, straight.stderr[-2000:]
    d = DaemonProc(tmp_path / "d").start()
    run = d.root / "lora"
    rng = random.Random(27)
    try:
        for kill in ("trainer", "trainer", "trainer", "daemon", "daemon"):
            p = subprocess.Popen(
                [PYTHON, LORA, str(run), "30", "--step-sleep", "0.02", "--socket", d.socket],
                env=project_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            wait_until(lambda: len(scan(str(run), "lora")) >= 2 or p.poll() is not None, 60, "saves")
            time.sleep(rng.uniform(0.0, 0.3))
            if kill == "trainer":
                p.send_signal(signal.SIGKILL)
            else:
                d.kill(9)
                d = DaemonProc(tmp_path / "d").start()
            p.wait(60) if kill == "trainer" else _finish(p)
            # the daemon finishes a save handed over before the kill, and its retention, before it lets the
            # session go: read the directory after that, not while a file may still be renamed or removed
            wait_until(lambda: d.metric("ckptd_job_up", training_job="lora") == 0, 60, "the disconnect")
            found = scan(str(run), "lora")
            assert found and all(verify_file(c.path).ok for c in found), [
                (c.path, verify_file(c.path).reason) for c in found
            ]
            holders = {h for c in found for h in c.refs}
            assert all((run / h).exists() for h in holders)
        final = subprocess.run(
            [PYTHON, LORA, str(run), "30", "--socket", d.socket],
            env=project_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert final.returncode == 0, final.stderr[-2000:]
        assert final.stdout.split()[1] == straight.stdout.split()[1], (final.stdout, straight.stdout)
    finally:
        d.stop()


def _finish(p: subprocess.Popen[bytes]) -> None:
    """After a daemon kill the trainer saves embedded and reconnects: stop it as preemption would."""
    p.send_signal(signal.SIGKILL)
    p.wait(60)


def test_a_base_loaded_again_by_resume_is_found_unchanged_by_its_bytes(tmp_path: Path) -> None:
    """``resume()`` loads the frozen base into the parameters again: their version counters move,
    their bytes do not. The first save after the resume compares them byte for byte with the file
    that holds them and refers to it instead of writing the base again; so does a buffer that
    did not change. (Before, every restart of a fine-tune wrote the whole base once more.)"""
    model, opt = build()
    model.register_buffer("table", torch.randn(256, 256))  # 256 KiB, never written by training
    ckpt = Checkpointer("lora", tmp_path, model=model, optimizer=opt, every_steps=1, socket=False, quiet=True)
    train(model, opt, ckpt, 2)
    ckpt.close()
    model2, opt2 = build(seed=4)
    model2.register_buffer("table", torch.zeros(256, 256))
    again = Checkpointer("lora", tmp_path, model=model2, optimizer=opt2, every_steps=1, socket=False, quiet=True)
    assert again.resume() == 2
    train(model2, opt2, again, 2)
    again.close()
    files = scan(str(tmp_path), "lora")
    assert [c.step for c in files] == [1, 2, 3, 4]
    assert files[2].bytes < files[0].bytes / 5 and files[3].bytes < files[0].bytes / 5, [c.bytes for c in files]
    with open(files[2].path, "rb") as f:
        refs = json.loads(read_header(f, os.fstat(f.fileno()).st_size).metadata["ckptd.refs"])
    assert {"model/base.0.weight", "model/table"} <= set(refs), sorted(refs)
    assert all(verify_file(c.path).ok for c in files)
    model3, opt3 = build(seed=8)
    model3.register_buffer("table", torch.zeros(256, 256))
    last = Checkpointer("lora", tmp_path, model=model3, optimizer=opt3, socket=False, save_final=False, quiet=True)
    assert last.resume() == 4
    last.close(final=False)
    assert all(torch.equal(v, model2.state_dict()[k]) for k, v in model3.state_dict().items())


def test_watch_modes_verification_follows_references(tmp_path: Path) -> None:
    """Watch mode judges a ckptd file it finds with the same verification (``foreign.verify``): a
    checkpoint whose holder is gone is incomplete, named as such, not passed as a good one."""
    from ckptd.foreign import formats as foreign

    model, opt = build()
    ckpt = Checkpointer("lora", tmp_path, model=model, optimizer=opt, every_steps=1, socket=False, quiet=True)
    train(model, opt, ckpt, 2)
    ckpt.close()
    found = foreign.find(str(tmp_path))
    assert [f.kind for f in found] == ["safetensors", "safetensors"]
    assert all(foreign.verify(f).ok for f in found)
    holder, referring = sorted(found, key=lambda f: f.step or 0)
    os.unlink(holder.path)
    result = foreign.verify(referring)
    assert not result.ok and f"referenced file {os.path.basename(holder.path)} is missing" in result.reason, result


def test_a_step_saved_again_never_replaces_a_file_others_refer_to(tmp_path: Path) -> None:
    """The same step saved twice (a manual save right after a scheduled one, a save the daemon
    persisted just before it died and the hook persists again): the second snapshot refers to
    the first file for the frozen base, so replacing that file would leave it, and everything
    after it, pointing at bytes that are gone. The first is kept; the save succeeds; all verify."""
    model, opt = build()
    ckpt = Checkpointer("lora", tmp_path, model=model, optimizer=opt, every_steps=1, socket=False, quiet=True)
    train(model, opt, ckpt, 1)
    ckpt.wait()
    first = scan(str(tmp_path), "lora")[0]
    assert ckpt.save(wait=True)  # step 1 again: its frozen tensors refer to the file of step 1 itself
    assert ckpt.stats["failed"] == 0 and ckpt.last_verified == first.path
    train(model, opt, ckpt, 2)
    ckpt.close()
    files = scan(str(tmp_path), "lora")
    assert [c.step for c in files] == [1, 2, 3] and files[0].bytes == first.bytes
    assert all(verify_file(c.path).ok for c in files)

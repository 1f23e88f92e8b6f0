"""CUDA state (SPEC §10): saved from page-locked shared memory, verified, resumed bit-exactly.

Marked ``cuda`` and skipped where torch sees no GPU (CI); run on the device machine with
``pytest -m cuda tests/test_gpu.py``. On CPU, only the setting's parsing is tested here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckptd.core.settings import SettingsError
from ckptd.disk.scan import scan
from ckptd.disk.verify import verify_file
from tests.conftest import DaemonProc
from trainer_hooks import Checkpointer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_the_snapshot_setting_is_checked_and_cpu_state_ignores_it(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="snapshot"):
        Checkpointer("j", tmp_path, model=torch.nn.Linear(2, 2), snapshot="gpu")
    ckpt = Checkpointer("j", tmp_path, model=torch.nn.Linear(2, 2), snapshot="host")
    ckpt.close()
    assert not ckpt._buffer.pin and ckpt.stats["verified"] == 1


def test_a_buffer_cuda_will_not_page_lock_still_stages_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    """Page-locking is an optimisation: refused (here: a torch without CUDA), the snapshot is staged
    all the same, into the same reserved memory, and the reason is logged once."""
    from trainer_hooks._snapshot.staging import StagingBuffer

    buf = StagingBuffer("nopin", pin=True)
    try:
        with caplog.at_level("WARNING", logger="trainer_hooks"):
            buf.reserve(1 << 20)
            buf.join()
        assert buf.capacity == 1 << 20 and not buf.registered
        if not torch.cuda.is_available():
            assert "could not page-lock" in caplog.text
            caplog.clear()
            with caplog.at_level("WARNING", logger="trainer_hooks"):
                buf.pin = True  # what the first step() asks again for a state on a GPU
                buf.reserve(1 << 20)
                buf.join()
            assert "could not page-lock" not in caplog.text  # refused once, said once
        length = buf.stage({"w": torch.arange(1000.0)}, {})
        assert buf.grown_at_save == 0 and length < buf.capacity
    finally:
        buf.close()


class Net(torch.nn.Module):
    """fp32 and bf16 layers, a tied weight (one storage, two names) and a buffer.

    No submodule may shadow an ``nn.Module`` method: one named ``half`` made ``model.half`` a
    Linear, and the CUDA run failed with a TypeError before it tested anything."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(64, 32)
        self.body = torch.nn.Linear(32, 32)
        self.bf16 = torch.nn.Linear(32, 32).to(torch.bfloat16)
        self.head = torch.nn.Linear(32, 64, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.arange(32.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(self.embed(x)) * self.scale
        return self.head(self.bf16(h.bfloat16()).float())


def test_the_test_model_shadows_no_module_method() -> None:
    shadowed = [name for name, _ in Net().named_children() if callable(getattr(torch.nn.Module, name, None))]
    assert not shadowed, f"submodules named like nn.Module methods: {shadowed}"


def train(
    model: Net,
    opt: torch.optim.Optimizer,
    steps: int,
    device: str,
    ckpt: Checkpointer | None = None,
    after_save: list[dict[str, torch.Tensor]] | None = None,
) -> None:
    g = torch.Generator(device=device).manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, 64, (8, 4), device=device, generator=g)
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if ckpt is not None:
            saves = ckpt.stats["saves"]
            ckpt.step()
            if after_save is not None and ckpt.stats["saves"] > saves:
                after_save.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
                for p in model.parameters():  # the trainer's next kernels, at once: the snapshot must not see them
                    p.data.add_(1.0)


def run(directory: Path, socket: str | bool, device: str) -> tuple[list[dict[str, torch.Tensor]], Checkpointer, str]:
    """Ten steps saved at 5 and 10; the Checkpointer is closed whatever happens (a failed run
    must not leave its persist thread behind for the next test to trip over)."""
    torch.manual_seed(0)
    model = Net().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ckpt = Checkpointer(
        "gpu",
        directory,
        model=model,
        optimizer=opt,
        every_steps=5,
        keep_last=2,
        socket=socket,
        extra={"view": torch.arange(12.0, device=device).view(3, 4).t()},
    )
    at_save: list[dict[str, torch.Tensor]] = []
    try:
        train(model, opt, 10, device, ckpt, at_save)
        mode = ckpt.mode  # before close(), which ends the link
    finally:
        ckpt.close(final=False)
    return at_save, ckpt, mode


def check_saved(directory: Path, at_save: list[dict[str, torch.Tensor]]) -> None:
    from safetensors import safe_open

    saved = scan(str(directory), "gpu")
    assert [c.step for c in saved] == [5, 10]
    for c, expected in zip(saved, at_save):
        assert verify_file(c.path).ok
        with safe_open(c.path, "pt") as f:
            names = set(f.keys())
            for k, v in expected.items():
                name = f"model/{k}"
                if name in names:
                    assert torch.equal(f.get_tensor(name), v), f"{c.path}: {k} is not the state of step {c.step}"


DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[cuda, pytest.mark.cuda])]


@pytest.mark.parametrize("device", DEVICES)
def test_state_is_captured_at_its_step_and_resumes_on_its_device(tmp_path: Path, device: str) -> None:
    at_save, ckpt, _ = run(tmp_path, False, device)
    if device == "cuda":
        assert ckpt._buffer.registered or ckpt._buffer.fd < 0  # page-locked while it lived
    assert ckpt.stats["verified"] == 2 and ckpt._buffer.grown_at_save == 0
    check_saved(tmp_path, at_save)
    torch.manual_seed(5)
    model = Net().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    extra: dict[str, torch.Tensor] = {}
    resumed = Checkpointer("gpu", tmp_path, model=model, optimizer=opt, extra=extra, save_final=False)
    try:
        assert resumed.resume() == 10
    finally:
        resumed.close(final=False)
    for k, v in model.state_dict().items():
        assert v.device.type == device and torch.equal(v.cpu(), at_save[-1][k]), k
    assert model.head.weight.data_ptr() == model.embed.weight.data_ptr()  # still tied
    assert all(
        t.device.type == device
        for s in opt.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor) and t.dim()
    )
    assert torch.equal(extra["view"].cpu(), torch.arange(12.0).view(3, 4).t())  # a non-contiguous view


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.slow
def test_state_through_the_daemon(daemon: DaemonProc, device: str) -> None:
    directory = daemon.root / "gpu"
    at_save, ckpt, mode = run(directory, daemon.socket, device)
    assert mode == "daemon" and ckpt.stats["verified"] == 2
    check_saved(directory, at_save)
    assert daemon.metric("ckptd_saves_total", training_job="gpu", trigger="step", outcome="ok") == 2


@cuda
@pytest.mark.cuda
def test_a_cuda_rng_of_every_device_is_restored(tmp_path: Path) -> None:
    ckpt = Checkpointer("rng", tmp_path, model=torch.nn.Linear(2, 2).cuda(), save_final=False)
    ckpt.save(wait=True)
    expected = [torch.rand(4, device=f"cuda:{i}").cpu() for i in range(torch.cuda.device_count())]
    ckpt.close(final=False)
    again = Checkpointer("rng", tmp_path, model=torch.nn.Linear(2, 2).cuda(), save_final=False)
    again.resume()
    again.close(final=False)
    assert all(torch.equal(torch.rand(4, device=f"cuda:{i}").cpu(), e) for i, e in enumerate(expected))


@cuda
@pytest.mark.cuda
def test_an_overlapped_cuda_snapshot_is_the_state_of_its_step(tmp_path: Path) -> None:
    """snapshot="overlap" on CUDA: the copies run on ckptd's stream after step() returns; the next
    forward, backward and optimizer step are enqueued at once, and the optimizer's kernels wait
    (on the GPU) for the copy. The checkpoint is the state of the saving step."""
    torch.manual_seed(0)
    model = Net().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ckpt = Checkpointer(
        "gpu",
        tmp_path,
        model=model,
        optimizer=opt,
        every_steps=5,
        keep_last=2,
        socket=False,
        snapshot="overlap",
        quiet=True,
    )
    g = torch.Generator(device="cuda").manual_seed(1)
    at_save: list[dict[str, torch.Tensor]] = []
    try:
        for _ in range(10):
            x = torch.randint(0, 64, (8, 4), device="cuda", generator=g)
            model(x).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            saves = ckpt.stats["saves"]
            ckpt.step()
            if ckpt.stats["saves"] > saves:
                at_save.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
                model(x).float().pow(2).mean().backward()  # right away, while the copy may still run
                opt.step()
                opt.zero_grad()
    finally:
        ckpt.close(final=False)
    check_saved(tmp_path, at_save)


@cuda
@pytest.mark.cuda
def test_deepspeed_fp16_loss_scaler_resumes_exactly(tmp_path: Path) -> None:
    """fp16 with DeepSpeed's dynamic loss scaler (GPU-only: DeepSpeed's CPU accelerator refuses
    fp16, docs/deepspeed.md). Started at 2**20 the scale overflows, skips steps and halves, then
    grows every 2 good steps; run 12 steps saving every 4, once straight and once with the rank
    SIGKILLed after step 10, then resumed from global_step8: the scaler (cur_scale, cur_iter,
    last_overflow_iter, hysteresis), skipped steps, weights and optimizer must end as the
    uninterrupted run's."""
    import re
    import subprocess

    from tests.conftest import PYTHON, ROOT, free_port, project_env

    pytest.importorskip("deepspeed")
    env = project_env(DS_ACCELERATOR="cuda", CKPTD_SOCKET="/nonexistent/ckptd.sock")

    def run_ds(directory: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        cmd = [
            str(Path(PYTHON).parent / "torchrun"),
            "--nproc_per_node=1",
            f"--master_port={free_port()}",
            str(ROOT / "tests" / "scripts" / "ds_variant_train.py"),
            "--dir",
            str(directory),
            "--stage",
            "2",
            "--dtype",
            "fp16",
            "--steps",
            "12",
            "--every",
            "4",
            *extra,
        ]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)

    straight = run_ds(tmp_path / "straight")
    assert straight.returncode == 0, (straight.stdout + straight.stderr)[-4000:]
    killed = run_ds(tmp_path / "killed", "--die-rank", "0", "--die-at", "10")
    assert killed.returncode != 0 and "rank 0 SIGKILL after step 10" in killed.stdout
    assert (tmp_path / "killed" / "latest").read_text() == "global_step8"
    resumed = run_ds(tmp_path / "killed")
    assert resumed.returncode == 0 and "rank 0 starting at step 8" in resumed.stdout, resumed.stderr[-4000:]
    line = re.compile(r"rank 0 FINGERPRINT (.+)")
    final = line.findall(straight.stdout)
    assert len(final) == 1 and "dtype=float16" in final[0], straight.stdout[-2000:]
    skipped = int(re.findall(r"skipped=(\d+)", final[0])[0])
    scale = float(re.findall(r"cur_scale=([0-9.e+]+)", final[0])[0])
    assert skipped > 0 and scale < 2.0**20, final[0]  # the scaler moved: there is state to resume
    assert line.findall(resumed.stdout) == final  # fingerprint, skipped steps and scaler state alike

"""Tests: one DeepSpeed variant under ``Checkpointer(job, dir, engine=engine)`` (torchrun).

    DS_ACCELERATOR=cpu torchrun --nproc_per_node=2 tests/scripts/ds_variant_train.py --dir D \
        --stage 3 --dtype bf16 [--ds-adam [--offload]] [--accelerate] [--die-rank 1 --die-at 10]

``--dtype bf16|fp16|fp32``: DeepSpeed's mixed precision (fp16 brings its dynamic loss scaler,
started high so that it overflows, skips and changes scale within a few steps). ``--ds-adam``:
DeepSpeed's own optimizer and scheduler from the config ("optimizer": Adam, "scheduler":
WarmupLR; on CPU that is DeepSpeedCPUAdam, the prebuilt cpu_adam op) instead of a torch one.
``--accelerate``: the engine is built by Accelerate's DeepSpeed plugin and handed to
``Checkpointer`` as ``accelerator.prepare`` returned it. ``--die-rank R --die-at N``: rank R
SIGKILLs itself after step N (a crash between saves). Each rank prints its fingerprint:
weights (gathered), its optimizer partition, the loss scaler, the scheduler and the step.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
from typing import Callable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def config(a: argparse.Namespace) -> dict:
    cfg: dict = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": a.stage},
    }
    if a.dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    if (
        a.dtype == "fp16"
    ):  # 2**20 overflows at first: steps are skipped while the scale halves; it then doubles every 2 good steps
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 20, "loss_scale_window": 2, "hysteresis": 1}
    if a.ds_adam:
        cfg["optimizer"] = {"type": "Adam", "params": {"lr": 1e-2, "weight_decay": 0.01}}
        cfg["scheduler"] = {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-2, "warmup_num_steps": 5},
        }
        if a.offload:
            cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    return cfg


def build(a: argparse.Namespace) -> tuple[object, dict, Callable[[torch.Tensor], None]]:
    """The engine, what to hand ``Checkpointer`` besides job and directory, and one training step.
    With --accelerate, as an Accelerate user writes it: ``Checkpointer`` gets what
    ``accelerator.prepare`` returned (the model it returns *is* the engine) and the loop is
    ``accelerator.backward``, ``optimizer.step``, ``scheduler.step``, ``optimizer.zero_grad``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = sched = None
    if not a.ds_adam:  # a client (torch) optimizer and scheduler
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    if a.accelerate:
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin(hf_ds_config=config(a))
        accelerator = Accelerator(deepspeed_plugin=plugin, mixed_precision="bf16" if a.dtype == "bf16" else "no")
        model, opt, sched = accelerator.prepare(model, opt, sched)

        def accelerate_step(x: torch.Tensor) -> None:
            accelerator.backward((model(x).float() - 1).pow(2).mean())
            opt.step()
            sched.step()
            opt.zero_grad()

        return model, {"model": model, "optimizer": opt, "scheduler": sched}, accelerate_step
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=opt,
        lr_scheduler=sched,
        config=config(a),
        model_parameters=model.parameters() if a.ds_adam else None,
    )

    def engine_step(x: torch.Tensor) -> None:
        engine.backward((engine(x).float() - 1).pow(2).mean())
        engine.step()

    return engine, {"engine": engine}, engine_step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--ds-adam", action="store_true")
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--accelerate", action="store_true")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--die-rank", type=int, default=-1)
    ap.add_argument("--die-at", type=int, default=0)
    a = ap.parse_args()
    engine, parts, train_step = build(a)
    from trainer_hooks import Checkpointer

    rank = engine.global_rank  # type: ignore[attr-defined]
    ckpt = Checkpointer("ds-variant", a.dir, **parts, every_steps=a.every, total_steps=a.steps)
    start = ckpt.resume()
    print(f"rank {rank} starting at step {start}", flush=True)
    for step in range(start, a.steps):
        g = torch.Generator().manual_seed(step * 2 + rank)  # each rank its own micro-batch
        x = torch.randn(2, 8, generator=g) + torch.rand(1).item() * 1e-3  # the global RNG is part of the state
        x = x.to(engine.device, DTYPES[a.dtype])  # type: ignore[attr-defined]
        train_step(x)
        ckpt.step()
        if rank == a.die_rank and step + 1 == a.die_at:
            print(f"rank {rank} SIGKILL after step {step + 1}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    ckpt.close()
    sys.stdout.write(f"rank {rank} FINGERPRINT {fingerprint(engine)} {describe(engine)}\n")  # one write
    sys.stdout.flush()


def fingerprint(engine: object) -> str:
    """Weights in the engine's dtype (gathered under ZeRO-3), this rank's optimizer state (fp32
    master partitions, moments), the loss scaler, the scheduler's lr and the step, hashed."""
    import deepspeed

    h = hashlib.sha256()
    params = list(engine.module.parameters())  # type: ignore[attr-defined]
    with deepspeed.zero.GatheredParameters(params):
        for p in params:
            h.update(str(p.dtype).encode() + p.detach().float().cpu().numpy().tobytes())
    opt = engine.optimizer  # type: ignore[attr-defined]
    for t in _tensors(opt.state_dict()):
        h.update(t.detach().float().cpu().numpy().tobytes())
    h.update(scaler(engine).encode())
    h.update(str(engine.lr_scheduler.get_last_lr() if engine.lr_scheduler else "").encode())  # type: ignore[attr-defined]
    h.update(f"{engine.global_steps} {engine.skipped_steps}".encode())  # type: ignore[attr-defined]
    return h.hexdigest()[:16]


def scaler(engine: object) -> str:
    """The loss scaler's state ('' without one): scale, iteration, last overflow, hysteresis."""
    s = getattr(engine.optimizer, "loss_scaler", None)  # type: ignore[attr-defined]
    if s is None:
        return ""
    return " ".join(
        f"{k}={getattr(s, k)}"
        for k in ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
        if hasattr(s, k)
    )


def describe(engine: object) -> str:
    """What ran: dtype, optimizer class, partition sizes, scaler (the tests assert on it)."""
    p = next(engine.module.parameters())  # type: ignore[attr-defined]
    opt = engine.optimizer  # type: ignore[attr-defined]
    inner = type(getattr(opt, "optimizer", opt)).__name__
    return (
        f"dtype={str(p.dtype).split('.')[-1]} optimizer={type(opt).__name__}/{inner} "
        f"steps={engine.global_steps} skipped={engine.skipped_steps} scaler[{scaler(engine)}]"
    )  # type: ignore[attr-defined]


def _tensors(obj: object) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():  # shut the groups down while the interpreter is whole: left to
        torch.distributed.destroy_process_group()  # exit, a gloo group's threads can abort it (SIGABRT)

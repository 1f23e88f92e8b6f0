"""ckptd with a DeepSpeed engine (ZeRO-1/2/3) under torchrun, on CPU or GPU: one line.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node=2 examples/deepspeed_train.py --dir /tmp/ds --stage 3

``Checkpointer("ds-demo", dir, engine=engine, every_steps=5)`` saves DeepSpeed's own layout
(``global_stepN/``, ``latest``) atomically: every rank's files verified, the tag committed only
when every rank verified. ``--native K`` instead calls ``engine.save_checkpoint`` every K steps
(what DeepSpeed does alone; the tests use it to make foreign tags).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--every", type=int, default=4, help="ckptd: save every N steps")
    ap.add_argument("--native", type=int, default=0, help="no ckptd: engine.save_checkpoint every N steps")
    ap.add_argument("--width", type=int, default=16, help="hidden width (the benchmark makes it large)")
    ap.add_argument(
        "--pieces",
        action="store_true",
        help="pass model=engine.module, optimizer=engine.optimizer instead of engine= (the same)",
    )
    ap.add_argument("--step-sleep", type=float, default=0.0)
    ap.add_argument("--pause-rank", type=int, default=-1, help="tests: this rank stops after writing its files ...")
    ap.add_argument("--pause-at", type=int, default=0, help="... of the save at this step (to be killed there)")
    ap.add_argument("--corrupt-rank", type=int, default=-1, help="tests: this rank truncates its optimizer file ...")
    ap.add_argument("--corrupt-at", type=int, default=0, help="... of the save at this step (its verify then fails)")
    ap.add_argument("--grace", type=float, default=0.0, help="preempt_grace (0: ckptd's default)")
    ap.add_argument("--slow-preempt-save", type=float, default=0.0, help="tests: a preemption save takes this long")
    a = ap.parse_args()
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, a.width), torch.nn.ReLU(), torch.nn.Linear(a.width, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # a client optimizer: nothing to JIT-compile
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": a.stage},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=config)
    rank = engine.global_rank
    ckpt = None
    if not a.native:
        from trainer_hooks import Checkpointer

        if rank == a.pause_rank:
            _pause_in_save(engine, a.pause_at)
        if rank == a.corrupt_rank:
            _corrupt_in_save(engine, a.corrupt_at)
        if a.slow_preempt_save:
            _slow_preempt_save(engine, a.slow_preempt_save)
        parts = {"model": engine.module, "optimizer": engine.optimizer} if a.pieces else {"engine": engine}
        more = {"preempt_grace": a.grace} if a.grace else {}
        ckpt = Checkpointer("ds-demo", a.dir, **parts, every_steps=a.every, total_steps=a.steps, **more)
    start = ckpt.resume() if ckpt else 0
    print(f"rank {rank} pid {os.getpid()} starting at step {start}", flush=True)
    for step in range(start, a.steps):
        g = torch.Generator().manual_seed(step * 2 + rank)  # each rank its own micro-batch
        x = torch.randn(2, 8, generator=g) + torch.rand(1).item() * 1e-3  # the global RNG is part of the state
        loss = (engine(x) - 1).pow(2).mean()
        engine.backward(loss)
        engine.step()
        if ckpt:
            ckpt.step()
        elif (step + 1) % a.native == 0:
            engine.save_checkpoint(a.dir)
        if a.step_sleep:
            time.sleep(a.step_sleep)
    if ckpt:
        ckpt.close()
    sys.stdout.write(f"rank {rank} FINGERPRINT {fingerprint(engine)}\n")  # one write: ranks share the pipe
    sys.stdout.flush()


def _pause_in_save(engine: object, step: int) -> None:
    """Tests: after this rank's files of the save at ``step`` are written, before the ranks agree."""
    original = engine.save_checkpoint  # type: ignore[attr-defined]

    def save_then_pause(*args: object, **kwargs: object) -> object:
        result = original(*args, **kwargs)
        if kwargs.get("tag") == f"global_step{step}":
            print(f"rank {engine.global_rank} PAUSED in save of global_step{step}", flush=True)  # type: ignore[attr-defined]
            time.sleep(600)
        return result

    engine.save_checkpoint = save_then_pause  # type: ignore[attr-defined]


def _slow_preempt_save(engine: object, seconds: float) -> None:
    """Tests: a preemption save that takes longer than the grace period (a multi-GB state's)."""
    original = engine.save_checkpoint  # type: ignore[attr-defined]

    def slow(*args: object, **kwargs: object) -> object:
        if (kwargs.get("client_state") or {}).get("ckptd", {}).get("reason") == "preempt":  # type: ignore[attr-defined]
            time.sleep(seconds)
        return original(*args, **kwargs)

    engine.save_checkpoint = slow  # type: ignore[attr-defined]


def _corrupt_in_save(engine: object, step: int) -> None:
    """Tests: this rank's optimizer partition of the save at ``step`` is cut in half once written
    (a disk that lost the tail), so the rank's own verification fails and nothing is committed."""
    original = engine.save_checkpoint  # type: ignore[attr-defined]

    def save_then_truncate(*args: object, **kwargs: object) -> object:
        result = original(*args, **kwargs)
        if kwargs.get("tag") == f"global_step{step}":
            rank = engine.global_rank  # type: ignore[attr-defined]
            path = os.path.join(str(args[0]), f"global_step{step}", f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
            os.truncate(path, os.path.getsize(path) // 2)
        return result

    engine.save_checkpoint = save_then_truncate  # type: ignore[attr-defined]


def fingerprint(engine: object) -> str:
    """Weights (gathered under ZeRO-3) and this rank's optimizer state, hashed."""
    import deepspeed

    h = hashlib.sha256()
    params = list(engine.module.parameters())  # type: ignore[attr-defined]
    with deepspeed.zero.GatheredParameters(params):
        for p in params:
            h.update(p.detach().float().numpy().tobytes())
    state = engine.optimizer.state_dict()  # type: ignore[attr-defined]
    for t in _tensors(state):
        h.update(t.detach().float().numpy().tobytes())
    h.update(str(engine.lr_scheduler.get_last_lr() if engine.lr_scheduler else "").encode())  # type: ignore[attr-defined]
    return h.hexdigest()[:16]


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

"""A toy training run with the ckptd hook: the README's example, runnable in seconds.

Deterministic on purpose (seeded, data drawn from the RNGs ckptd saves), so that an
interrupted-and-resumed run can be compared bit for bit with a straight one:

    python examples/train_toy.py --dir /tmp/toy --steps 60 --every-steps 10
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import time

import numpy as np
import torch

from trainer_hooks import Checkpointer


def build(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.9)
    return model, opt, sched


def train_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler
) -> float:
    x = torch.randn(32, 16) + float(np.random.normal()) * 0.01  # draws from torch and numpy RNGs
    y = x[:, :4] * random.choice([1.0, -1.0])  # and from python's
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def fingerprint(model: torch.nn.Module, opt: torch.optim.Optimizer) -> str:
    """sha256 over every parameter and optimizer state tensor, for bit-exact comparisons."""
    h = hashlib.sha256()
    for t in list(model.state_dict().values()) + [v for s in opt.state_dict()["state"].values() for v in s.values()]:
        h.update(
            t.detach().contiguous().view(torch.uint8).numpy().tobytes()
            if t.dim()
            else t.reshape(1).view(torch.uint8).numpy().tobytes()
        )
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--job", default="toy")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every-steps", type=int, default=10)
    ap.add_argument("--step-sleep", type=float, default=0.0, help="seconds per step, to make a run slow enough to kill")
    ap.add_argument("--out", default=None, help="write the final fingerprint here as JSON")
    ap.add_argument("--keep-last", type=int, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model, opt, sched = build()
    ckpt = Checkpointer(
        args.job,
        args.dir,
        model=model,
        optimizer=opt,
        scheduler=sched,
        every_steps=args.every_steps,
        total_steps=args.steps,
        keep_last=args.keep_last,
    )
    start = ckpt.resume()
    print(f"starting at step {start}", flush=True)
    for _ in range(start, args.steps):
        loss = train_step(model, opt, sched)
        ckpt.step(metrics={"loss": loss})
        if args.step_sleep:
            time.sleep(args.step_sleep)
    ckpt.close()
    result = {"steps": args.steps, "fingerprint": fingerprint(model, opt), "stats": ckpt.stats}
    print(json.dumps(result), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()

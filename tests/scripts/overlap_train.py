"""A trainer whose weights say which step they are: with SGD(lr=1) and a gradient of -1, every
element of ``w`` equals the step count after each optimizer step. A checkpoint of step N that
holds any other value mixes two steps. Saves every step with ``snapshot="overlap"``, and the next
optimizer step follows ``step()`` at once (no forward between): the copy races the optimizer.

    python overlap_train.py DIR STEPS [--socket PATH] [--mib N]
    torchrun --nproc_per_node=2 overlap_train.py DIR STEPS --sharded   (each rank its own shard)
"""

from __future__ import annotations

import argparse
import sys
import threading

import torch
import torch.distributed as dist

from trainer_hooks import Checkpointer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("steps", type=int)
    ap.add_argument("--socket", default=None)
    ap.add_argument("--mib", type=int, default=16)
    ap.add_argument("--sharded", action="store_true")
    args = ap.parse_args()
    if args.sharded:
        dist.init_process_group("gloo")
    w = torch.nn.Parameter(torch.zeros(args.mib << 18))
    opt = torch.optim.SGD([w], lr=1.0, momentum=0.5)  # momentum: optimizer state the copy must not mix either
    model = torch.nn.ParameterList([w])
    ckpt = Checkpointer(
        "ov",
        args.dir,
        model=model,
        optimizer=opt,
        every_steps=1,
        keep_last=3,
        snapshot="overlap",
        socket=args.socket or False,
        quiet=True,
        sharded=args.sharded,
    )
    start = ckpt.resume()
    for _ in range(start, args.steps):
        w.grad = torch.full_like(w, -1.0)
        opt.step()
        ckpt.step()
    copied_aside = any(t.name == "ckptd-overlap" for t in threading.enumerate())  # its copy thread ran
    ckpt.close()
    sys.stdout.write(f"DONE {ckpt.step_count} {float(w[0])} overlap={copied_aside}\n")  # one write: ranks share a pipe
    sys.stdout.flush()
    if args.sharded:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

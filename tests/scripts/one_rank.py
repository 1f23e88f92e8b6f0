"""A sharded job of one rank (a real gloo group of one), for the guard tests:

    python one_rank.py PORT DIR JOB STEPS EVERY

Trains nothing: saves a small model sharded at every EVERY-th of STEPS steps and prints one
JSON line with the Checkpointer's stats and its last error's reason.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from trainer_hooks import Checkpointer

port, directory, job, steps, every = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
try:
    ckpt = Checkpointer(
        job,
        directory,
        model=torch.nn.Linear(8, 8),
        sharded=True,
        socket=False,
        every_steps=every,
        save_final=False,
        quiet=True,
    )
    for _ in range(steps):
        ckpt.step()
    ckpt.wait()
    ckpt.close(final=False)
    error = ckpt.last_error
    print(json.dumps({**ckpt.stats, "reason": error.reason if error else "", "error": str(error or "")}))
finally:
    dist.destroy_process_group()

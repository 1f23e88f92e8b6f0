"""Resume only, under torchrun, each rank from a directory of its own (node-local disks):

    torchrun --nproc_per_node=2 split_resume.py 'DIR/r{rank}'

The model is ``examples/sharded_train.py``'s (each rank its slice of one linear layer). Prints
``rank R resumed at step S``, or ``rank R ResumeError: ...`` and exits 3.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from trainer_hooks import Checkpointer, ResumeError

IN, OUT = 16, 8


def say(line: str) -> None:
    """One write per line: the ranks share torchrun's pipe, and a line printed in two writes (text,
    then its newline, as ``print`` does unbuffered) can be split by the other rank's."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
layer = torch.nn.Linear(IN, OUT // world)
ckpt = Checkpointer(
    "sharded-demo",
    sys.argv[1].format(rank=rank),
    model=layer,
    optimizer=torch.optim.AdamW(layer.parameters(), lr=0.01),
    sharded=True,
    socket=False,
    save_final=False,
)
code = 0
try:
    say(f"rank {rank} resumed at step {ckpt.resume()}")
except ResumeError as exc:
    say(f"rank {rank} ResumeError: {exc}")
    code = 3
finally:
    ckpt.close()
    dist.destroy_process_group()
sys.exit(code)

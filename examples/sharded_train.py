"""ckptd with sharded state under torchrun (gloo, CPU): every rank saves its own shard.

A tensor-parallel toy: the output rows of one linear layer are split across the
ranks, each rank owns its slice of the weight and its own optimizer state, so no
rank holds the whole model (as with FSDP). ``sharded=True`` makes each rank write
its part; the checkpoint commits only when every rank's part is verified.

    torchrun --nproc_per_node=4 examples/sharded_train.py --dir /tmp/sharded --steps 40
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import time
import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

warnings.filterwarnings("ignore", message=".*all_gather is deprecated")  # its replacement is private API

from trainer_hooks import Checkpointer

IN, OUT = 16, 8


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--step-sleep", type=float, default=0.0)
    ap.add_argument("--kill-rank", type=int, default=-1, help="this rank SIGKILLs itself while saving --kill-step")
    ap.add_argument("--kill-step", type=int, default=-1)
    a = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)  # every rank its own slice
    layer = torch.nn.Linear(IN, OUT // world)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.01)
    box: dict[str, Checkpointer] = {}
    ckpt = Checkpointer("sharded-demo", a.dir, model=layer, optimizer=opt, sharded=True, every_steps=a.every,
                        total_steps=a.steps, before_save=lambda: die_if(a, rank, box))
    box["ckpt"] = ckpt
    start = ckpt.resume()
    print(f"rank {rank} starting at step {start}", flush=True)
    for step in range(start, a.steps):
        x = torch.randn(8, IN, generator=torch.Generator().manual_seed(step))  # the same batch on every rank
        y = torch.cat(dist_fn.all_gather(layer(x)), dim=1)  # the full output, gradients flow back to each slice
        loss = (y - 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ckpt.step()
        if a.step_sleep:
            time.sleep(a.step_sleep)
    ckpt.close()
    h = hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in layer.state_dict().values()))
    print(f"rank {rank} FINGERPRINT {h.hexdigest()} saves {ckpt.stats['verified']}", flush=True)
    dist.destroy_process_group()


def die_if(a: argparse.Namespace, rank: int, box: dict[str, Checkpointer]) -> None:
    """Test hook: this rank dies in the middle of a sharded save (the others are writing theirs)."""
    if rank == a.kill_rank and "ckpt" in box and box["ckpt"].step_count == a.kill_step:
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main()

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
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

warnings.filterwarnings("ignore", message=".*all_gather is deprecated")  # its replacement is private API

from trainer_hooks import Checkpointer  # noqa: E402

IN, OUT = 16, 8


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--step-sleep", type=float, default=0.0)
    ap.add_argument("--ballast-rank", type=int, default=-1, help="tests: this rank saves --ballast-mib more")
    ap.add_argument("--ballast-mib", type=int, default=0, help="(so that its shard takes a while to write)")
    a = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)  # every rank its own slice
    layer = torch.nn.Linear(IN, OUT // world)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.01)
    extra = {"ballast": torch.ones(a.ballast_mib << 18)} if rank == a.ballast_rank else {}
    ckpt = Checkpointer(
        "sharded-demo",
        a.dir,
        model=layer,
        optimizer=opt,
        extra=extra,
        sharded=True,
        every_steps=a.every,
        total_steps=a.steps,
    )
    start = ckpt.resume()
    print(f"rank {rank} pid {os.getpid()} starting at step {start}", flush=True)
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
    # one write: the ranks share one pipe
    sys.stdout.write(f"rank {rank} FINGERPRINT {h.hexdigest()} saves {ckpt.stats['verified']}\n")
    sys.stdout.flush()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""ckptd under torchrun DDP (gloo, CPU): rank 0 saves, every rank resumes from the same checkpoint.

torchrun --nproc_per_node=2 examples/ddp_train.py --dir /tmp/ddp --steps 30
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time

import torch
import torch.distributed as dist

from trainer_hooks import Checkpointer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--step-sleep", type=float, default=0.0)
    a = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    ckpt = Checkpointer("ddp-demo", a.dir, model=model.module, optimizer=opt, every_steps=5, total_steps=a.steps)
    start = ckpt.resume()
    print(f"rank {rank} starting at step {start}", flush=True)
    for step in range(start, a.steps):
        g = torch.Generator().manual_seed(step * 10 + rank)  # each rank its own shard of data
        x = torch.randn(8, 16, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ckpt.step()
        if a.step_sleep:
            time.sleep(a.step_sleep)
    ckpt.close()
    h = hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in model.module.state_dict().values()))
    # one write: the ranks share one pipe
    sys.stdout.write(f"rank {rank} FINGERPRINT {h.hexdigest()} saves {ckpt.stats['verified']}\n")
    sys.stdout.flush()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

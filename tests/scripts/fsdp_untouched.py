"""Under torchrun: an FSDP2 model and a fresh AdamW, a sharded Checkpointer constructed and closed
without saving; prints how many parameters have optimizer state (0: the Checkpointer did not step it)."""

import sys

import torch.distributed as dist

from examples.fsdp_train import build, leave
from trainer_hooks import Checkpointer


def main() -> None:
    dist.init_process_group("gloo")
    model, opt = build(dist.get_world_size())
    ckpt = Checkpointer("untouched", sys.argv[1], model=model, optimizer=opt, sharded=True, save_final=False)
    ckpt.close(final=False)
    print(f"rank {dist.get_rank()} OPTIMIZER STATE {len(opt.state)}", flush=True)
    leave()


if __name__ == "__main__":
    main()

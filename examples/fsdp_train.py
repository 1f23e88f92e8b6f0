"""ckptd with FSDP2 (``fully_shard``) under torchrun (gloo, CPU): one Checkpointer line.

Every parameter and its AdamW state is a DTensor sharded across the ranks; a buffer is
replicated. ``sharded=True`` hands the state to torch.distributed.checkpoint's planner:
each rank writes its chunks (the replicated buffer once), the unit commits when every
rank's shard verified, and it resumes on any number of ranks.

    torchrun --nproc_per_node=4 examples/fsdp_train.py --dir /tmp/fsdp --steps 40
    torchrun --nproc_per_node=2 examples/fsdp_train.py --dir /tmp/fsdp --steps 60   # resumes at 40, resharded

Each rank prints ``FINGERPRINT`` (sha256 of the gathered model and optimizer state, the
same on every rank) at the end, and ``RESUMED`` with the fingerprint right after resume.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from trainer_hooks import Checkpointer

DIM, HIDDEN = 32, 64


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(DIM, HIDDEN)
        self.out = torch.nn.Linear(HIDDEN, DIM)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, DIM))  # replicated: saved once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.inp(x))) * self.scale


def build(world: int, hsdp: bool = False) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """FSDP2 over all ranks; or HSDP (``hsdp``): two replicas, each sharded over half the ranks."""
    torch.manual_seed(0)  # the same initial model whatever the number of ranks
    model = Net()
    mesh = (
        init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        if hsdp
        else init_device_mesh("cpu", (world,))
    )
    fully_shard(model.inp, mesh=mesh)
    fully_shard(model.out, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def fingerprint(model: torch.nn.Module, opt: torch.optim.Optimizer | None) -> str:
    """Of the whole state (the model's alone without ``opt``), gathered: a collective, every rank calls it."""
    full = StateDictOptions(full_state_dict=True)
    state = {"model": get_model_state_dict(model, options=full)}
    if opt is not None:
        state["optim"] = get_optimizer_state_dict(model, opt, options=full)["state"]
    return digest(state)


def digest(state: object) -> str:
    """sha256 over every tensor's name and bytes, in name order (scripts that load a unit compare with it)."""
    h = hashlib.sha256()

    def feed(prefix: str, v: object) -> None:
        if isinstance(v, dict):
            for k in sorted(v, key=str):
                feed(f"{prefix}.{k}", v[k])
        elif isinstance(v, torch.Tensor):
            h.update(prefix.encode())
            h.update(v.detach().reshape(-1).view(torch.uint8).numpy().tobytes())

    feed("", state)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--step-sleep", type=float, default=0.0)
    ap.add_argument("--hsdp", action="store_true", help="a 2-D mesh: 2 replicas x world/2 shards")
    ap.add_argument("--ballast-rank", type=int, default=-1, help="tests: this rank saves --ballast-mib more")
    ap.add_argument("--ballast-mib", type=int, default=0, help="(so that its shard takes a while to write)")
    a = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, opt = build(world, a.hsdp)
    extra = {"ballast": torch.ones(a.ballast_mib << 18)} if rank == a.ballast_rank else {}
    ckpt = Checkpointer(
        "fsdp-demo",
        a.dir,
        model=model,
        optimizer=opt,
        extra=extra,
        sharded=True,
        every_steps=a.every,
        total_steps=a.steps,
    )
    start = ckpt.resume()
    print(f"rank {rank} pid {os.getpid()} starting at step {start}", flush=True)
    if start:
        print(f"rank {rank} RESUMED {fingerprint(model, opt)}", flush=True)
    for step in range(start, a.steps):
        x = torch.randn(8, DIM, generator=torch.Generator().manual_seed(step * 1000 + rank))
        loss = (model(x) - 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ckpt.step()
        if a.step_sleep:
            time.sleep(a.step_sleep)
    ckpt.close()
    print(
        f"rank {rank} FINGERPRINT {fingerprint(model, opt)} saves {ckpt.stats['verified']} "
        f"MODEL {fingerprint(model, None)}",
        flush=True,
    )
    leave()


def leave() -> None:
    """Exit without interpreter finalisation: with FSDP2 on gloo, tearing the process groups down
    at exit aborted a rank now and then (SIGABRT, "terminate called without an active exception",
    after all work was done; cf. pytorch/pytorch#179291). Call it once everything is saved."""
    dist.barrier()  # every rank is done with every collective
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

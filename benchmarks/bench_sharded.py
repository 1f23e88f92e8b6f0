"""Benchmark 6: sharded saves (``sharded=True``) under torchrun, against DCP's ``async_save``.

Each of N ranks (gloo, CPU) holds its own model + AdamW state of ``--mib`` MiB. Per save,
on every rank, interleaved so that noise hits all alike:

- **stall**: how long training is blocked (ckptd: ``save()`` returns once the state is
  copied into shared memory; DCP: ``async_save`` returns once its staging is done),
  against a memcpy of the same tensors (the floor);
- **commit**: until the checkpoint is durable and committed on every rank (ckptd:
  shards written, fsynced, re-read and verified, manifest written; DCP: ``.result()``,
  which writes but does not re-read);
- **step overhead**: ``step()`` with no save due. Sharded mode adds one asynchronous
  ``all_reduce`` of three ints a step (the trigger exchange); the toy training step is a
  matmul plus a small ``all_reduce`` (gradient sync) so that the ranks run in lockstep;
  the same loop with an unsharded hook shows the noise floor.

With ``--fsdp`` the state is an FSDP2 model (``fully_shard``, DTensor parameters and AdamW
state, ``--mib`` MiB per rank): ckptd's stall then includes torch.distributed.checkpoint's
planning collectives (``trainer_hooks._ranks.dcpio``), and DCP saves the same FSDP2 state dict.

    python benchmarks/bench_sharded.py [--ranks 2] [--mib 64] [--reps 5] [--quick] [--fsdp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import free_port, project_env, table, write_result  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from benchmarks.bench_stall import all_tensors, floor, make_state
    from trainer_hooks import Checkpointer

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    model, opt = fsdp_state(args.mib, dist.get_world_size()) if args.fsdp else make_state(args.mib)
    work = Path(args.dir)
    ckpt = Checkpointer(
        "bench-sharded",
        work / "ckptd",
        model=model,
        optimizer=opt,
        sharded=True,
        keep_last=1,
        every_steps=10**9,
        save_final=False,
        socket=False,
        preempt_signals=(),
    )
    # the same loop with an unsharded hook (rank 0 saves; a few attribute reads a step): the noise floor
    plain = Checkpointer(
        "bench-plain",
        work / "plain",
        model=torch.nn.Linear(4, 4),
        every_steps=10**9,
        save_final=False,
        socket=False,
        preempt_signals=(),
    )
    out: dict[str, list[float]] = {
        "memcpy floor": [],
        "ckptd stall": [],
        "dcp stall": [],
        "ckptd commit": [],
        "dcp commit": [],
        "loop": [],
        "loop + step()": [],
        "loop + unsharded step()": [],
    }
    tensors = [getattr(t, "to_local", lambda t=t: t)() for t in all_tensors(model, opt)]  # this rank's part
    for i in range(args.reps + 1):  # the first round pays for page faults and DCP's set-up
        sample = {"memcpy floor": floor(tensors, 1).samples[0]}
        dist.barrier()
        t0 = time.perf_counter()
        ckpt.save(wait=False)
        sample["ckptd stall"] = time.perf_counter() - t0
        ckpt.wait()
        sample["ckptd commit"] = time.perf_counter() - t0
        sd = dcp_state(model, opt, rank, args.fsdp)
        dist.barrier()
        t0 = time.perf_counter()
        fut = dcp.async_save(sd, checkpoint_id=str(work / f"dcp{i}"))
        sample["dcp stall"] = time.perf_counter() - t0
        fut.result()
        sample["dcp commit"] = time.perf_counter() - t0
        dist.barrier()
        if rank == 0:
            shutil.rmtree(work / f"dcp{i}", ignore_errors=True)
        if i:
            for k, v in sample.items():
                out[k].append(v)
    x, w = torch.randn(args.width, args.width), torch.eye(args.width) * 0.999
    grad = torch.zeros(1024)
    for _ in range(args.reps):
        for key, hook in (("loop", None), ("loop + step()", ckpt), ("loop + unsharded step()", plain)):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                torch.mm(x, w, out=x)
                dist.all_reduce(grad)  # training's own collective: the ranks run in lockstep, as they do
                if hook is not None:
                    hook.step()
            out[key].append((time.perf_counter() - t0) / args.steps)
    assert ckpt.stats["failed"] == 0, ckpt.last_error
    ckpt.close(final=False)
    plain.close(final=False)
    gathered: list[dict[str, list[float]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, out)
    if rank == 0:
        Path(args.dir, "result.json").write_text(json.dumps(gathered))
    dist.destroy_process_group()


def fsdp_state(mib: int, world: int) -> tuple[Any, Any]:
    """``mib`` MiB of params + AdamW moments per rank, as FSDP2 shards them."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    width = 1024
    layers = max(1, mib * world * (1 << 20) // 3 // 4 // (width * width))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    return model, opt


def dcp_state(model: Any, opt: Any, rank: int, fsdp: bool) -> dict[str, Any]:
    """What DCP saves: the FSDP2 state dict as torch documents it, or each rank's own state
    under its own key (plain tensors would otherwise be taken as replicated and saved once)."""
    if not fsdp:
        return {f"rank{rank}": {"model": model.state_dict(), "optimizer": opt.state_dict()}}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--mib", type=int, default=64, help="state per rank")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--width", type=int, default=512, help="the toy training step: a width x width matmul")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--fsdp", action="store_true", help="an FSDP2 model (DTensor state) instead of per-rank tensors")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--dir", default="")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.mib, args.reps, args.steps, args.width = 16, 3, 200, 64  # the code path, not a measurement
    work = Path(os.environ.get("CKPTD_BENCH_DIR", "/var/tmp")) / f"ckptd-bench-sharded-{os.getpid()}"
    try:
        cmd = [
            str(Path(sys.executable).parent / "torchrun"),
            f"--nproc_per_node={args.ranks}",
            f"--master_port={free_port()}",
            __file__,
            "--worker",
            "--dir",
            str(work),
            "--mib",
            str(args.mib),
            "--reps",
            str(args.reps),
            "--steps",
            str(args.steps),
            "--width",
            str(args.width),
            *(["--fsdp"] if args.fsdp else []),
        ]
        env = project_env(OMP_NUM_THREADS="1")
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        per_rank = json.loads((work / "result.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args, per_rank)


def report(args: argparse.Namespace, per_rank: list[dict[str, list[float]]]) -> None:
    """A save is as slow as its slowest rank: per round, the max over ranks; then the median."""
    rounds = len(per_rank[0]["ckptd stall"])
    med = {
        k: statistics.median(max(r[k][i] for r in per_rank) for i in range(len(per_rank[0][k]))) for k in per_rank[0]
    }
    floor = med["memcpy floor"]
    rows = [
        [k, f"{med[k] * 1e3:.1f} ms", f"{med[k] / floor:.2f}x"]
        for k in ("memcpy floor", "ckptd stall", "dcp stall", "ckptd commit", "dcp commit")
    ]
    overhead = med["loop + step()"] / med["loop"] - 1
    for key in ("loop + step()", "loop + unsharded step()"):
        rows.append(
            [
                f"{key[7:]} overhead, no save due",
                f"{(med[key] - med['loop']) * 1e6:.1f} us",
                f"{(med[key] / med['loop'] - 1) * 100:+.2f}% of a {med['loop'] * 1e6:.0f} us step",
            ]
        )
    kind = "FSDP2 " if args.fsdp else ""
    print(
        table(
            f"{kind}sharded saves: {args.ranks} ranks x {args.mib} MiB (medians of {rounds}, slowest rank per round)",
            ["measure", "median", "ratio to the memcpy floor"],
            rows,
        )
    )
    write_result(
        f"sharded_{'fsdp_' if args.fsdp else ''}{args.ranks}ranks" + ("_quick" if args.quick else ""),
        {
            "ranks": args.ranks,
            "fsdp": args.fsdp,
            "mib_per_rank": args.mib,
            "rounds": rounds,
            "medians_seconds": med,
            "ratio_to_floor": {k: med[k] / floor for k in med if "loop" not in k},
            "step_overhead_fraction": overhead,
            "unsharded_step_overhead_fraction": med["loop + unsharded step()"] / med["loop"] - 1,
            "per_rank": per_rank,
        },
    )


if __name__ == "__main__":
    main()

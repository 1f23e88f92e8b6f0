"""Benchmark: a DeepSpeed engine's save through ckptd against ``engine.save_checkpoint`` alone.

Two ranks under torchrun (gloo, CPU accelerator), ZeRO-2 and ZeRO-3, a stack of linear
layers of about ``--mib`` MiB of fp32 weights with AdamW (a client optimizer: nothing JIT-built),
the same engine state saved both ways, interleaved, ``--reps`` times each:

- **stall**: how long training is blocked on every rank (the slowest rank). Baseline:
  ``engine.save_checkpoint(dir)``, which writes and returns (no fsync, no verification, no commit).
  ckptd: ``Checkpointer(engine=...).save()``: DeepSpeed's write into a staging directory, fsync,
  read-back verification of every rank's files, agreement, atomic rename and ``latest``.
- **to verified**: until the checkpoint is known good. Baseline: its write plus a
  verification of the tag afterwards (``ckptd verify``'s reader on rank 0: CRCs and a load of
  every rank's file); ckptd: the same as its stall (a committed tag is verified).

Ratios are against the baseline measured in the same run. Results: ``results/deepspeed.json``.

    python benchmarks/bench_deepspeed.py [--mib 32] [--reps 5] [--quick]
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
    """One rank: build the engine, then time both kinds of save."""
    import deepspeed
    import torch

    torch.manual_seed(0)
    width = 1024
    layers = max(1, (args.mib << 20) // (4 * width * width))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": args.stage},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    loss = engine(torch.randn(1, width)).pow(2).mean()
    engine.backward(loss)
    engine.step()
    from ckptd.foreign import deepspeed as dsfmt
    from trainer_hooks import Checkpointer

    rank = engine.global_rank
    ckpt = Checkpointer("bench-ds", os.path.join(args.dir, "ckptd"), engine=engine, quiet=True)
    ckpt.current = 1
    samples: dict[str, list[float]] = {"baseline_stall": [], "baseline_verified": [], "ckptd_stall": []}
    for rep in range(args.reps):
        for kind in ("baseline", "ckptd") if rep % 2 == 0 else ("ckptd", "baseline"):
            torch.distributed.barrier()
            t0 = time.perf_counter()
            if kind == "baseline":
                base = os.path.join(args.dir, "native")
                engine.save_checkpoint(base, tag=f"rep{rep}")
                stall = _slowest(time.perf_counter() - t0)
                ok = dsfmt.verify(os.path.join(base, f"rep{rep}")).ok if rank == 0 else True
                torch.distributed.barrier()
                samples["baseline_verified"].append(_slowest(time.perf_counter() - t0))
                samples["baseline_stall"].append(stall)
                assert ok
                if rank == 0:
                    shutil.rmtree(os.path.join(base, f"rep{rep}"))
            else:
                ckpt.current = rep + 1
                assert ckpt.save()
                samples["ckptd_stall"].append(_slowest(time.perf_counter() - t0))
                if rank == 0:
                    shutil.rmtree(os.path.join(args.dir, "ckptd", f"global_step{rep + 1}"))
    if rank == 0:
        print("RESULT " + json.dumps({"samples": samples, "layers": layers}), flush=True)


def _slowest(seconds: float) -> float:
    import torch

    t = torch.tensor([seconds], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=32, help="fp32 weights in MiB (AdamW adds twice that)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="8 MiB, 3 reps (the test's size)")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--dir", default="")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.mib, args.reps = 8, 3
    import tempfile

    out: dict[str, Any] = {"ranks": 2, "mib": args.mib, "reps": args.reps, "stages": {}}
    rows = []
    for stage in (2, 3):
        d = tempfile.mkdtemp(prefix=f"bench-ds{stage}-")
        try:
            cmd = [
                str(Path(sys.executable).parent / "torchrun"),
                "--nproc_per_node=2",
                f"--master_port={free_port()}",
                __file__,
                "--worker",
                "--stage",
                str(stage),
                "--mib",
                str(args.mib),
                "--reps",
                str(args.reps),
                "--dir",
                d,
            ]
            r = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=3600,
                env=project_env(DS_ACCELERATOR="cpu", CKPTD_SOCKET="/nonexistent/ckptd.sock"),
            )
            line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
            if r.returncode != 0 or line is None:
                raise SystemExit(f"ZeRO-{stage} worker failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
            res = json.loads(line[len("RESULT ") :])
        finally:
            shutil.rmtree(d, ignore_errors=True)
        med = {k: statistics.median(v) for k, v in res["samples"].items()}
        out["stages"][f"zero{stage}"] = {
            "samples": res["samples"],
            "median": med,
            "stall_ratio": med["ckptd_stall"] / med["baseline_stall"],
            "to_verified_ratio": med["ckptd_stall"] / med["baseline_verified"],
        }
        rows.append(
            [
                f"ZeRO-{stage}",
                f"{med['baseline_stall'] * 1e3:.0f}",
                f"{med['ckptd_stall'] * 1e3:.0f}",
                f"{med['ckptd_stall'] / med['baseline_stall']:.2f}x",
                f"{med['baseline_verified'] * 1e3:.0f}",
                f"{med['ckptd_stall'] / med['baseline_verified']:.2f}x",
            ]
        )
    print(
        table(
            f"DeepSpeed saves, 2 ranks, {args.mib} MiB fp32 weights + AdamW, median of {args.reps} (ms)",
            ["stage", "save_checkpoint stall", "ckptd stall", "ratio", "save + verify", "ckptd ratio"],
            rows,
        )
    )
    path = write_result("deepspeed_quick" if args.quick else "deepspeed", out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

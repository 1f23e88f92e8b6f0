"""Benchmark 4: what ``ckpt.step()`` costs when no save is due, and the idle daemon's RSS.

A tiny training-like loop (~100 µs a step) with and without ``ckpt.step()``,
interleaved in rounds so machine noise hits both alike.

    python benchmarks/bench_overhead.py [--steps 20000] [--rounds 7] [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import Daemon, MiB, scratch, table, write_result  # noqa: E402


def loop(n: int, x: torch.Tensor, w: torch.Tensor, ckpt=None) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    for _ in range(n):
        torch.mm(x, w, out=x)
        if ckpt is not None:
            ckpt.step()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    steps, rounds = (2000, 3) if args.quick else (args.steps, args.rounds)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # x shrinks by 0.999 a step: denormals would dominate the timing
    x, w = torch.randn(128, 256), torch.eye(256) * 0.999  # ~100 µs a step on these cores
    from trainer_hooks import Checkpointer

    work = scratch()
    daemon = Daemon(scratch())
    try:
        time.sleep(1.0)
        idle_rss = daemon.rss()
        results = {}
        for mode, sock in (("daemon", daemon.socket), ("embedded", False)):
            ckpt = Checkpointer(
                f"ovh-{mode}",
                daemon.root / mode if sock else work,
                model=torch.nn.Linear(4, 4),
                every_steps=10**9,
                save_final=False,
                socket=sock,
                preempt_signals=(),
            )
            base, hooked = [], []
            loop(steps // 4, x, w)
            for _ in range(rounds):
                base.append(loop(steps, x, w))
                hooked.append(loop(steps, x, w, ckpt))
            ckpt.close(final=False)
            results[mode] = {
                "step_us_without": statistics.median(base) * 1e6,
                "step_us_with": statistics.median(hooked) * 1e6,
                "overhead_ratio": statistics.median(hooked) / statistics.median(base),
            }
    finally:
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(daemon.base, ignore_errors=True)
    rows = [
        [m, f"{r['step_us_without']:.1f}", f"{r['step_us_with']:.1f}", f"{(r['overhead_ratio'] - 1) * 100:+.2f}%"]
        for m, r in results.items()
    ]
    print(
        table(
            f"Hook overhead, no save due (µs per step; medians of {rounds} rounds of {steps} steps)",
            ["mode", "without", "with ckpt.step()", "overhead"],
            rows,
        )
    )
    print(f"idle daemon RSS: {idle_rss / MiB:.0f} MiB (target <= 80 MiB)")
    write_result(
        "overhead_quick" if args.quick else "overhead",
        {"steps": steps, "rounds": rounds, "results": results, "idle_daemon_rss_bytes": idle_rss},
    )


if __name__ == "__main__":
    main()

"""every="auto" over two tiers against the disk alone: simulated training with two kinds of failure (issue 28).

A run must finish ``--work`` hours of useful training. Failures arrive as a Poisson process
(mean ``MTBF``); each is, with probability ``--share``, one the daemon survives (the trainer
crashed: resume from the daemon's memory) and otherwise one that takes the host (resume from
disk, and the memory tier is gone). Every save stalls training ``--stall`` seconds; a disk
save is durable ``--persist`` seconds after it started, a memory save is kept ``--keep``
seconds after. A disk save due while the previous one is still being written waits for it
(``on_busy="wait"``, the wait counts as stall); memory saves have their own buffer, and one
due while the last is being kept is skipped. A failure loses the work since the newest save
it can resume from, plus ``--restart`` seconds. Both strategies see the same failure draws.

Strategies: "disk alone": ``ckptd.core.autointerval`` (every="auto" without a memory tier);
"two tiers": ``ckptd.core.multilevel`` (what the daemon plans with one), both told the true
MTBF and share. Reported: waste (stalls, lost work, restarts) as a share of the work, and the
ratio two tiers / disk alone (below 1: the memory tier pays). Cases: a quick disk (the plan
should say no memory saves: ratio 1), and overlapped snapshots (a stall of 20 ms) of states
whose disk copy takes 2 and 10 minutes to write and verify.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import table, write_result  # noqa: E402
from ckptd.core.autointerval import CostSamples, Mtbf, auto_interval  # noqa: E402
from ckptd.core.multilevel import Coverage, multilevel  # noqa: E402

HOUR = 3600.0
CASES = {  # name: (stall, persist, keep) seconds
    "1 s stall, 20 s disk": (1.0, 20.0, 1.0),
    "overlap, 2 min disk": (0.02, 120.0, 2.0),
    "overlap, 10 min disk": (0.02, 600.0, 8.0),
}


def simulate(
    memory: float | None,
    disk: float,
    work: float,
    mtbf: float,
    share: float,
    stall: float,
    persist: float,
    keep: float,
    restart: float,
    seed: int,
) -> float:
    """Wall seconds to finish ``work`` seconds of training with memory saves every ``memory`` (None:
    none) and disk saves every ``disk``; time advances from one event to the next."""
    rng = random.Random(seed)
    t = done = 0.0
    durable = in_memory = 0.0  # work restorable from disk, from the daemon's memory
    disk_job: tuple[float, float] | None = None  # (work captured, when durable)
    mem_job: tuple[float, float] | None = None
    next_fail = t + rng.expovariate(1 / mtbf)
    next_disk, next_mem = disk, memory if memory else float("inf")
    while done < work:
        event = min(next_fail, next_disk, next_mem, t + (work - done))
        if disk_job and disk_job[1] <= event:
            durable, in_memory, disk_job = disk_job[0], max(in_memory, disk_job[0]), None
        if mem_job and mem_job[1] <= event:
            in_memory, mem_job = max(in_memory, mem_job[0]), None
        if event == next_fail:
            daemon_alive = rng.random() < share
            done = max(durable, in_memory) if daemon_alive else durable
            in_memory = in_memory if daemon_alive else durable
            disk_job = mem_job = None
            t = next_fail + restart
            next_fail = t + rng.expovariate(1 / mtbf)
            next_disk, next_mem = t + disk, t + memory if memory else float("inf")
            continue
        done, t = done + (event - t), event
        if event == next_disk:
            wait = max(0.0, disk_job[1] - t) if disk_job else 0.0
            if disk_job:
                durable, in_memory = disk_job[0], max(in_memory, disk_job[0])
            t += wait + stall
            disk_job, next_disk = (done, t + persist), t + disk
        elif event == next_mem:
            if mem_job is None:
                t += stall
                mem_job = (done, t + keep)
            next_mem = t + (memory or 0.0)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=float, default=200.0, help="hours of useful training per run")
    ap.add_argument("--mtbf", default="2,12", help="MTBFs to try, hours")
    ap.add_argument("--share", type=float, default=0.75, help="share of failures the daemon survives")
    ap.add_argument("--restart", type=float, default=120.0, help="seconds to come back after a failure")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="a small run for the smoke test")
    a = ap.parse_args()
    if a.quick:
        a.work, a.seeds, a.mtbf = 20.0, 2, "2"
    rows, results = [], []
    for m_hours in (float(x) for x in a.mtbf.split(",")):
        mtbf = m_hours * HOUR
        for name, (stall, persist, keep) in CASES.items():
            costs = CostSamples((stall,), (persist,))
            single = auto_interval(costs, Mtbf(mtbf, "mtbf"), 0.02)
            plan = multilevel(
                costs,
                CostSamples((stall,), (keep,)),
                Mtbf(mtbf, "mtbf"),
                Coverage(a.share, "given"),
                0.02,
                resolution=1.0,
            )
            args = (a.work * HOUR, mtbf, a.share, stall, persist, keep, a.restart)
            alone = [simulate(None, single.seconds, *args, seed=s) / (a.work * HOUR) - 1 for s in range(a.seeds)]
            tiers = [
                simulate(plan.memory, plan.disk.seconds, *args, seed=s) / (a.work * HOUR) - 1 for s in range(a.seeds)
            ]
            w1, w2 = statistics.mean(alone), statistics.mean(tiers)
            mem = f"{plan.memory:.0f}s" if plan.memory else "none"
            rows.append(
                [
                    f"{m_hours:g} h",
                    name,
                    f"{single.seconds:.0f}s",
                    f"{w1:.2%}",
                    mem,
                    f"{plan.disk.seconds:.0f}s",
                    f"{w2:.2%}",
                    f"{w2 / w1:.2f}x",
                ]
            )
            results.append(
                {
                    "mtbf_hours": m_hours,
                    "case": name,
                    "stall": stall,
                    "persist": persist,
                    "keep": keep,
                    "disk_alone": {"interval": single.seconds, "waste": w1},
                    "two_tiers": {"memory": plan.memory, "disk": plan.disk.seconds, "k": plan.k, "waste": w2},
                    "ratio": w2 / w1,
                    "model_waste": plan.waste,
                    "model_single_waste": plan.single_waste,
                }
            )
    print(
        table(
            f"every=auto, two tiers vs the disk alone ({a.work:g} h of work, {a.seeds} seeds, "
            f"share {a.share}, restart {a.restart:g}s)",
            ["MTBF", "case", "disk alone: every", "waste", "two tiers: memory", "disk", "waste", "two tiers / alone"],
            rows,
        )
    )
    path = write_result("multilevel_quick" if a.quick else "multilevel", {"args": vars(a), "rows": results})
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()

"""``every="auto"`` over two tiers: how often to refresh the daemon's memory, how often the disk.

A failure that leaves the daemon alive (the trainer crashed, was OOM-killed, hit a NCCL
timeout) resumes from the daemon's memory and loses the work since the newest save of
either kind; one that takes the host or the daemon with it resumes from disk and loses the
work since the newest disk save. With ``p`` the share of failures of the first kind and
memory saves every ``T`` seconds, every ``k``-th of them written to disk, the time lost per
second of training is, to first order (Young's model per level, as in the multilevel
checkpointing of SCR, Moody et al. SC'10, and Di et al., "Optimization of multi-level
checkpoint model", TPDS 2017)::

    waste(T, k) = (C_m (k - 1) + C_d) / (k T)  +  (p T + (1 - p) k T) / (2 M)

``C_m`` and ``C_d`` are what a memory and a disk save stall training (the same snapshot, so
close), ``M`` the mean time between failures. For each ``k`` the best ``T`` is
``sqrt(2 (C_m (k-1) + C_d) M / (k (p + (1-p) k)))``, raised to the bounds that keep saves
free of backpressure (a memory save is not due before the previous one was kept, a disk
save not before the previous one verified), to ``max_overhead`` and to ``min_interval``;
the plan is the ``k`` with the least waste. With equal stalls and no bound
in the way ``k = 1`` wins (every save may as well be a disk save): the memory tier pays off
when writing and verifying the disk copy takes longer than the interval the failures call
for, which is the case for overlapped snapshots (a stall of milliseconds) of large states.
That is what DLRover's flash checkpoint exploits (saves every 10 steps to memory, every 250
to disk).

``p`` starts from 0.75, the share of failures DLRover reports recovering from host memory,
worth one failure, and moves with the job's own history: its trainer's unclean exits
while the daemon lived count for memory, runs the daemon lost for disk (a Beta prior, as
``ckptd.core.autointerval.estimate_mtbf`` uses a Gamma one). Pure: samples in, a plan out.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from ckptd.core.autointerval import AutoInterval, CostSamples, Mtbf, auto_interval, short_duration

__all__ = ["MAX_K", "PRIOR_SHARE", "Coverage", "MultiLevel", "estimate_coverage", "multilevel", "waste"]

PRIOR_SHARE = 0.75  # DLRover's figure: the share of failures recovered by restarting the process from host memory
MAX_K = 64  # memory saves per disk save, at most


@dataclass(frozen=True)
class Coverage:
    """The share of failures the memory tier recovers, and where the number came from."""

    share: float
    source: str  # "prior", "history", "given" (ckptd plan) or "none" (no memory tier: every failure needs the disk)
    crashes: int = 0  # the trainer's unclean exits with the daemon alive
    losses: int = 0  # runs the daemon itself lost (host or daemon failure)


def estimate_coverage(crashes: int, losses: int, prior: float = PRIOR_SHARE) -> Coverage:
    """``prior`` worth one failure, then the job's own ratio: ``(prior + crashes) / (1 + crashes + losses)``."""
    crashes, losses = max(0, crashes), max(0, losses)
    if crashes == 0 and losses == 0:
        return Coverage(prior, "prior")
    return Coverage((prior + crashes) / (1 + crashes + losses), "history", crashes, losses)


@dataclass(frozen=True)
class MultiLevel:
    """The two intervals: memory saves every ``memory`` seconds (None: not worth it), the disk's
    interval is ``disk``, every ``k``-th memory period."""

    disk: AutoInterval
    memory: float | None
    memory_rule: str  # a bound of ``_period``, "fixed" (every_memory set) or "disk_covers" (no memory saves)
    k: int
    coverage: Coverage
    waste: float  # seconds lost per second of training, first order
    single_waste: float  # the same without the memory tier (k = 1), for comparison

    @property
    def reason(self) -> str:
        if self.coverage.source == "none":
            return f"{self.disk.reason}; no memory tier for this job"
        cov = f"p={self.coverage.share:.2f} of failures recoverable from memory"
        if self.coverage.source == "prior":
            cov += " (prior)"
        elif self.coverage.source == "history":
            cov += f" ({self.coverage.crashes} trainer crashes, {self.coverage.losses} runs lost with the daemon)"
        if self.memory is None:
            return f"{self.disk.reason}; memory tier: no separate saves ({cov}: each save may as well go to disk)"
        return (
            f"{self.disk.reason}; memory tier: a save every {short_duration(self.memory)} (rule "
            f"{self.memory_rule}), one in {self.k} to disk ({cov}; waste {self.waste:.3%} of training against "
            f"{self.single_waste:.3%} with the disk alone)"
        )

    def summary(self) -> dict[str, Any]:
        """The plan as plain data: what ``ckptd status --json`` and ``ckptd plan --json`` show."""
        return {
            "seconds": self.disk.seconds,
            "rule": self.disk.rule,
            "reason": self.reason,
            "memory": {
                "seconds": self.memory,
                "rule": self.memory_rule,
                "disk_every": self.k,
                "share": self.coverage.share,
                "share_source": self.coverage.source,
                "waste": self.waste,
                "waste_disk_alone": self.single_waste,
            },
        }


def waste(period: float, k: int, c_mem: float, c_disk: float, share: float, mtbf: float) -> float:
    """Seconds lost per second of training with memory saves every ``period``, every ``k``-th to disk."""
    if period <= 0:
        return math.inf
    stalls = (c_mem * (k - 1) + c_disk) / (k * period)
    lost = (share * period + (1 - share) * k * period) / (2 * mtbf)
    return stalls + lost


def multilevel(
    disk: CostSamples,
    memory: CostSamples,
    mtbf: Mtbf,
    coverage: Coverage,
    max_overhead: float,
    min_interval: float = 0.0,
    cost_guess: float = 0.0,
    fixed_memory: float | None = None,
    resolution: float = 0.0,
) -> MultiLevel:
    """The plan for the costs measured so far; ``fixed_memory``: the user set ``every_memory``,
    so only the disk's interval is chosen; ``resolution``: the finest interval the clock that
    asks for memory saves can keep (the daemon's tick)."""
    single = auto_interval(disk, mtbf, max_overhead, min_interval, cost_guess)
    c_disk = single.cost
    c_mem = statistics.median(memory.stalls) if memory.stalls else c_disk
    p_mem = max(memory.persists, default=c_mem)  # keeping a snapshot in memory: about a copy, until measured
    p_disk = max(disk.persists, default=0.0)
    m, share = mtbf.seconds, coverage.share
    single_waste = waste(single.seconds, 1, c_mem, c_disk, share, m)
    if fixed_memory is not None:
        return _given_memory(fixed_memory, c_mem, single, disk, coverage, max_overhead, min_interval, single_waste)
    best = (single_waste, 1, single.seconds, "disk_covers")
    for k in range(2, MAX_K + 1) if share > 0 else ():
        period, rule = _period(k, c_mem, c_disk, p_mem, p_disk, share, m, max_overhead, min_interval, resolution)
        w = waste(period, k, c_mem, c_disk, share, m)
        if w < best[0]:
            best = (w, k, period, rule)
    w, k, period, rule = best
    if k == 1:
        return MultiLevel(single, None, "disk_covers", 1, coverage, w, single_waste)
    disk_rule = "multilevel" if rule in ("young_daly", "memory_persist", "max_overhead", "tick") else rule
    disk_level = AutoInterval(k * period, disk_rule, c_disk, mtbf, single.cost_source)
    return MultiLevel(disk_level, period, rule, k, coverage, w, single_waste)


def _given_memory(
    every: float,
    c_mem: float,
    single: AutoInterval,
    disk: CostSamples,
    coverage: Coverage,
    max_overhead: float,
    min_interval: float,
    single_waste: float,
) -> MultiLevel:
    """``every_memory`` fixed by the user: the memory tier takes the failures it can, so the disk's
    interval is Young/Daly's for the rest (failures at ``(1 - p)/M``), under the same bounds."""
    rest = Mtbf(single.mtbf.seconds / max(1 - coverage.share, 0.01), single.mtbf.source)
    level = auto_interval(disk, rest, max_overhead, min_interval, single.cost if single.cost_source == "guess" else 0.0)
    k = max(1, round(level.seconds / every))
    w = waste(every, k, c_mem, single.cost, coverage.share, single.mtbf.seconds)
    disk_level = AutoInterval(level.seconds, level.rule, level.cost, single.mtbf, single.cost_source)
    return MultiLevel(disk_level, every, "fixed", k, coverage, w, single_waste)


def _period(
    k: int,
    c_mem: float,
    c_disk: float,
    p_mem: float,
    p_disk: float,
    share: float,
    mtbf: float,
    max_overhead: float,
    min_interval: float,
    resolution: float,
) -> tuple[float, str]:
    """The memory period for ``k`` memory saves per disk save: the optimum, raised to the bounds."""
    per_period = (c_mem * (k - 1) + c_disk) / k
    bounds = [
        ("young_daly", math.sqrt(2 * per_period * mtbf / (share + (1 - share) * k))),
        ("memory_persist", c_mem + p_mem),
        ("max_overhead", per_period / max_overhead),
        ("persist", (c_disk + p_disk) / k),
        ("min_interval", min_interval),  # a memory save is a scheduled save too
        ("tick", resolution),
    ]
    rule, seconds = bounds[0]
    for name, value in bounds[1:]:
        if value > seconds:
            rule, seconds = name, value
    return max(seconds, 1e-3), rule

"""``every="auto"``: the save interval from what a save costs and how often the job dies.

A save costs training ``C`` seconds (the stall: ``step()`` blocked while the state is
copied out); a failure loses the work since the newest verified save. Saving every
``T`` seconds wastes about ``C/T`` of the time on stalls and ``T/(2M)`` on lost work
(``M``: mean time between failures), which Young (1974) minimised at ``T = sqrt(2CM)``;
Daly (2006) added the higher-order terms used here, which matter when ``C`` is not tiny
against ``M``. CheckFreq (FAST '21) showed the same idea tuned online. Nobody else
(HF Trainer, Lightning, Orbax, DCP) does it: they make the user guess.

The optimum is then bounded from below, each bound naming itself as the rule that
decided (as every decision in ``ckptd.core`` does):

- ``max_overhead``: stalls may take at most this fraction of training (``T >= C/max``);
- ``persist``: a save is never due before the previous one can have verified, so
  ``auto`` never causes backpressure (``T >= stall + persist`` of recent saves);
- ``min_interval``: the user's own floor.

Everything is a pure function of samples and durations; the caller passes ``now``
(for the MTBF estimate) and keeps the samples. ``C`` is a running median of the last
``WINDOW`` stalls, so one slow save (a page-cache flush, a first save) does not swing
the interval; the persist bound takes the largest recent persist, since it guards
against a save still being written.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

__all__ = [
    "DEFAULT_MAX_OVERHEAD",
    "PRIOR_MTBF",
    "WINDOW",
    "AutoInterval",
    "CostSamples",
    "Mtbf",
    "auto_interval",
    "estimate_mtbf",
    "guess_cost",
    "overhead_ratio",
    "short_duration",
    "young_daly",
]

PRIOR_MTBF = 24 * 3600.0  # until a job has history: one failure a day, a conservative guess for a GPU host
DEFAULT_MAX_OVERHEAD = 0.02
WINDOW = 9  # samples behind the running median
GUESS_BANDWIDTH = 1 << 30  # bytes/s assumed for the first save's cost, before one was measured
OVERHEAD_WINDOW = 3600.0  # seconds of training that ckptd_save_overhead_ratio looks back over


@dataclass(frozen=True)
class Mtbf:
    """Mean time between failures, and where the number came from (for the decision's reason)."""

    seconds: float
    source: str  # "mtbf" (configured), "prior", or "history"
    failures: int = 0
    observed: float = 0.0


def estimate_mtbf(failures: int, observed: float, configured: float | None = None, prior: float = PRIOR_MTBF) -> Mtbf:
    """``configured`` if given; else the prior, worth one failure, updated by this job's history.

    With ``failures`` unclean exits seen over ``observed`` seconds of running, the
    estimate is ``(prior + observed) / (1 + failures)``: the prior alone at first, the
    observed rate once there is enough of it (a Gamma prior on the failure rate, as
    reliability engineers use to start from a vendor's figure).
    """
    if configured is not None:
        return Mtbf(configured, "mtbf")
    failures, observed = max(0, failures), max(0.0, observed)
    if failures == 0 and observed == 0:
        return Mtbf(prior, "prior")
    return Mtbf((prior + observed) / (1 + failures), "history", failures, observed)


@dataclass(frozen=True)
class CostSamples:
    """The last ``WINDOW`` measured stalls and persists (handoff to verified), in seconds."""

    stalls: tuple[float, ...] = ()
    persists: tuple[float, ...] = ()

    def add(self, stall: float | None = None, persist: float | None = None) -> "CostSamples":
        return CostSamples(_push(self.stalls, stall), _push(self.persists, persist))


def _push(samples: tuple[float, ...], value: float | None) -> tuple[float, ...]:
    if value is None or not math.isfinite(value) or value < 0:
        return samples
    return (samples + (float(value),))[-WINDOW:]


def guess_cost(state_bytes: int) -> float:
    """A first save's cost before any was measured: the state copied at ``GUESS_BANDWIDTH``."""
    return max(state_bytes, 0) / GUESS_BANDWIDTH


def young_daly(cost: float, mtbf: float) -> float:
    """Seconds from one save's start to the next's that minimise stalls plus lost work.

    Daly's optimum compute time between checkpoints, plus the checkpoint itself (our
    interval runs start to start): ``sqrt(2CM)(1 + sqrt(C/2M)/3 + (C/2M)/9)``, and ``M``
    once a save costs more than twice the MTBF (nothing better exists then).
    """
    if cost <= 0:
        return 0.0
    if cost >= 2 * mtbf:
        return mtbf + cost
    r = cost / (2 * mtbf)
    return math.sqrt(2 * cost * mtbf) * (1 + math.sqrt(r) / 3 + r / 9)


@dataclass(frozen=True)
class AutoInterval:
    """The interval ``every="auto"`` uses now, with the bound that decided it."""

    seconds: float
    rule: str  # "young_daly", "max_overhead", "persist", "min_interval" (or "multilevel": ``ckptd.core.multilevel``)
    cost: float
    mtbf: Mtbf
    cost_source: str = "measured"  # or "guess" before the first save was measured

    @property
    def reason(self) -> str:
        how = f"C={short_duration(self.cost)}" + (
            " (guessed from the state size)" if self.cost_source == "guess" else ""
        )
        m = f"M={short_duration(self.mtbf.seconds)}"
        if self.mtbf.source == "prior":
            m += " (prior)"
        elif self.mtbf.source == "history":
            m += f" ({self.mtbf.failures} unclean exits in {short_duration(self.mtbf.observed)})"
        bound = (
            ""
            if self.rule == "young_daly"
            else ", the two tiers' optimum"
            if self.rule == "multilevel"
            else f", raised to the {self.rule} bound"
        )
        return f"auto: T={short_duration(self.seconds)} from {how}, {m}{bound}"


def auto_interval(
    samples: CostSamples,
    mtbf: Mtbf,
    max_overhead: float = DEFAULT_MAX_OVERHEAD,
    min_interval: float = 0.0,
    cost_guess: float = 0.0,
) -> AutoInterval:
    """The interval for the costs measured so far (``cost_guess`` until there is one)."""
    if not 0 < max_overhead < 1:
        raise ValueError(f"max_overhead must be a fraction between 0 and 1, got {max_overhead!r}")
    measured = bool(samples.stalls)
    cost = statistics.median(samples.stalls) if measured else max(cost_guess, 0.0)
    bounds = [
        ("young_daly", young_daly(cost, mtbf.seconds)),
        ("max_overhead", cost / max_overhead),
        ("persist", max(samples.persists, default=0.0) + cost),
        ("min_interval", min_interval),
    ]
    rule, seconds = bounds[0]
    for name, value in bounds[1:]:
        if value > seconds:
            rule, seconds = name, value
    return AutoInterval(max(seconds, 1e-3), rule, cost, mtbf, "measured" if measured else "guess")


def overhead_ratio(
    stalls: Sequence[tuple[float, float]], started_at: float, now: float, window: float = OVERHEAD_WINDOW
) -> float:
    """Seconds stalled by saves per second of training over the last ``window`` (or since start).

    ``stalls`` are (when the save was taken, seconds it stalled). This is what
    ``max_overhead`` bounds and ``ckptd_save_overhead_ratio`` exports.
    """
    since = max(started_at, now - window)
    span = now - since
    if span <= 0:
        return 0.0
    return min(1.0, sum(s for t, s in stalls if t >= since) / span)


def short_duration(seconds: float) -> str:
    """412s, 0.8s, 12ms, 24h, 3.5d: a duration as a person reads it in a log line."""
    if seconds < 0.1:
        return f"{seconds * 1000:.3g}ms"
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.3g}d"
    if seconds >= 1.5 * 3600:
        return f"{seconds / 3600:.3g}h"
    return f"{seconds:.3g}s"

"""Sharded saves (``Checkpointer(..., sharded=True)``): every rank writes its own shard,
and the checkpoint commits only when every rank's shard is verified. This module holds the
collectives (``ShardGroup``); the stages themselves are the one save pipeline's
(``ckptd.save.pipeline.save_shard``), and what a lead commits is ``ckptd.save.agree``.

Once, at start (``locate``), the ranks learn which disk each one's job directory is on (its
``ckptd.disk.manifest.DISK_ID``): one disk (one host, or a shared filesystem) has one *lead*,
rank 0; with node-local directories each host's lowest rank leads its own disk.

Lifecycle of one sharded save, in order; every rank runs every step:

1. **When.** Step rules are pure functions of the step number, so every rank reaches
   the same decision on its own. Triggers that are not (a time rule fires on rank 0,
   a preemption signal reaches one rank first, a best metric improves) are raised as
   flags and combined by an asynchronous ``all_reduce(MAX)`` started in ``step()``;
   its result is read at the next exchange, so every rank saves at the same step and
   training never waits for it. An exchange costs ~0.2 ms of CPU, too much for every
   short step: rank 0 proposes, inside each exchange, how many ``step()`` calls to
   wait before the next one (about ``EXCHANGE_EVERY`` seconds' worth), and since every
   rank reads the same combined proposal, all of them exchange at the same calls.
2. **Prepare.** Each lead makes room on its disk for its ranks' shards (retention, then
   quota) and removes a stale uncommitted directory of the same name (left by a crashed
   attempt at this step) while the others wait for the exchange of verdicts: nobody writes
   before the quota said yes, and nothing is deleted while a rank writes. A refusal
   (``no_space``) reaches every rank, and no rank writes a shard.
3. **Write.** Each rank has staged its own state in its staging buffer (in ``step()``,
   before 2: that copy is all training waits for); its persist thread writes ``DIR/<unit>/rankR-of-W.safetensors`` (temp, fsync, verify from disk,
   rename), exactly like a single-file save (``ckptd.disk.persist``).
4. **Agree.** The persist thread gathers every rank's outcome (step, size, metadata
   digest, or the error) with ``all_gather_object``, within the group's timeout.
5. **Commit.** If every rank verified the same step and the files on its disk are in
   place, each lead writes the same manifest there (every shard's name, host, disk, size
   and metadata digest; temp, fsync, rename, fsync directory, ``ckptd.disk.manifest``), and
   the leads exchange their outcomes; otherwise nothing is committed and every rank logs
   why. A rank that died before step 4 makes the others time out there: no manifest, and
   resume takes the previous committed checkpoint. (A lead that fails after another
   committed leaves the unit committed on one disk only: resume takes only a unit every
   rank holds committed.)
6. **After.** Each lead applies retention on its disk (a unit is kept or deleted whole)
   and tells its host's daemon, which catalogues the unit and counts it in its metrics.

Checkpoint traffic runs on three gloo groups of its own, created here, each used by a
single thread (flags and DCP's load plans: the training thread; outcomes: the persist thread), so their
collectives never interleave with each other nor with training's own collectives.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any, Callable

import torch

from ckptd.core.vocab import FailReason
from ckptd.disk.manifest import DISK_ID, disk_of
from ckptd.disk.persist import PersistError

log = logging.getLogger(__name__)

FLAG_TIME, FLAG_PREEMPT, FLAG_BEST, INTERVAL = range(4)
TIME_RULES = ("", "every", "cron")  # the value of the time flag names the rule
EXCHANGE_EVERY = 0.1  # seconds between trigger exchanges (a trigger waits at most about twice this)
MAX_INTERVAL = 10_000


def next_interval(seconds_per_call: float | None, target: float = EXCHANGE_EVERY) -> int:
    """How many ``step()`` calls make about ``target`` seconds (rank 0's proposal)."""
    if not seconds_per_call or seconds_per_call <= 0:
        return 1
    return max(1, min(MAX_INTERVAL, int(target / seconds_per_call)))


class ShardGroup:
    """The ranks of one sharded job and the collectives they checkpoint with."""

    def __init__(self, timeout: float) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "sharded=True needs torch.distributed initialised (init_process_group) before the "
                "Checkpointer is created, on every rank"
            )
        self._dist = dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        wait = timedelta(seconds=timeout)
        self._flags = dist.new_group(backend="gloo", timeout=wait)
        self._outcomes = dist.new_group(backend="gloo", timeout=wait)
        self.plans = dist.new_group(backend="gloo", timeout=wait)  # DCP's load planning (trainer_hooks._ranks.dcpio)
        self._groups = [self._flags, self._outcomes, self.plans]
        self._pending: tuple[Any, torch.Tensor] | None = None
        self._calls_left = 1  # step() calls until the next exchange; the same on every rank
        self._last: tuple[float, int] | None = None  # rank 0: (time, interval) of the last exchange
        self.broken: str = ""
        # where the ranks write (``locate``); until then, as on one disk: rank 0 leads
        self.host, self.disk, self.disks = "", "", 1
        self.lead, self.here = self.rank == 0, self.world_size

    # -- step 1: when ------------------------------------------------------------------

    def due(self) -> bool:
        """Called once per ``step()``: is this the call at which every rank exchanges?"""
        self._calls_left -= 1
        return self._calls_left <= 0 and not self.broken

    def exchange(self, flags: list[int], now: float) -> list[int]:
        """Start combining these flags; return the combination started at the last exchange."""
        agreed = [0, 0, 0, 1]
        try:
            if self._pending is not None:
                work, tensor = self._pending
                work.wait()
                agreed = [int(v) for v in tensor.tolist()]
            tensor = torch.tensor([*flags[:3], self._propose(now)], dtype=torch.int32)
            work = self._dist.all_reduce(tensor, op=self._dist.ReduceOp.MAX, group=self._flags, async_op=True)
            self._pending = (work, tensor)
        except Exception as exc:  # a peer is gone: stop exchanging, never crash training
            self._fail(f"flag exchange failed: {exc}")
        self._calls_left = max(1, agreed[INTERVAL])
        if self.rank == 0:
            self._last = (now, self._calls_left)
        return agreed[:3]

    def _propose(self, now: float) -> int:
        if self.rank != 0 or self._last is None:
            return 0  # MAX over ranks: rank 0's proposal wins
        at, calls = self._last
        return next_interval((now - at) / calls)

    def drain(self) -> None:
        """The last exchange must complete on every rank before the group goes away."""
        if self._pending is not None and not self.broken:
            try:
                self._pending[0].wait()
            except Exception as exc:
                self._fail(f"flag exchange failed: {exc}")
        self._pending = None

    def close(self) -> None:
        """Shut ckptd's groups down now, while the interpreter is whole. Left to its finalisation
        (the Checkpointer still holding them after ``destroy_process_group()``), a gloo group's
        threads could abort the process at exit (SIGABRT, "terminate called without an active
        exception"; CI saw it twice). Local: no collective."""
        groups, self._groups = self._groups, []
        self.broken = self.broken or "closed"
        for g in groups:
            try:
                if self._dist.is_initialized():
                    self._dist.destroy_process_group(g)
            except Exception as exc:  # already gone with the default group: nothing to shut down
                log.debug("ckptd: shutting a checkpoint group down: %s", exc)

    # -- once: where each rank writes -------------------------------------------------------

    def locate(self, host: str, disk_of: Callable[[], str]) -> None:
        """At start, on every rank: which disk each rank's job directory is on. On one host that
        is one disk, and nothing is written to find out. Across hosts each rank reads its
        directory's ``manifest.DISK_ID`` (``disk_of``, made once): ranks reading the same id
        share one (a shared filesystem), ranks on node-local disks each read their own. Each
        disk's lowest rank leads it; one disk: rank 0."""
        hosts = [str(h) for h in self.gather(host)]
        spans = len(set(hosts)) > 1
        disks = [str(d) for d in self.gather(disk_of())] if spans else [""] * self.world_size
        unknown = sorted({hosts[r] for r, d in enumerate(disks) if not d and spans})
        if unknown:  # the same on every rank: each read every id
            raise ValueError(
                f"sharded=True across hosts: the ranks on {', '.join(unknown)} cannot tell which disk their "
                f"checkpoint directory is on ({DISK_ID} there cannot be read or made; the log of those ranks says "
                "why), so no host could tell its own shards from another's"
            )
        self.host, self.disk, self.disks = host, disks[self.rank], len(set(disks))
        self.lead = disks.index(self.disk) == self.rank
        self.here = disks.count(self.disk)
        if self.disks > 1 and self.rank == 0:
            log.info(
                "ckptd: the %d ranks write to %d node-local directories (hosts %s): each keeps its own ranks' "
                "shards and the same manifest",
                self.world_size,
                self.disks,
                ", ".join(sorted(set(hosts))),
            )

    # -- step 2: prepare ----------------------------------------------------------------

    def prepare(self, on_lead: Callable[[], None]) -> tuple[str, str]:
        """Persist thread: each disk's lead runs ``on_lead`` (room, stale unit); every rank gets
        the first refusal, ``(reason, message)``, ("", "") meaning "write your shard"."""
        verdict: tuple[str, str] = ("", "")
        if self.lead:
            try:
                on_lead()
            except PersistError as exc:  # the others wait for this exchange: always take part
                verdict = (exc.reason, str(exc))
            except Exception as exc:
                verdict = (FailReason.INTERNAL_ERROR, f"preparing the sharded save: {exc}")
        try:
            verdicts = self.gather(verdict)
        except Exception as exc:
            return FailReason.UNCOMMITTED, f"the ranks did not agree (a rank died or timed out): {exc}"
        refused = next((v for v in verdicts if v[0]), ("", ""))
        return str(refused[0]), str(refused[1])

    # -- steps 4 and 5: agree and commit -------------------------------------------------

    def commit(self, outcome: dict[str, Any], on_lead: Callable[[list[dict[str, Any]]], str]) -> str:
        """Persist thread: gather every rank's outcome; each disk's lead commits them there
        (``on_lead``, the pipeline's manifest writer). "" = committed on every disk."""
        try:
            outcomes = self.gather(outcome)
            problems = self.gather(self._commit_here(on_lead, outcomes) if self.lead else "")
            return "; ".join(str(p) for p in problems if p)
        except Exception as exc:
            return f"the ranks did not agree (a rank died or timed out): {exc}"

    @staticmethod
    def _commit_here(on_lead: Callable[[list[dict[str, Any]]], str], outcomes: list[dict[str, Any]]) -> str:
        """A lead's commit never raises out of the exchange: the others wait for its answer."""
        try:
            return on_lead(outcomes)
        except Exception as exc:
            return f"committing failed: {exc}"

    def anyone(self, problem: str) -> str:
        """Start-up and resume, on every rank: the first rank's problem as "rank R: ..." ("" when
        none has one), so that one rank's refusal is every rank's and none waits for another."""
        return next((f"rank {r}: {p}" for r, p in enumerate(self.gather(problem)) if p), "")

    def gather(self, mine: Any) -> list[Any]:
        """Resume: every rank's ``mine`` (what it holds), on every rank, in rank order."""
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, mine, group=self._outcomes)
        return out

    def everyone(self, ok: bool) -> bool:
        """Resume: True only if every rank says ``ok`` (its shard of a candidate verifies)."""
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        self._dist.all_reduce(flag, op=self._dist.ReduceOp.MIN, group=self._outcomes)
        return bool(flag.item())

    def _fail(self, why: str) -> None:
        self.broken = why
        log.error("ckptd: sharded job: %s; sharded saves stop committing", why)


def disk_of_directory(directory: str) -> str:
    """The disk id of the job directory (``ckptd.disk.manifest.disk_of``: read, or made once).
    "" when it cannot be read or made: that rank then counts as on a disk of its own, which only
    the ranks that also failed share."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            return disk_of(fd, create=True)
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("ckptd: cannot tell which disk %s is on: %s", directory, exc)
        return ""


def rank_and_world() -> tuple[int, int]:
    """From torch.distributed when initialised, else torchrun's environment."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

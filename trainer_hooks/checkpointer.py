"""``Checkpointer``: the one object a training script talks to.

Lifecycle, in order:

1. ``Checkpointer(job, dir, model=..., ...)`` resolves settings (kwargs > ``CKPTD_*``
   env > ``[jobs.JOB]`` > ``[defaults]``), runs the pre-flight checks (target
   writable, one checkpoint fits, state serialisable), creates the staging buffer and
   the persist worker, starts a scheduler thread only if a time rule is set, and
   installs the preemption signal handlers (main thread only).
2. ``resume()`` verifies candidates newest first, loads the first good one into the
   model, optimizer, scheduler and RNGs, and returns its step count.
3. ``step()`` counts a completed optimizer step. Its fast path compares the step
   with the next due step and reads one flag (set by the scheduler thread or a
   signal); only when either says so does it ask ``ckptd.core.policy.decide``.
4. A due save waits for the previous one to leave the staging buffer (or skips, with
   ``on_busy="skip"``), copies the state into shared memory and hands it to the
   worker; ``step()`` returns as soon as the copy is done.
5. ``close()`` (also at interpreter exit) saves the final step if it is not saved,
   waits until it is verified, and stops the threads. After a preemption save the
   original signal handler runs. An exit by an exception (an uncaught one at interpreter
   exit, or one leaving the ``with`` block) is not the end of the run: nothing is saved
   for it (a save already in flight still completes) and the log says so, so the next
   run resumes from the last save made on schedule, never from a crashed state.

Training is never crashed by a failing save: errors are logged, counted in
``stats`` and the loop goes on. Errors in what the user passed (a bad key, an
unwritable target, an unserialisable ``extra``) are raised at construction instead.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket as socket_module
import sys
import time
from typing import TYPE_CHECKING, Any, Callable

from ckptd.core import config as config_mod
from ckptd.core.autointerval import AutoInterval
from ckptd.core.quota import never_fits
from ckptd.core.settings import SettingsError, env_table, from_env, parse_table, resolve, unknown_env
from ckptd.disk.persist import Persisted, PersistError, cleanup_temp
from ckptd.disk.preflight import check_directory, check_job, check_template, render, resolve_target
from ckptd.disk.scan import Checkpoint, scan
from ckptd.disk.target import Target
from trainer_hooks._clock.preempt import DEFAULT_SIGNALS, Preemption, uncaught_exception
from trainer_hooks._clock.timerules import TimeRules
from trainer_hooks._clock.triggers import SCHEDULED, Triggers, hook_policy, warn_about_plan
from trainer_hooks._handoff.link import socket_path
from trainer_hooks._handoff.outlet import Outlet
from trainer_hooks._handoff.record import SaveRecord
from trainer_hooks._handoff.worker import StagedSave
from trainer_hooks._ranks.shards import ShardGroup, disk_of_directory, rank_and_world
from trainer_hooks._resume.resume import Resumer
from trainer_hooks._snapshot.overlap import Overlap
from trainer_hooks._snapshot.shared import SharedTensors
from trainer_hooks._snapshot.snapshot import Position, Snapshotter, Taken, holds_dtensors
from trainer_hooks._snapshot.staging import Pending, StagingBuffer
from trainer_hooks._state.state import TrainerObjects, as_float

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class Checkpointer:
    """Hand training state to ckptd (the lifecycle: the module docstring). Composed of parts: the
    ``Snapshotter``, ``StagingBuffer``, ``Outlet``, ``Resumer``, ``SaveRecord`` and the policy clock
    (``Triggers``, ``TimeRules``), sharing the run's ``Position``."""

    def __new__(cls, *args: Any, engine: Any = None, **kwargs: Any) -> Any:
        """A DeepSpeed engine (``engine=``, or its pieces as model/optimizer): ``trainer_hooks.deepspeed``."""
        if engine is not None or "deepspeed" in sys.modules:
            from trainer_hooks.deepspeed import for_engine

            made = for_engine(args, kwargs, engine)
            if made is not None:
                return made
        return super().__new__(cls)

    def __init__(
        self,
        job: str,
        directory: str | os.PathLike[str],
        model: Any = None,
        optimizer: Any = None,
        scheduler: Any = None,
        extra: dict[str, Any] | None = None,
        *,
        preempt_signals: tuple[int, ...] = DEFAULT_SIGNALS,
        preempt_grace: float = 5.0,
        config: str | None = None,
        socket: str | bool | None = None,
        reconnect_every: float = 5.0,
        before_save: Callable[[], None] | None = None,
        sharded: bool = False,
        shard_timeout: float = 600.0,
        generators: dict[str, torch.Generator] | None = None,
        quiet: bool = False,
        engine: None = None,
        **settings: Any,
    ) -> None:
        self.job = check_job(job)
        self.model, self.optimizer, self.scheduler, self.extra = model, optimizer, scheduler, extra
        self.generators = generators or {}  # saved and restored with the global RNGs (a sampler's, say)
        self._progress = Position()
        self._configure(directory, settings, config, sharded, shard_timeout)
        shared = SharedTensors() if self.saving and not sharded else None  # frozen tensors stored once
        objects = TrainerObjects(model, optimizer, scheduler, extra, self.generators)
        self._snap = Snapshotter(
            self.job,
            self.rank,
            objects,
            self._progress,
            self.settings.snapshot,
            self._dcp,
            before_save,
            shared=shared,
            trainable_only=self.settings.save == "trainable",
        )
        self._preflight()
        self._resumer = Resumer(
            self.job,
            self.directory,
            self.settings,
            self.rank,
            self.world_size,
            objects,
            self._snap.structure or {},
            self._shards,
            quiet,
            strict=self.settings.save == "all",
            socket_path=socket_path(socket),
        )
        self._record = SaveRecord()
        overlaps = self.settings.snapshot == "overlap" and self.saving and not self._dcp
        if self.settings.snapshot == "overlap" and self._dcp:
            log.warning("ckptd: job %s: snapshot='overlap' with DTensor state (FSDP2) is not built yet; 'host'", job)
        overlap = Overlap(optimizer, self._record.failed_early) if overlaps else None
        self.stats, self.saved = self._record.stats, self._record.saved  # counters, one record per save
        self._buffer = StagingBuffer(f"ckptd-{job}", pin=self._sizes.pin)
        if not self._found:  # in the background: the first save must not fault it in (with checkpoints to
            self._buffer.reserve(self._sizes.image_bytes)  # resume from, resume() reserves after its copy)
        self._outlet = Outlet(
            Target(self.directory, self.job, self.settings),
            self._on_persisted,
            self._record.removed,
            self._shards,
            replicate=self.saving,
            overlap=overlap,
        )
        self._closed = False
        # what the daemon resolves against its own config: this trainer's kwargs over its CKPTD_* variables
        self._raw_settings = {**env_table(), **{k: v for k, v in settings.items() if v is not None}}
        # the daemon is told by rank 0, or by each host's lead with node-local directories (its retention)
        path, talks = socket_path(socket), self._shards is None or self._shards.lead
        if path is not None and self.saving and talks:
            self._outlet.connect(path, self._hello, self._beat, self._time_fired, reconnect_every)
        if self.mode == "embedded":
            self._outlet.resync_remote()
        self._time_rules = TimeRules(
            self.policy,
            self._time_fired,
            lambda: self.mode == "embedded",
            job,
            self._state_bytes,
            self.settings.every_memory if self.saving else None,
        )
        self._time_rules.saved_at(self._last_save_wall)
        self._preemption = Preemption(
            preempt_grace, self._triggers.raise_attention, self._between_steps, lambda: self._stop_threads(timeout=2.0)
        )
        self._preemption.install(preempt_signals if self.policy.on_preempt else ())
        atexit.register(self._at_exit)
        self._outlet.say_mode(self.saving, (self.rank, self.world_size), socket)

    def _configure(
        self,
        directory: str | os.PathLike[str],
        settings: dict[str, Any],
        config: str | None,
        sharded: bool,
        shard_timeout: float,
    ) -> None:
        """Settings (kwargs > env > job table > defaults), ranks, policy and target; errors name the key."""
        cfg = config_mod.load(config)
        for problem in unknown_env():
            log.warning("ckptd: environment variable %s; ignored", problem)
        self.settings = resolve(
            parse_table(settings, "Checkpointer()"), from_env(), cfg.job_table(self.job), cfg.defaults
        )
        self.rank, self.world_size = rank_and_world()
        self._shards = ShardGroup(shard_timeout) if sharded else None
        self._dcp = self._shards is not None and holds_dtensors(
            self.model
        )  # FSDP2: DCP plans (trainer_hooks._ranks.dcpio)
        # DDP: rank 0 saves, every rank resumes from the same checkpoint; sharded: every rank saves its part
        self.saving = sharded or self.rank == 0
        self.policy = hook_policy(self.settings.group("policy"), self.saving, sharded, self.job)
        if self.saving:
            warn_about_plan(self.policy, self.job)
        self.directory, self.template = resolve_target(directory, self.settings.template)
        check_template(self.template, self.job)
        self._last_save_wall, self._resized = time.time(), not self.saving  # (resized: see step())
        self._triggers = Triggers(self.policy, self.job, self._shards is not None)

    def _preflight(self) -> None:
        """An unserialisable state or a target that cannot hold one checkpoint fails now, not at
        step 10000. Sharded, on every rank: one rank's refusal (its own host's disk may be full)
        is every rank's, before the exchange that follows would leave the others waiting."""
        problem: Exception | None = None
        try:
            self._check_target()
        except Exception as exc:
            problem = exc
        if self._shards is not None:
            said = self._shards.anyone(str(problem) if problem else "")
            if problem is None and said:
                raise SettingsError(f"job {self.job}: cannot save, {said}")
        if problem is not None:
            raise problem
        if self._shards is not None:  # every rank: which disk its directory is on (node-local ones differ)
            self._shards.locate(socket_module.gethostname(), lambda: disk_of_directory(self.directory))
            if self._shards.disks > 1:
                self._one_remote_tier(self._shards)

    def _one_remote_tier(self, shards: ShardGroup) -> None:
        """Across node-local disks each host uploads its part of a unit to the job's remote tier,
        under a prefix that names the job directory's path and the uid: hosts whose tier, path or
        uid differ would each upload parts of units that never complete. Every rank takes part
        (a host without ``remote=`` too) and stops at start, with the same error."""
        from ckptd.remote.layout import prefix_in

        s = self.settings
        mine = (s.remote or "", s.remote_endpoint or "", prefix_in(s, self.job, self.directory) if s.remote else "")
        seen = [tuple(str(x) for x in t) for t in shards.gather(mine)]
        if len(set(seen)) > 1:
            where = "; ".join(f"rank {r}: {t[0] or 'no remote'} {t[2]}" for r, t in enumerate(seen) if t != seen[0])
            raise SettingsError(
                f"job {self.job}: sharded=True with node-local directories: every host must have the same remote "
                "tier (remote=, remote_endpoint=) and, with one, the same job directory path as the same user (its "
                "prefix names both; each host uploads its part of every unit there); rank 0 has "
                f"{seen[0][0] or 'no remote'} {seen[0][2]}, {where}"
            )

    def _check_target(self) -> None:
        self._sizes = self._snap.measure(self.saving)
        self._state_bytes, self.run_id = self._sizes.state_bytes, self._snap.run_id
        self._found = found = scan(self.directory, self.job) if self.saving and os.path.isdir(self.directory) else []
        if self.saving:
            too_big = never_fits(self._state_bytes, self.settings.max_bytes)
            if too_big:
                raise SettingsError(f"job {self.job}: {too_big}")
            check_directory(self.directory, self._state_bytes, self.settings.min_free, sum(c.bytes for c in found[:-1]))
            cleanup_temp(self.directory)

    @property
    def mode(self) -> str:
        return self._outlet.mode

    def _beat(self) -> dict[str, Any]:
        return {"step": self._progress.step, "epoch": self._progress.epoch}

    def _hello(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "directory": os.path.abspath(self.directory),
            "template": self.template,
            "settings": self._raw_settings,
            "pid": os.getpid(),
            "step": self._progress.step,
            "rank": self.rank,
            "world_size": self.world_size,
            "sharded": self._shards is not None,
            "state_bytes": self._state_bytes,
        }

    @property
    def epoch(self) -> float | None:
        return self._progress.epoch

    @epoch.setter
    def epoch(self, value: float | None) -> None:
        self._progress.epoch = value

    @property
    def last_verified(self) -> str | None:  # the path of the newest save that verified
        return self._record.last_verified

    @property
    def last_error(self) -> PersistError | None:  # why the last failed save failed
        return self._record.last_error

    @property
    def step_count(self) -> int:
        return self._progress.step

    def start_at(self, step: int) -> None:
        """The run was resumed elsewhere (e.g. by a framework) at ``step``: count from there, save nothing."""
        self._progress.step = self._record.last_verified_step = step
        self._triggers.restart_at(step)

    def step(self, n: int | None = None, metrics: dict[str, Any] | None = None, epoch: float | None = None) -> int:
        """One more optimizer step done (or ``n`` done in all). Cheap unless a save is due."""
        self._progress.step = self._progress.step + 1 if n is None else n
        if epoch is not None:
            self.epoch = epoch
        t = self._triggers
        if metrics is not None:
            self._progress.metrics = metrics
            if t.best_key is not None:
                t.metric_seen(metrics.get(t.best_key))
        if self._shards is not None and self._shards.due():
            t.exchange(self._shards, self._preemption.signum, self._metric, time.monotonic())
        if not self._resized:  # once, at the first step(): reserve for the state as it is now
            self._resized = True
            self._snap.reserve(self._buffer)
        if self._progress.step >= t.next_due or t.attention:
            self._due()
        return self._progress.step

    def report(self, metrics: dict[str, Any]) -> bool:
        """Metrics measured on the current state (an evaluation), not on the step just done. With
        ``best_metric``, an improvement saves now, at the current step, so a best checkpoint holds
        exactly the weights that were evaluated. Returns whether a save was handed over."""
        self._progress.metrics = {**(self._progress.metrics or {}), **metrics}
        key = self._triggers.best_key
        if key is None or not self._triggers.metric_seen(as_float(metrics.get(key))):
            return False
        if self._shards is not None:  # every rank must save at the same step: the next exchange carries it
            return False
        saves = self.stats["saves"]
        self._due()
        return self.stats["saves"] > saves

    @property
    def _metric(self) -> float | None:
        """The best_metric value last passed to ``step()``, if any."""
        key = self._triggers.best_key
        return as_float(self._progress.metrics.get(key)) if (self._progress.metrics and key) else None

    def _due(self) -> None:
        t = self._triggers
        decision = t.decide(self._progress.step, self._preemption.pending, self._metric, time.time())
        if decision.save:
            self._save(decision.trigger, decision.rule)
            if decision.trigger == "best":
                t.churn(self._progress.step)
            if decision.trigger == "preempt":
                self._preemption.finish(self.wait)
        elif t.memory_due and self.mode == "daemon":  # its own buffer: never waits for a disk save
            self._save("memory", "every_memory")
        t.memory_due = False  # one that found the last memory save still in flight waits for the next tick
        t.decided(self._preemption.pending)

    # -- resume -------------------------------------------------------------------

    def checkpoints(self) -> list[Checkpoint]:
        """The job's checkpoints in its directory, oldest step first (from their headers)."""
        return self._resumer.checkpoints()

    def resume(self, fresh: bool = False) -> int:
        """Load the newest checkpoint that verifies now; return its step (0 if none). A checkpoint
        that does not fit the model raises ``ResumeError``; ``fresh=True`` starts from 0 and moves
        the job's checkpoints into ``DIR/.ckptd-stale/<time>/`` (``Resumer.resume``)."""
        self.wait()  # sharded: the persist thread's collectives must not interleave with the resume agreement
        resumed = self._resumer.resume(fresh)
        self._buffer.reserve(self._sizes.image_bytes)  # now: reserving beside the resume's copy slowed it 4x
        if resumed is None:
            return 0
        self._progress.step = self._record.last_verified_step = resumed.step
        self.epoch = resumed.epoch
        key = self._triggers.best_key
        self._triggers.restart_at(
            self._progress.step, [as_float(c.metrics.get(key)) for c in self.checkpoints()] if key else []
        )
        return self._progress.step

    @property
    def auto_interval(self) -> AutoInterval | None:
        """With ``every="auto"``: the interval this hook's clock uses now, and why (None otherwise)."""
        return self._time_rules.auto

    # -- saving -----------------------------------------------------------------

    def save(self, reason: str = "manual", wait: bool = False) -> bool:
        """Force a save now; ``wait=True`` returns only once it is verified (or failed)."""
        ok = self._save(reason, reason)
        if wait:
            self.wait()
        return ok

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the save in flight is verified or failed (by the daemon or here)."""
        return self._outlet.wait(timeout)

    def _save(self, trigger: str, rule: str) -> bool:
        try:
            return self._stage_and_submit(trigger, rule)
        except Exception as exc:  # a failing save must never crash training
            self._record.failed_early(self._progress.step, exc)
            return False

    def _stage_and_submit(self, trigger: str, rule: str) -> bool:
        t0 = time.perf_counter_ns()
        memory = trigger == "memory"
        buffer = self._outlet.memory_slot(self._buffer.pin) if memory else self._buffer
        if buffer is None:  # the last memory-only save is still being kept: this one is not needed
            return False
        if self._outlet.busy and not memory:
            if self.settings.on_busy == "skip" and trigger in SCHEDULED and self._shards is None:
                self._record.skipped(trigger, self._progress.step)
                self._outlet.notify({"type": "skipped", "step": self._progress.step, "reason": "backpressure"})
                return False
            self.wait()
        now = time.time()
        taken = self._snap.take(trigger, rule, now, memory_only=memory)
        filename = render(self.template, self.job, self._progress.step, self.epoch, now)
        overlap = self._outlet.overlap is not None and not memory
        if (
            deferred := overlap and not taken.on_gpu
        ):  # the copy thread composes and copies it (trainer_hooks._snapshot.overlap)
            self._snap.hold(taken)
            stall = (time.perf_counter_ns() - t0) / 1e9
            self._outlet.defer(lambda: self._stage(buffer, taken, filename, False, t0, stall), taken.meta.step)
        else:
            self._outlet.submit(*self._stage(buffer, taken, filename, overlap, t0))  # CUDA: once copied
        stalled = time.perf_counter_ns() - t0
        self.stats["stall_ns"] += stalled
        if memory:  # not a saved step: the policy's clocks go on as they were
            return True
        if not deferred:  # (deferred: the copy thread measures what the save cost, in _stage)
            self._time_rules.measured(stall=stalled / 1e9)  # the handoff included: all that step() blocked
        self.stats["saves"] += 1
        self._triggers.saved(self._progress.step, trigger, self._metric, now)
        self._last_save_wall = now
        self._time_rules.saved_at(now)
        return True

    def _stage(
        self, buffer: StagingBuffer, taken: Taken, filename: str, later: bool, t0: int, stall: float | None = None
    ) -> tuple[StagedSave, dict[str, Any], Pending]:
        """Compose the snapshot and copy it into ``buffer`` (``later``: leave the CUDA copies of what the
        optimizer writes in flight, ``Pending``); the save, described for whoever persists it. On the copy
        thread (``stall`` given) its time is part of the save's cost: a CPU copy takes about that from training."""
        t1 = time.perf_counter_ns()
        tensors, metadata = self._snap.compose(taken)
        written = self._snap.optimizer_writes(tensors) if later else ()
        length, pending = buffer.stage_overlapped(tensors, metadata, written)
        cost = None if stall is None else stall + (time.perf_counter_ns() - t1) / 1e9
        if cost is not None:  # what every="auto" weighs for this save (step() measured the others)
            self._time_rules.measured(stall=cost)
        stall = (time.perf_counter_ns() - t0) / 1e9 if stall is None else stall
        return (
            *self._outlet.describe(buffer.fd, length, taken.meta, filename, taken.memory_only, stall, cost),
            pending,
        )

    def _on_persisted(self, staged: StagedSave, result: Persisted | None, error: PersistError | None) -> None:
        """Runs on the worker thread (or the link's reader) after each save."""
        if staged.trigger == "memory":  # a snapshot for the daemon's memory tier: nothing on disk to record
            self.stats["memory"] += result is not None
            return
        if result is not None:
            self._time_rules.measured(persist=time.monotonic() - staged.submitted)
        if self._snap.shared is not None:  # where the frozen tensors' bytes are now, or forget them all
            self._snap.shared.verified(staged.step, result.path) if result is not None else self._snap.shared.failed()
        self._record.persisted(staged, result, error)

    def _time_fired(self, rule: str) -> None:
        """A time rule fired (the daemon's ``due``, or our own clock): the save happens at the next ``step()``."""
        self._triggers.time_fired(rule)

    def _between_steps(self, signum: int) -> None:
        """The trainer did not reach ``step()`` within the grace period after a signal: save now."""
        if self._closed:
            return
        if self._shards is not None:  # one rank alone cannot commit a sharded checkpoint
            log.error(
                "ckptd: sharded job %s: no step() within %.0fs of signal %d; no preemption save",
                self.job,
                self._preemption.grace,
                signum,
            )
            self._preemption.redeliver(signum)  # the original handler, without waiting for a stuck commit
            return
        self._save("preempt", "on_preempt")
        self._preemption.finish(self.wait)

    # -- shutdown ---------------------------------------------------------------

    def close(self, final: bool = True) -> None:
        """End of run: save the last step if unsaved, wait for verification, stop threads."""
        if self._closed:
            return
        step, final, t = self._progress.step, final and self.policy.save_final, self._triggers
        # a best save of this very step (an evaluation after the last step) is saved again as the final one
        if final and (step > t.last_saved_step or not self.stats["saves"] or t.last_trigger == "best"):
            self._save("final", "save_final")
        self.wait()
        if final and self._record.last_verified_step != step:  # one fresh attempt (new temp file, new
            log.warning("ckptd: the final checkpoint of step %d is not verified; trying once more", step)
            self._save("final", "save_final")  # fsync: a failed fsync is never retried on the same file)
            self.wait()
        if final:
            self._record.ended(self.job, step)
        self._closed = True
        if self._shards is not None:
            self._shards.drain()
        self._stop_threads()
        if self._shards is not None:
            self._shards.close()
        self._preemption.restore()
        atexit.unregister(self._at_exit)

    def _stop_threads(self, timeout: float | None = None) -> None:
        self._outlet.close(self._progress.step if self._closed else None, timeout)
        self._time_rules.close()
        self._buffer.close()

    def _at_exit(self) -> None:
        try:
            self._close_after(uncaught_exception())
        except Exception:
            log.exception("ckptd: error while closing at exit")

    def _close_after(self, exc: BaseException | None) -> None:
        """Close at the end of the run, or, after an exception, without a final save (SPEC §3). ``sys.exit``
        (``SystemExit``) is an ordinary end, as it is at interpreter exit."""
        if isinstance(exc, SystemExit):
            exc = None
        if exc is not None and not self._closed and self.saving:
            self.wait()  # a save already handed over is not the crashed state: it completes
            newest = self._record.last_verified_step
            log.warning(
                "ckptd: job %s ended by an exception (%s) at step %d: not the end of the run, no final "
                "save; the next run resumes from %s",
                self.job,
                type(exc).__name__,
                self._progress.step,
                f"step {newest}" if newest >= 0 else "the newest verified checkpoint, if any",
            )
        self.close(final=exc is None)

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self._close_after(exc)

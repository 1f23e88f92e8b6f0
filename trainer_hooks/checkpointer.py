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
   signal); only when either says so does it ask ``ckptd.policy.decide``.
4. A due save waits for the previous one to leave the staging buffer (or skips, with
   ``on_busy="skip"``), copies the state into shared memory and hands it to the
   worker; ``step()`` returns as soon as the copy is done.
5. ``close()`` (also at interpreter exit) saves the final step if it is not saved,
   waits until it is verified, and stops the threads. After a preemption save the
   original signal handler runs.

Training is never crashed by a failing save: errors are logged, counted in
``stats`` and the loop goes on. Errors in what the user passed (a bad key, an
unwritable target, an unserialisable ``extra``) are raised at construction instead.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import threading
import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, Callable

import torch

from ckptd.core import config as config_mod
from ckptd.core import policy as pol
from ckptd.core.format import FORMAT_VERSION
from ckptd.core.settings import from_env, group, parse_table, resolve
from ckptd.core.vocab import FailReason
from ckptd.store.lifecycle import Target, newest_verified, save_unit
from ckptd.store.manifest import shard_name, unit_name
from ckptd.store.persist import Persisted, PersistError, cleanup_temp
from ckptd.store.preflight import (
    check_directory,
    check_job,
    check_template,
    render,
    resolve_target,
)
from ckptd.store.remove import Removal
from ckptd.store.scan import Checkpoint, scan
from ckptd.store.verify import VerifyResult, verify_file, verify_unit
from ckptd.wire.protocol import default_socket_path
from trainer_hooks.link import Link
from trainer_hooks.shards import (
    FLAG_BEST,
    FLAG_PREEMPT,
    FLAG_TIME,
    TIME_RULES,
    ShardGroup,
    save_shard,
)
from trainer_hooks.staging import StagingBuffer
from trainer_hooks.state import apply, capture, flatten, unflatten
from trainer_hooks.worker import SaveJob, Worker

log = logging.getLogger("ckptd.hook")

SCHEDULED = ("step", "time", "best")
DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Checkpointer:
    """Hand training state to ckptd; see the module docstring for the lifecycle."""

    def __init__(self, job: str, directory: str | os.PathLike[str], model: Any = None, optimizer: Any = None,
                 scheduler: Any = None, extra: dict[str, Any] | None = None, *,
                 preempt_signals: tuple[int, ...] = DEFAULT_SIGNALS, preempt_grace: float = 5.0,
                 config: str | None = None, socket: str | bool | None = None, reconnect_every: float = 5.0,
                 before_save: Callable[[], None] | None = None, sharded: bool = False,
                 shard_timeout: float = 600.0, **settings: Any) -> None:
        self.job = check_job(job)
        self.model, self.optimizer, self.scheduler, self.extra = model, optimizer, scheduler, extra
        self._before_save = before_save  # e.g. a framework callback refreshing ``extra`` only when it counts
        cfg = config_mod.load(config)
        self.settings = resolve(parse_table(settings, "Checkpointer()"), from_env(),
                                cfg.job_table(job), cfg.defaults)
        self.rank, self.world_size = _rank_and_world()
        self._shards = ShardGroup(shard_timeout) if sharded else None
        # DDP: rank 0 saves, every rank resumes from the same checkpoint; sharded: every rank saves its part
        self.saving = sharded or self.rank == 0
        self.policy = self._make_policy()
        self.directory, self.template = resolve_target(directory, self.settings["template"])
        check_template(self.template, job)
        self._init_progress()
        flat, _ = flatten(self._capture())  # an unserialisable state fails now, not at step 10000
        if self.saving:
            older = scan(self.directory, job)[:-1] if os.path.isdir(self.directory) else []
            check_directory(self.directory, flat.nbytes, self.settings["min_free"], sum(c.bytes for c in older))
            cleanup_temp(self.directory)
        self.stats: dict[str, int] = {"saves": 0, "verified": 0, "failed": 0, "skipped": 0, "stall_ns": 0,
                                      "deleted": 0}
        self.saved: list[Checkpoint | dict[str, Any]] = []
        self.last_verified: str | None = None
        self.last_error: PersistError | None = None
        self._buffer = StagingBuffer(f"ckptd-{job}")
        self._worker = Worker(self._pipeline, self._on_persisted)
        self._closed = False
        self._raw_settings = {k: v for k, v in settings.items() if v is not None}
        self._link = self._open_link(socket, reconnect_every)
        self._scheduler = self._start_time_rules()
        self._signals = self._install_signals(preempt_signals)
        self._preempt_grace = preempt_grace
        atexit.register(self._at_exit)
        if not self.saving:
            log.info("ckptd: job %s rank %d of %d: rank 0 saves; this rank only resumes", job, self.rank,
                     self.world_size)
        elif self._link is None or not self._link.connected:
            log.info("ckptd: job %s saving to %s in embedded mode (no daemon; saves run in a background thread)",
                     job, self.directory)

    def _make_policy(self) -> pol.SavePolicy:
        if not self.saving:
            return pol.SavePolicy(save_final=False, on_preempt=False)
        policy = pol.SavePolicy.from_settings(group(self.settings, "policy"))
        if self._shards is not None and policy.min_interval:
            # every rank must save at the same step, and the ranks' clocks differ by milliseconds
            log.warning("ckptd: sharded job %s: min_interval is not applied (ranks must agree on the step)", self.job)
            policy = replace(policy, min_interval=0.0)
        return policy

    @property
    def _lead(self) -> bool:
        """The rank that talks to the daemon, runs time rules and retention."""
        return self.rank == 0 or self._shards is None

    # -- the daemon ---------------------------------------------------------------

    def _open_link(self, path: str | bool | None, retry_every: float) -> Link | None:
        if path is False or not self.saving or not self._lead:
            return None
        return Link(default_socket_path() if path in (None, True) else str(path), self._hello, self._beat,
                    self._on_daemon_saved, self._on_daemon_lost, retry_every, on_due=self._time_fired)

    @property
    def mode(self) -> str:
        return "daemon" if self._link is not None and self._link.connected else "embedded"

    def _hello(self) -> dict[str, Any]:
        return {"job": self.job, "directory": os.path.abspath(self.directory), "template": self.template,
                "settings": self._raw_settings, "pid": os.getpid(), "step": self._step,
                "rank": self.rank, "world_size": self.world_size, "sharded": self._shards is not None}

    def _beat(self) -> dict[str, Any]:
        return {"step": self._step, "epoch": self.epoch}

    def _on_daemon_saved(self, job: SaveJob, reply: dict[str, Any]) -> None:
        if reply.get("ok"):
            self._on_persisted(job, Persisted(str(reply.get("path")), job.length, {}), None)
        else:
            self._on_persisted(job, None, PersistError(FailReason.of(reply.get("reason")), str(reply.get("error"))))

    def _on_daemon_lost(self, jobs: list[SaveJob]) -> None:
        for job in jobs:
            log.warning("ckptd: the daemon went away with step %d in flight; persisting it here", job.step)
            self._worker.submit(job)

    # -- progress ---------------------------------------------------------------

    def _init_progress(self) -> None:
        self._step = 0
        self.epoch: float | None = None
        self._metrics: dict[str, Any] | None = None
        self._last_saved_step = 0
        self._last_verified_step = -1
        self._last_sched_at: float | None = None
        self._last_save_wall = time.time()
        self._best: float | None = None
        self._best_key = self.policy.best_metric
        self._time_due: str | None = None
        self._preempt: int | None = None
        self._flag = False
        self._agreed = [0, 0, 0]  # sharded: the flags every rank acts on (``trainer_hooks.shards``)
        self._sent_preempt = False
        self._best_seen = False
        self._next_due = pol.next_due_step(self.policy, 0)

    @property
    def step_count(self) -> int:
        return self._step

    def start_at(self, step: int) -> None:
        """The run was resumed elsewhere (e.g. by a framework) at ``step``: count from there, save nothing."""
        self._step = self._last_saved_step = self._last_verified_step = step
        self._next_due = pol.next_due_step(self.policy, step)

    def step(self, n: int | None = None, metrics: dict[str, Any] | None = None,
             epoch: float | None = None) -> int:
        """One more optimizer step done (or ``n`` done in all). Cheap unless a save is due."""
        self._step = self._step + 1 if n is None else n
        if epoch is not None:
            self.epoch = epoch
        if metrics is not None:
            self._metrics = metrics
            if self._best_key is not None and pol.improves(self.policy, metrics.get(self._best_key), self._best):
                self._best_seen = True  # sharded: latched until the next exchange sends it
                self._flag = self._shards is None
        if self._shards is not None and self._shards.due():
            self._exchange()
        if self._step >= self._next_due or self._flag:
            self._due()
        return self._step

    def _exchange(self) -> None:
        """Sharded: send this step's own triggers once; act on what all ranks sent last step."""
        assert self._shards is not None
        local = [0, 0, 0]
        local[FLAG_TIME] = TIME_RULES.index(self._time_due) if self._time_due in TIME_RULES else 0
        local[FLAG_PREEMPT] = int(self._preempt is not None and self._preempt > 0 and not self._sent_preempt)
        local[FLAG_BEST] = int(self._best_seen or pol.improves(self.policy, self._metric, self._best))
        self._best_seen = False
        self._sent_preempt = self._sent_preempt or bool(local[FLAG_PREEMPT])
        self._time_due = None  # sent: rank 0's timer fires once, the agreed flag comes back next step
        self._agreed = self._shards.exchange(local, time.monotonic())
        self._flag = any(self._agreed)

    @property
    def _metric(self) -> float | None:
        """The best_metric value last passed to ``step()``, if any."""
        return _as_float(self._metrics.get(self._best_key)) if (self._metrics and self._best_key) else None

    def _progress(self) -> pol.Progress:
        metric = self._metric
        if self._shards is not None:
            a = self._agreed
            return pol.Progress(self._step, self._last_saved_step, self._last_sched_at, TIME_RULES[a[FLAG_TIME]] or None,
                                bool(a[FLAG_PREEMPT]), metric, self._best, best_due=bool(a[FLAG_BEST]))
        return pol.Progress(self._step, self._last_saved_step, self._last_sched_at, self._time_due,
                            self._preempt is not None, metric, self._best)

    def _due(self) -> None:
        decision = pol.decide(self.policy, self._progress(), time.time())
        if decision.save:
            self._save(decision.trigger, decision.rule)
            if decision.trigger == "preempt":
                self._finish_preempt()
        self._next_due = pol.next_due_step(self.policy, self._last_saved_step)
        self._agreed = [0, 0, 0]
        self._flag = self._shards is None and (self._time_due is not None or self._preempt is not None)

    # -- saving -----------------------------------------------------------------

    def save(self, reason: str = "manual", wait: bool = False) -> bool:
        """Force a save now; ``wait=True`` returns only once it is verified (or failed)."""
        ok = self._save(reason, reason)
        if wait:
            self.wait()
        return ok

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the save in flight is verified or failed (by the daemon or here)."""
        if self._link is not None and not self._link.wait_idle(timeout):
            return False
        return self._worker.wait_idle(timeout)

    @property
    def _busy(self) -> bool:
        return self._worker.busy or (self._link is not None and self._link.busy)

    def _save(self, trigger: str, rule: str) -> bool:
        try:
            return self._stage_and_submit(trigger, rule)
        except Exception as exc:  # a failing save must never crash training
            self.stats["failed"] += 1
            log.error("ckptd: %s save at step %d failed before it reached the disk: %s", trigger, self._step, exc)
            return False

    def _stage_and_submit(self, trigger: str, rule: str) -> bool:
        t0 = time.perf_counter_ns()
        if self._busy:
            if self.settings["on_busy"] == "skip" and trigger in SCHEDULED and self._shards is None:
                self.stats["skipped"] += 1
                log.warning("ckptd: %s save at step %d skipped: the previous save is still being written "
                            "(missed, reason=backpressure)", trigger, self._step)
                if self._link is not None:
                    self._link.notify({"type": "skipped", "step": self._step, "reason": "backpressure"})
                return False
            self.wait()
        now = time.time()
        flat, skeleton = flatten(self._capture())
        filename = render(self.template, self.job, self._step, self.epoch, now)
        length = self._buffer.stage(flat.tensors, self._metadata(trigger, rule, now, skeleton, flat.aliases))
        if self._shards is not None:  # each rank writes its own shard in-process (see trainer_hooks.shards)
            unit = os.path.join(self.directory, unit_name(filename))
            filename = shard_name(self.rank, self.world_size)
        job = SaveJob(self._buffer.fd, length, unit if self._shards else self.directory, filename, self._step,
                      trigger, stall=(time.perf_counter_ns() - t0) / 1e9)
        msg = {"step": self._step, "epoch": self.epoch, "trigger": trigger, "rule": rule,
               "filename": filename, "length": length, "stall": job.stall}
        if self._shards is not None or self._link is None or not self._link.submit(job, msg):
            self._worker.submit(job)
        self.stats["stall_ns"] += time.perf_counter_ns() - t0
        self.stats["saves"] += 1
        self._mark_saved(trigger, now)
        return True

    def _mark_saved(self, trigger: str, now: float) -> None:
        self._last_saved_step = self._step
        self._last_save_wall = now
        self._time_due = None
        if trigger in SCHEDULED:
            self._last_sched_at = now
        if pol.improves(self.policy, self._metric, self._best):
            self._best = self._metric
        self._reschedule_every()

    def _capture(self) -> dict[str, Any]:
        if self._before_save is not None:
            self._before_save()
        trainer = {"job": self.job, "step": self._step, "epoch": self.epoch}
        return capture(self.model, self.optimizer, self.scheduler, self.extra, trainer)

    def _metadata(self, trigger: str, rule: str, now: float, skeleton: Any,
                  aliases: dict[str, str]) -> dict[str, str]:
        created = datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return {
            "ckptd.format": FORMAT_VERSION, "ckptd.job": self.job, "ckptd.step": str(self._step),
            "ckptd.epoch": "" if self.epoch is None else repr(float(self.epoch)),
            "ckptd.created": created, "ckptd.trigger": trigger, "ckptd.rule": rule,
            "ckptd.metrics": json.dumps(_jsonable(self._metrics or {})),
            "ckptd.state": json.dumps(skeleton, separators=(",", ":")),
            "ckptd.aliases": json.dumps(aliases, separators=(",", ":")),
        }

    @property
    def _target(self) -> Target:
        return Target(self.directory, self.job, self.settings)

    def _pipeline(self, job: SaveJob) -> Persisted:
        """Worker thread: the save lifecycle (``ckptd.store.lifecycle``); sharded: with the other ranks."""
        if self._shards is not None:
            return save_shard(self._shards, self._target, job, self._count_removals, self._report_commit)
        return save_unit(self._target, job.fd, job.length, job.filename, job.step, on_removed=self._count_removals)

    def _report_commit(self, report: dict[str, Any]) -> bool:
        """Rank 0 of a sharded save: tell the daemon, which catalogues and prunes; False if there is none."""
        if self._lead and self._link is not None and self._link.connected:
            self._link.notify(report)
            return True
        return not self._lead

    def _count_removals(self, removals: list[Removal]) -> None:
        for r in removals:
            if r.done:
                self.stats["deleted"] += 1
                log.info("ckptd: deleted %s (%s)", r.verdict.item.id, r.verdict.rule)
            else:
                log.error("ckptd: %s", r.error)

    def _on_persisted(self, job: SaveJob, result: Persisted | None, error: PersistError | None) -> None:
        """Runs on the worker thread after each save."""
        if result is not None:
            self.stats["verified"] += 1
            self.last_verified = result.path
            self._last_verified_step = max(self._last_verified_step, job.step)
            self.saved.append({"path": result.path, "step": job.step, "trigger": job.trigger, "ok": True})
            log.info("ckptd: step %d saved and verified: %s (%s)", job.step, result.path, job.trigger)
            return
        assert error is not None
        self.stats["failed"] += 1
        self.last_error = error
        self.saved.append({"path": None, "step": job.step, "trigger": job.trigger, "ok": False,
                           "reason": error.reason, "error": str(error)})
        log.error("ckptd: save of step %d failed (%s): %s; training continues", job.step, error.reason, error)

    # -- resume -----------------------------------------------------------------

    def checkpoints(self) -> list[Checkpoint]:
        return scan(self.directory, self.job)

    def resume(self) -> int:
        """Load the newest checkpoint that verifies now; return its step (0 if none)."""
        self.wait()  # sharded: the persist thread's collectives must not interleave with the resume agreement
        info = newest_verified(self.directory, self.job, check=self._resumable)
        if info is None:
            return 0
        path = info.path if self._shards is None else os.path.join(info.path, shard_name(self.rank, self.world_size))
        state = load(path)
        apply(state, self.model, self.optimizer, self.scheduler)
        if self.extra is not None and "extra" in state:
            self.extra.clear()
            self.extra.update(state["extra"])
        self._restore_progress(state.get("trainer", {}), info)
        log.info("ckptd: resumed job %s from %s (step %d)", self.job, info.path, self._step)
        return self._step

    def _resumable(self, info: Checkpoint) -> VerifyResult:
        """Does ``info`` verify for this rank (sharded: this rank's shard, and on every rank)?"""
        if self._shards is None:
            return verify_file(info.path)
        result = verify_unit(info.path, full=(self.rank,))  # its own shard re-read, its peers' checked cheaply
        if result.ok and result.metadata.get("ckptd.world_size") != str(self.world_size):
            result = replace(result, ok=False, reason=f"saved by {result.metadata.get('ckptd.world_size')} ranks, "
                                                      f"this run has {self.world_size} (no resharding)")
        if self._shards.everyone(result.ok) != result.ok:
            result = replace(result, ok=False, reason="another rank's shard of it does not verify")
        return result

    def _restore_progress(self, trainer: dict[str, Any], info: Checkpoint) -> None:
        self._step = self._last_saved_step = self._last_verified_step = int(trainer.get("step", info.step))
        self.epoch = trainer.get("epoch")
        if self._best_key:
            values = [_as_float(c.metrics.get(self._best_key)) for c in self.checkpoints()]
            for v in values:
                if pol.improves(self.policy, v, self._best):
                    self._best = v
        self._next_due = pol.next_due_step(self.policy, self._step)

    # -- time rules and signals -------------------------------------------------

    def _start_time_rules(self) -> Any:
        if not self.policy.has_time_rules:
            return None
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.cron import CronTrigger

        sched = BackgroundScheduler(daemon=True, job_defaults={"misfire_grace_time": None, "coalesce": True})
        if self.policy.cron:
            sched.add_job(self._time_fired, CronTrigger.from_crontab(self.policy.cron), args=["cron"], id="cron")
        sched.start()
        self._scheduler = sched
        self._reschedule_every()
        return sched

    def _reschedule_every(self) -> None:
        due = pol.next_time_due(self.policy, self._last_save_wall)
        sched = getattr(self, "_scheduler", None)
        if due is None or sched is None:
            return
        sched.add_job(self._time_fired, "date", run_date=datetime.fromtimestamp(due, timezone.utc),
                      args=["every"], id="every", replace_existing=True)

    def _time_fired(self, rule: str) -> None:
        """Scheduler thread: only sets flags; the save happens at the next ``step()``."""
        self._time_due = rule
        self._flag = True

    def _install_signals(self, sigs: tuple[int, ...]) -> dict[int, Any]:
        if not self.policy.on_preempt or threading.current_thread() is not threading.main_thread():
            return {}
        return {s: signal.signal(s, self._on_signal) for s in sigs}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._preempt == -signum:  # our own re-delivery after the preemption save
            self._chain(signum, frame)
            return
        log.warning("ckptd: signal %d: preemption save at the next step (or in %.0fs)", signum, self._preempt_grace)
        self._preempt = signum
        self._flag = True
        timer = threading.Timer(self._preempt_grace, self._preempt_now, args=[signum])
        timer.daemon = True
        timer.start()
        self._preempt_timer = timer

    def _preempt_now(self, signum: int) -> None:
        """The trainer did not reach ``step()`` in time: it is between steps, save now."""
        if self._preempt == signum and not self._closed:
            if self._shards is not None:  # one rank alone cannot commit a sharded checkpoint
                log.error("ckptd: sharded job %s: no step() within %.0fs of signal %d; no preemption save",
                          self.job, self._preempt_grace, signum)
                self._preempt = -signum
                os.kill(os.getpid(), signum)  # the original handler, without waiting for a stuck commit
                return
            self._save("preempt", "on_preempt")
            self._finish_preempt()

    def _finish_preempt(self) -> None:
        signum = self._preempt
        if signum is None or signum < 0:
            return
        timer = getattr(self, "_preempt_timer", None)
        if timer is not None:
            timer.cancel()
        self.wait()
        self._preempt = -signum
        os.kill(os.getpid(), signum)  # runs the original handler, in the main thread

    def _chain(self, signum: int, frame: Any) -> None:
        self._preempt = None
        original = self._signals.get(signum, signal.SIG_DFL)
        if callable(original):
            original(signum, frame)
        elif original == signal.SIG_DFL:
            self._stop_threads(timeout=2.0)  # the process is about to die: never hang it on a thread
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    # -- shutdown ---------------------------------------------------------------

    def close(self, final: bool = True) -> None:
        """End of run: save the last step if unsaved, wait for verification, stop threads."""
        if self._closed:
            return
        if final and self.policy.save_final and (self._step > self._last_saved_step or not self.stats["saves"]):
            self._save("final", "save_final")
        self.wait()
        if final and self.policy.save_final and self._last_verified_step != self._step:
            # the end of the run did not reach the disk: one fresh attempt (new temp file,
            # new fsync; a failed fsync is never retried on the same file)
            log.warning("ckptd: the final checkpoint of step %d is not verified; trying once more", self._step)
            self._save("final", "save_final")
            self.wait()
        self._closed = True
        if self._shards is not None:
            self._shards.drain()
        self._stop_threads()
        self._restore_signals()
        atexit.unregister(self._at_exit)

    def _stop_threads(self, timeout: float | None = None) -> None:
        if self._link is not None:
            self._link.close(self._step if self._closed else None)
            self._link = None
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        self._worker.close(timeout)
        self._buffer.close()

    def _restore_signals(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for s, h in self._signals.items():
                signal.signal(s, h)
        self._signals = {}

    def _at_exit(self) -> None:
        try:
            self.close()
        except Exception:
            log.exception("ckptd: error while closing at exit")

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _rank_and_world() -> tuple[int, int]:
    """From torch.distributed when initialised, else torchrun's environment."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def load(path: str) -> dict[str, Any]:
    """The nested state stored in a ckptd checkpoint (tensors on CPU)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    skeleton = json.loads(meta.get("ckptd.state", "null"))
    aliases = json.loads(meta.get("ckptd.aliases", "{}"))
    state: dict[str, Any] = unflatten(skeleton, tensors, aliases)
    return state


def _as_float(v: Any) -> float | None:
    if isinstance(v, torch.Tensor):
        return float(v.item()) if v.numel() == 1 else None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return None


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in metrics.items():
        f = _as_float(v)
        out[str(k)] = f if f is not None else (v if isinstance(v, (str, bool, type(None))) else str(v))
    return out

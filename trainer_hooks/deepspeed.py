"""A DeepSpeed engine in one line: ``Checkpointer(job, dir, engine=engine, every_steps=500)``.

Design (docs/deepspeed.md): ckptd commits DeepSpeed's *own* layout atomically rather than
re-serialising the engine. DeepSpeed alone is the only code that knows every ZeRO stage's
partitions (ZeRO-3's flat fp32 partitions, bf16/fp16 masters, the loss scaler, offload), and
its ``load_checkpoint``, ``zero_to_fp32.py`` and HF Trainer's resume all read that layout. What
DeepSpeed lacks is the commit: each rank writes straight to the final names and rank 0 then
writes ``latest`` with a plain write. So one save here is, on every rank:

1. **Stage.** ``engine.save_checkpoint(DIR/.ckptd-staging-TAG, tag=TAG, save_latest=False)``:
   every rank writes its partition files into a hidden staging directory (never a unit:
   hidden names are skipped by every verb and by watch mode).
2. **Verify.** Each rank fsyncs the files it wrote and verifies them from disk: every zip
   record's CRC-32 (one per tensor storage) and a weights-only load (DeepSpeed's pickled
   objects read as inert data, ``ckptd.foreign.picklesafe``).
3. **Agree.** ``all_gather_object`` of every rank's outcome over torch.distributed.
4. **Commit.** Rank 0, only when every rank verified and the tag holds every rank's file
   (``ckptd.foreign.deepspeed.incomplete``), renames the tag into ``DIR`` (fsync of the
   directory), then replaces ``DIR/latest`` by temp file, fsync and rename. A rank killed at
   any point before leaves no tag under its final name and ``latest`` unchanged.
5. **Tell, or retain.** With a daemon (the same ``Link`` as the plain hook: hello with the job's
   policy, heartbeats of the step, ``end`` at close), rank 0 reports the tag with the sharded
   path's ``committed`` message (or ``ok: false`` and why: a failed save, counted and paged);
   the daemon re-verifies it, catalogues and counts it and applies the job's retention. Without
   one (embedded), rank 0 applies the job's rules (``keep_last`` ...) to the committed tags itself.

``resume()`` takes the newest committed tag that verifies (rank 0 judges, every rank gets its
name) and loads it with ``engine.load_checkpoint``: weights, optimizer partitions, loss scaler,
scheduler, DeepSpeed's step counters; ckptd's step and every rank's RNG states travel in
``client_state``.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import stat
import sys
import time
from typing import Any, Callable

from ckptd.core import config as config_mod
from ckptd.core import policy as pol
from ckptd.core import retention
from ckptd.core.settings import env_table, from_env, parse_table, resolve
from ckptd.foreign import deepspeed as dsfmt
from ckptd.foreign.formats import step_from_name
from ckptd.foreign.picklesafe import verify_torch
from trainer_hooks._clock.preempt import DEFAULT_SIGNALS, Preemption
from trainer_hooks._clock.timerules import TimeRules
from trainer_hooks._clock.triggers import Triggers, hook_policy
from trainer_hooks._handoff.link import Link, socket_path
from trainer_hooks._ranks.shards import ShardGroup
from trainer_hooks._state.rng import restore_rng, rng_state
from trainer_hooks._state.state import as_float

log = logging.getLogger(__name__)

STAGING = ".ckptd-staging-"
COMMIT = dsfmt.COMMIT  # inside a committed tag: who wrote and verified it
TRIGGERS = {"scheduled": "step"}  # this module's save reasons as the daemon's trigger names


def is_engine(obj: Any) -> bool:
    """A DeepSpeed engine, known without importing DeepSpeed."""
    return any(c.__name__ == "DeepSpeedEngine" and c.__module__.startswith("deepspeed.") for c in type(obj).__mro__)


class EngineCheckpointer:
    """What ``Checkpointer(job, dir, engine=engine, ...)`` returns: the same verbs (``resume``,
    ``step``, ``save``, ``report``, ``close``), every rank saving its own partition."""

    def __init__(
        self,
        job: str,
        directory: str | os.PathLike[str],
        model: Any = None,
        optimizer: Any = None,
        scheduler: Any = None,
        extra: dict[str, Any] | None = None,
        *,
        engine: Any,
        config: str | None = None,
        quiet: bool = False,
        before_save: Callable[[], None] | None = None,
        **settings: Any,
    ) -> None:
        import torch.distributed as dist

        if not is_engine(engine):
            raise TypeError(
                f"engine= takes a DeepSpeed engine (deepspeed.initialize's first result), not {type(engine).__name__}"
            )
        socket = settings.pop("socket", None)
        reconnect_every = settings.pop("reconnect_every", None)
        shard_timeout = float(settings.pop("shard_timeout", None) or 600.0)
        signals = settings.pop("preempt_signals", None)
        grace = float(settings.pop("preempt_grace", None) or 5.0)
        for ignored in ("sharded", "generators"):
            settings.pop(ignored, None)  # every rank saves its own partition here already; RNG: every rank's
        # model and optimizer: the engine holds them and DeepSpeed saves them; a scheduler the engine does not own (HF Trainer's own) travels in client_state
        self.scheduler = (
            scheduler
            if scheduler is not None and scheduler is not engine.lr_scheduler and hasattr(scheduler, "state_dict")
            else None
        )
        self.job, self.engine, self.extra, self.quiet, self.before_save = job, engine, extra, quiet, before_save
        self.directory = os.path.abspath(os.fspath(directory))
        cfg = config_mod.load(config)
        known = {k: v for k, v in settings.items() if v is not None}
        self.settings = resolve(parse_table(known, "Checkpointer()"), from_env(), cfg.job_table(job), cfg.defaults)
        self.policy = hook_policy(self.settings.group("policy"), True, True, job)
        self.rules = retention.Rules.from_settings(self.settings.retention())
        self._dist = dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.current = 0
        self._metric: float | None = None  # the best_metric's last value (step(metrics=) or report())
        self._triggers = Triggers(self.policy, job, sharded=True)  # every rank acts on the agreed flags
        self._shards = ShardGroup(shard_timeout)  # ckptd's own gloo groups: the flags' all_reduce
        self._state_bytes = state_guess(engine, self.world_size)  # every="auto"'s cost guess before a save
        self.last_saved: int | None = None
        self.saved: list[str] = []
        self.failed = 0
        self._closed = self._stopped = self._saving = False
        self.link: Link | None = None
        if self.rank == 0:
            os.makedirs(self.directory, exist_ok=True)
            self._clean_staging()
            path = socket_path(socket)
            if path is not None:  # rank 0 speaks for the job, as a sharded job's does
                self._raw_settings = {**env_table(), **known}
                self.link = Link(
                    path,
                    self._hello,
                    lambda: {"step": self.current},
                    lambda *_: None,
                    lambda _: None,
                    float(reconnect_every or 5.0),
                    on_due=self._time_fired,
                )
        self._start_clocks(signals, grace)
        atexit.register(self._at_exit)

    def _start_clocks(self, signals: Any, grace: float) -> None:
        """Rank 0's clock (``every``, ``cron``; used while no daemon holds the job) and every rank's
        signal handlers: each only raises a flag, agreed over the ranks at the next exchange."""
        clock = self.policy if self.rank == 0 else pol.SavePolicy(save_final=False, on_preempt=False)
        self._time_rules = TimeRules(
            clock, self._time_fired, lambda: self.mode == "embedded", self.job, self._state_bytes
        )
        self._time_rules.saved_at(time.time())
        self._grace, self._last_step_at = grace, time.monotonic()
        self._preemption = Preemption(grace, self._triggers.raise_attention, self._between_steps, lambda: None)
        self._preemption.install(tuple(signals or DEFAULT_SIGNALS) if self.policy.on_preempt else ())

    @property
    def mode(self) -> str:
        """ "daemon" while rank 0 is connected (the daemon counts, pages and retains), else "embedded"."""
        return "daemon" if self.link is not None and self.link.connected else "embedded"

    def _hello(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "directory": self.directory,
            "settings": self._raw_settings,
            "pid": os.getpid(),
            "step": self.current,
            "rank": self.rank,
            "world_size": self.world_size,
            "state_bytes": self._state_bytes,
            "sharded": True,  # every rank writes its own part: no whole snapshot for the memory tier to hold
        }

    # -- the loop -------------------------------------------------------------------------------

    def resume(self) -> int:
        """Load the newest committed, verified tag into the engine; its step count (0: none)."""
        t0 = time.perf_counter()
        choice = [self.newest_committed() if self.rank == 0 else None]
        self._dist.broadcast_object_list(choice, src=0)
        tag = choice[0]
        if tag is None:
            if not self.quiet and self.rank == 0:
                log.warning(
                    "ckptd: job %s: no committed DeepSpeed checkpoint in %s; starting at step 0",
                    self.job,
                    self.directory,
                )
            return 0
        _, client = self.engine.load_checkpoint(self.directory, tag=tag)
        ours = (client or {}).get("ckptd", {})
        rngs = ours.get("rng") or []
        if self.rank < len(rngs):
            restore_rng(rngs[self.rank])
        if self.scheduler is not None and isinstance(ours.get("scheduler"), dict):
            self.scheduler.load_state_dict(ours["scheduler"])
        if isinstance(self.extra, dict) and isinstance(ours.get("extra"), dict):
            self.extra.update(ours["extra"])
        self.current = self.last_saved = int(ours.get("step", self.engine.global_steps))
        best = self.policy.best_metric  # the best so far: only from this uid's own tags, as the one loaded
        ours = [c for c in dsfmt.job_tags(self.directory, self.job) if not _not_ours(c.path)]
        self._triggers.restart_at(self.current, [c.metrics.get(best) for c in ours])
        if not self.quiet and self.rank == 0:
            log.warning(
                "ckptd: job %s resumed at step %d from %s (%.2fs)",
                self.job,
                self.current,
                os.path.join(self.directory, tag),
                time.perf_counter() - t0,
            )
        return self.current

    def step(self, n: int | None = None, metrics: dict[str, Any] | None = None, epoch: float | None = None) -> None:
        """One more optimizer step done (or ``n`` steps in all). Step rules are pure functions of the
        step, so every rank decides alike. A time rule (rank 0's clock or the daemon's ``due``), a
        preemption signal and a better metric are flags, combined over the ranks by the sharded
        path's exchange (``trainer_hooks._ranks.shards``): every rank saves at the same step, or none."""
        self.current = self.current + 1 if n is None else int(n)
        now = time.monotonic()
        # a signal's save comes within about three steps (two exchanges): wait that long for it, however long a step
        self._preemption.grace, self._last_step_at = self._grace + 3 * (now - self._last_step_at), now
        t = self._triggers
        if metrics is not None and t.best_key is not None and t.best_key in metrics:
            self._seen(metrics[t.best_key])
        if self._shards.due():
            t.exchange(self._shards, self._preemption.signum, self._metric, now)
        if self.current >= t.next_due or t.attention:
            self._due()

    def _due(self) -> None:
        t = self._triggers
        decision = t.decide(self.current, self._preemption.pending, self._metric, time.time())
        if decision.save and self.save(reason=decision.trigger) and decision.trigger == "best":
            t.churn(self.current)
        if decision.save and decision.trigger == "preempt":
            self._preemption.finish(lambda: None)  # committed (or not) already: the signal's own handler now
        t.decided(self._preemption.pending)

    def _seen(self, value: Any) -> None:
        self._metric = as_float(value)
        self._triggers.metric_seen(self._metric)

    def start_at(self, step: int) -> None:
        self.current = step
        self._triggers.restart_at(step)

    def report(self, metrics: dict[str, Any]) -> None:
        """Evaluation metrics. With ``best_metric``, an improvement is proposed at the next exchange
        and every rank saves there (a few steps on, as for a sharded job: ranks must agree on the step)."""
        if self._triggers.best_key is not None and self._triggers.best_key in metrics:
            self._seen(metrics[self._triggers.best_key])

    def close(self) -> None:
        """End of the run: the final step is saved (committed) if it is not already. A signal that
        came during that save goes on to its own handler once the daemon heard the end."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.policy.save_final and self.last_saved != self.current and self.current > 0:
                self.save(reason="final")
        finally:
            signum = self._stop()
            self._hang_up(self.current)
        if signum:
            os.kill(os.getpid(), signum)

    def _stop(self) -> int:
        """The clock, the signal handlers and ckptd's groups (the last exchange completes first);
        once. Returns the signal still waiting for a save (0: none)."""
        if self._stopped:
            return 0
        self._stopped = True
        signum = self._preemption.signum or 0
        self._time_rules.close()
        self._preemption.restore()
        self._shards.drain()
        self._shards.close()
        return max(0, signum)

    def _at_exit(self) -> None:
        """The run ended without ``close()`` (an exception, or a script that forgot it): nothing is
        saved as final, the daemon counts the unsaved steps, and ckptd's threads and groups go now."""
        if not self._closed:
            self._closed = True
            self._stop()
            self._hang_up(None)

    def _time_fired(self, rule: str) -> None:
        """Rank 0: a time rule fired (the daemon's ``due``, or our own clock): proposed at the next exchange."""
        if rule != "memory":  # the memory tier takes whole snapshots; an engine's state is DeepSpeed's files
            self._triggers.time_fired(rule)

    def _between_steps(self, signum: int) -> None:
        """No ``step()`` within the grace period after a signal: one rank alone cannot commit a tag."""
        if self._saving:  # never cut a save under way (a preemption's own, or one the signal came in)
            self._preemption.rearm()
            return
        if self._closed:  # close() passes the signal on when it is done
            return
        log.error(
            "ckptd: DeepSpeed job %s: no step() within %.0fs of signal %d; no preemption save",
            self.job,
            self._preemption.grace,
            signum,
        )
        self._preemption.redeliver(signum)

    def __enter__(self) -> EngineCheckpointer:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        self._at_exit()  # an exception is not the end of the run: nothing saved as final, nor an end

    def _hang_up(self, end_step: int | None) -> None:
        if self.link is not None:
            link, self.link = self.link, None
            link.close(end_step)

    # -- one save -------------------------------------------------------------------------------

    def save(self, reason: str = "manual") -> bool:
        """Stage, verify, agree, commit (the module docstring). Never raises: a failed save is
        logged and counted, training goes on, and nothing is committed."""
        self._saving = True  # a signal's grace timer waits for it (``_between_steps``)
        try:
            return self._save(reason)
        finally:
            self._saving = False

    def _save(self, reason: str) -> bool:
        step = self.current
        tag = f"global_step{step}"
        staging = os.path.join(self.directory, STAGING + tag)
        t0 = time.perf_counter()
        outcome: dict[str, Any] = {"rank": self.rank, "ok": False, "error": ""}
        try:
            if self.rank == 0:
                shutil.rmtree(staging, ignore_errors=True)  # a crashed attempt at this step
            if self.before_save is not None:
                self.before_save()
            client = {
                "ckptd": {
                    "job": self.job,
                    "step": step,
                    "reason": reason,
                    "rng": self._all_rngs(),
                    "extra": self.extra or {},
                }
            }
            if self.scheduler is not None:
                client["ckptd"]["scheduler"] = self.scheduler.state_dict()
            self.engine.save_checkpoint(staging, tag=tag, client_state=client, save_latest=False)
            outcome.update(self._verify_mine(os.path.join(staging, tag)))
        except Exception as exc:  # noqa: BLE001 (training is never crashed by a save)
            outcome["error"] = f"{type(exc).__name__}: {exc}"
        stall = time.perf_counter() - t0
        outcomes: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(outcomes, outcome)
        verdict = [self._commit(staging, tag, step, reason, outcomes) if self.rank == 0 else ""]
        self._dist.broadcast_object_list(verdict, src=0)
        problem = str(verdict[0])
        if self.rank == 0 and not self._tell(tag, step, reason, problem, stall) and not problem:
            self._retain()  # embedded: nobody else applies the job's rules
        self._attempted(step, reason)
        if problem:
            self.failed += 1
            log.error("ckptd: job %s: DeepSpeed checkpoint %s not committed: %s", self.job, tag, problem)
            return False
        self._time_rules.measured(stall, stall)  # every="auto": synchronous, the whole save is stall and persist
        self.last_saved = step
        self.saved.append(tag)
        if not self.quiet and self.rank == 0:
            log.warning(
                "ckptd: job %s: committed %s (%s, every rank verified, %.2fs)",
                self.job,
                os.path.join(self.directory, tag),
                reason,
                stall,
            )
        return True

    def _attempted(self, step: int, reason: str) -> None:
        """The rules count from a save attempted at ``step``, as the daemon does, and its metric
        as proposed: a failed save is paged once, not retried at every step or exchange."""
        now = time.time()
        self._triggers.saved(step, TRIGGERS.get(reason, reason), self._metric, now)
        self._time_rules.saved_at(now)

    def _all_rngs(self) -> list[dict[str, Any]]:
        """Every rank's RNG states (client_state is written by rank 0 only under ZeRO-1/2)."""
        rngs: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(rngs, rng_state())
        return rngs

    def _verify_mine(self, tag_dir: str) -> dict[str, Any]:
        """fsync and verify, from disk, the files this rank wrote."""
        mine = [n for n in sorted(os.listdir(tag_dir)) if _written_by(n) == self.rank]
        tensors = nbytes = 0
        for n in mine:
            path = os.path.join(tag_dir, n)
            _fsync(path)
            r = verify_torch(path)
            if not r.ok:
                return {"ok": False, "error": f"{n}: {r.reason}"}
            tensors, nbytes = tensors + r.tensors, nbytes + r.bytes
        if not mine:
            return {"ok": False, "error": f"rank {self.rank} wrote no file into {tag_dir}"}
        return {"ok": True, "files": mine, "tensors": tensors, "bytes": nbytes}

    def _commit(self, staging: str, tag: str, step: int, reason: str, outcomes: list[dict[str, Any]]) -> str:
        """Rank 0: every rank verified and every rank's file is there -> rename into place, then
        ``latest``. "" when committed, else why not (and nothing under a final name changed)."""
        bad = [o for o in outcomes if not o or not o.get("ok")]
        if bad:
            return "; ".join(f"rank {o.get('rank')}: {o.get('error') or 'failed'}" for o in bad if o) or "a rank failed"
        src = os.path.join(staging, tag)
        try:
            missing = dsfmt.incomplete(src)
            if missing:
                return f"the tag is incomplete: {missing}"
            commit = {
                "job": self.job,
                "step": step,
                "trigger": TRIGGERS.get(reason, reason),
                "world_size": self.world_size,
                "created": time.time(),
                "metrics": {self.policy.best_metric: self._metric}
                if self.policy.best_metric and self._metric is not None
                else {},
                "ranks": [{k: o.get(k) for k in ("rank", "files", "tensors", "bytes")} for o in outcomes],
            }
            _write_atomic(os.path.join(src, COMMIT), json.dumps(commit, indent=1).encode())
            _fsync(src)
            dst = os.path.join(self.directory, tag)
            if os.path.lexists(dst):  # an older save at the same step: replaced whole, never mixed
                old = os.path.join(staging, ".replaced")
                os.rename(dst, old)
            os.rename(src, dst)
            _fsync(self.directory)
            _write_atomic(os.path.join(self.directory, dsfmt.LATEST), tag.encode())
            for script in ("zero_to_fp32.py", "zero_to_torch.py"):
                if os.path.isfile(os.path.join(staging, script)) and not os.path.exists(
                    os.path.join(self.directory, script)
                ):
                    os.rename(os.path.join(staging, script), os.path.join(self.directory, script))
            shutil.rmtree(staging, ignore_errors=True)
        except OSError as exc:
            return f"commit failed: {exc.strerror or exc}"
        return ""

    def _tell(self, tag: str, step: int, reason: str, problem: str, stall: float) -> bool:
        """Rank 0: the daemon hears of the save as of a sharded unit's (``committed``: ok, or a
        failed save and why). False when there is no daemon: the save stays embedded."""
        if self.link is None or not self.link.connected:
            return False
        self.link.notify(
            {
                "type": "committed",
                "step": step,
                "path": os.path.join(self.directory, tag),
                "trigger": TRIGGERS.get(reason, reason),
                "ok": not problem,
                "reason": "uncommitted",
                "error": problem,
                "stall": stall,
            }
        )
        return True

    # -- what is on disk --------------------------------------------------------------------------

    def committed(self) -> list[tuple[int, str]]:
        """(step, tag) of the committed tags in the directory, oldest first."""
        return dsfmt.committed_tags(self.directory)

    def newest_committed(self) -> str | None:
        """The newest committed tag that verifies now (every rank's file there and loading)."""
        path = newest_committed(self.directory)
        return os.path.basename(path) if path else None

    def _retain(self) -> None:
        if not self.rules.any_window:
            return
        items = [
            retention.item_of(
                os.path.join(self.directory, tag),
                step,
                os.path.getmtime(os.path.join(self.directory, tag)),
                0,
                pinned=os.path.exists(os.path.join(self.directory, f".{tag}.pinned")),
            )
            for step, tag in self.committed()
        ]
        for v in retention.judge(items, self.rules, time.time()):
            if not v.keep:
                shutil.rmtree(v.item.id, ignore_errors=True)

    def _clean_staging(self) -> None:
        for n in os.listdir(self.directory):
            if n.startswith(STAGING):
                shutil.rmtree(os.path.join(self.directory, n), ignore_errors=True)


def for_engine(args: tuple[Any, ...], kwargs: dict[str, Any], engine: Any) -> EngineCheckpointer | None:
    """What ``Checkpointer(*args, engine=engine, **kwargs)`` makes when DeepSpeed is involved
    (None: it is not, the plain ``Checkpointer`` it is)."""
    if engine is None:
        engine = engine_behind(
            kwargs.get("model", args[2] if len(args) > 2 else None),
            kwargs.get("optimizer", args[3] if len(args) > 3 else None),
        )
    return EngineCheckpointer(*args, engine=engine, **kwargs) if engine is not None else None


def engine_behind(model: Any, optimizer: Any) -> Any:
    """The engine to save when a script hands ``Checkpointer`` DeepSpeed's pieces instead of the
    engine (``model=engine.module, optimizer=engine.optimizer``, or the engine as the model):
    a ZeRO optimizer holds a loss scaler and flat partitions, ZeRO-3 parameters are 0-element
    placeholders, neither can be saved as plain tensors. None when nothing is DeepSpeed's."""
    from trainer_hooks._state.state import StateError

    if is_engine(model):
        return model
    params = list(model.parameters()) if hasattr(model, "parameters") else []
    partitioned = any(hasattr(p, "ds_id") for p in params)
    if not partitioned and not type(optimizer).__module__.startswith("deepspeed."):
        return None
    engine = find_engine(model)
    if engine is None:
        raise StateError(
            "this model/optimizer is DeepSpeed's (ZeRO partitions, a loss scaler) and no engine "
            "wraps it: pass the engine, Checkpointer(job, dir, engine=engine)"
        )
    return engine


def find_engine(model: Any) -> Any:
    """The DeepSpeed engine wrapping ``model``, if any (a framework hands callbacks the bare
    module: HF Trainer and Accelerate keep the engine to themselves). None without DeepSpeed."""
    if model is None or "deepspeed" not in sys.modules:
        return None
    import gc

    for obj in gc.get_objects():
        if type(obj).__name__ == "DeepSpeedEngine" and getattr(obj, "module", None) is model and is_engine(obj):
            return obj
    return None


def client_state(tag_dir: str) -> dict[str, Any]:
    """What ckptd put in a committed tag's ``client_state`` (step, every rank's RNG, extra),
    read from the first model-states file as inert data."""
    from ckptd.foreign.picklesafe import safe_load

    for n in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if os.path.isfile(os.path.join(tag_dir, n)):
            states = safe_load(os.path.join(tag_dir, n), mmap=True)
            ours = states.get("ckptd") if isinstance(states, dict) else None
            return ours if isinstance(ours, dict) else {}
    return {}


def newest_committed(directory: str) -> str | None:
    """The newest committed tag of ``directory`` that verifies now (its path), else None."""
    tags = (
        sorted(
            (step_from_name(n) or -1, n)
            for n in os.listdir(directory)
            if not n.startswith(".") and os.path.isfile(os.path.join(directory, n, COMMIT))
        )
        if os.path.isdir(directory)
        else []
    )
    for _, tag in reversed(tags):
        foreign = _not_ours(os.path.join(directory, tag))
        if foreign:  # DeepSpeed's load_checkpoint unpickles what it reads: only this uid's own files
            log.warning("ckptd: skipping %s: %s", os.path.join(directory, tag), foreign)
            continue
        result = dsfmt.verify(os.path.join(directory, tag))
        if result.ok:
            return os.path.join(directory, tag)
        log.error("ckptd: skipping %s: %s", os.path.join(directory, tag), result.reason)
    return None


def hf_resume_dir(directory: str, job: str, scratch: str) -> str | None:
    """For HF Trainer + DeepSpeed: an HF checkpoint directory over the newest committed tag (None
    when there is none). HF's own resume then runs: ``engine.load_checkpoint`` on the tag (linked,
    not copied), its ``trainer_state.json`` and this rank's ``rng_state_R.pth`` from the tag's
    client_state. Each rank makes its own (they run this at once)."""
    import torch

    from trainer_hooks._ranks.shards import rank_and_world
    from trainer_hooks._resume.resume import say_resumed

    t0 = time.perf_counter()
    tag_dir = newest_committed(directory)
    ours = client_state(tag_dir) if tag_dir else {}
    step = int(ours.get("step", 0))
    say_resumed(job, step, tag_dir, "disk", time.perf_counter() - t0, directory)
    if tag_dir is None:
        return None
    rank, _ = rank_and_world()
    out = os.path.join(scratch, f"rank{rank}", f"checkpoint-{step}")
    shutil.rmtree(os.path.dirname(out), ignore_errors=True)
    os.makedirs(out)
    tag = os.path.basename(tag_dir)
    os.symlink(tag_dir, os.path.join(out, tag))
    with open(os.path.join(out, dsfmt.LATEST), "w") as f:
        f.write(tag)
    state = (ours.get("extra") or {}).get("hf_trainer_state")
    if state:
        with open(os.path.join(out, "trainer_state.json"), "w") as f:
            f.write(state)
    if isinstance(ours.get("scheduler"), dict):
        torch.save(ours["scheduler"], os.path.join(out, "scheduler.pt"))
    rngs = ours.get("rng") or []
    for r, rng in enumerate(rngs):
        hf = {"python": rng.get("python"), "numpy": rng.get("numpy"), "cpu": rng.get("torch")}
        torch.save(hf, os.path.join(out, f"rng_state_{r}.pth" if len(rngs) > 1 else "rng_state.pth"))
    return out


def _not_ours(tag_dir: str) -> str:
    """Why a tag is not this uid's own ("" when it is): the tag, and every file in it, must be owned
    by the trainer's uid and be no link (SPEC §6: the hook resumes only checkpoints its own uid owns;
    ``engine.load_checkpoint`` unpickles, so another uid's planted tag would run its code here)."""
    me = os.geteuid()
    for path in [tag_dir, *(os.path.join(tag_dir, n) for n in sorted(os.listdir(tag_dir)))]:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            return f"{path} is a symbolic link"
        if st.st_uid != me:
            return f"{path} is owned by uid {st.st_uid}, not by uid {me}"
    return ""


def state_guess(engine: Any, world_size: int) -> int:
    """One rank's bytes to save, guessed before the first save is timed: 16 bytes a parameter (fp32
    weights, master copy and Adam's two moments), partitioned over the ranks; ZeRO-3's placeholders
    count as the parameters they stand for (``ds_numel``)."""
    try:
        n = sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters())
    except Exception:  # noqa: BLE001 (a guess: an engine without a module gives none)
        return 0
    return 16 * n // max(1, world_size)


def _written_by(name: str) -> int | None:
    """The global rank that wrote a DeepSpeed file (data-parallel rank; rank 0 the shared ones)."""
    m = dsfmt.RANK_FILE.match(name)
    if m is None:
        return None
    return int(m.group("dp")) if m.group("dp") is not None else 0


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.ckptd-tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    _fsync(os.path.dirname(path))

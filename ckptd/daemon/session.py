"""One connected training run, as the daemon sees it (see ``ckptd.wire.protocol`` for the lifecycle).

A ``Session`` reads the run's messages on its own thread; its saves are persisted on
the daemon's executor, so a slow disk never stops the daemon from reading the next
message, and a save whose trainer has died is still persisted, verified and
catalogued. All per-job state lives in ``JobState``, under the lock of the daemon's
``Registry``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Protocol

from ckptd.core import missed
from ckptd.core.config import Config
from ckptd.core.policy import SavePolicy
from ckptd.core.settings import Settings, SettingsError, parse_table, resolve
from ckptd.core.vocab import FailReason, MissedReason, Trigger
from ckptd.daemon.access import Access
from ckptd.daemon.catalog import Catalog
from ckptd.daemon.jobkey import JobKey
from ckptd.daemon.jobstate import JobState
from ckptd.daemon.ledger import Ledger
from ckptd.daemon.memtier import MemoryTier
from ckptd.daemon.registry import Registry
from ckptd.daemon.uploads import Uploads
from ckptd.disk.owner import Identity, acting_as, as_daemon
from ckptd.disk.persist import Persisted, PersistError, seal
from ckptd.disk.preflight import TargetError, check_job
from ckptd.disk.remove import Removal
from ckptd.disk.scan import Checkpoint, read_info
from ckptd.disk.target import Target
from ckptd.foreign import deepspeed as dsfmt
from ckptd.remote.layout import job_prefix
from ckptd.save.pipeline import Hooks, commit_tag, commit_unit, failure, save_unit
from ckptd.wire import protocol

log = logging.getLogger(__name__)


class Host(Protocol):
    """What sessions and the CLI's requests need of the daemon (``ckptd.daemon.app.Daemon``).

    Written out so that neither imports the daemon's wiring: they see its job registry (the
    jobs, the one lock they are mutated under, the transitions of a job's life), the checks
    and records they share, nothing else.
    """

    config: Config
    roots: list[str]
    registry: Registry
    access: Access
    catalog: Catalog
    ledger: Ledger
    uploads: Uploads
    executor: ThreadPoolExecutor
    memory_executor: ThreadPoolExecutor
    memory: MemoryTier

    @property
    def stopping(self) -> bool: ...

    def request(self, session: "Session", msg: dict[str, Any]) -> None: ...


class Session:
    def __init__(self, daemon: "Host", sock: socket.socket) -> None:
        self.daemon = daemon
        self.sock = sock
        self.pid, self.uid, self.gid = protocol.peer_credentials(sock)
        self.identity = Identity.of(self.uid, self.gid)  # the rights its job's files are touched with
        self.job: JobState | None = None
        self.kwargs: dict[str, Any] | None = None  # the trainer's own settings: a reload resolves them again
        self.ended = False
        self._send_lock = threading.Lock()
        self._futures: list[Future[None]] = []

    # -- the read loop -------------------------------------------------------------------

    def run(self) -> None:
        try:
            while True:
                msg, fds = protocol.recv(self.sock)
                try:
                    self._dispatch(protocol.validate(msg), fds)
                except BaseException:
                    protocol.close_fds(fds)
                    raise
        except EOFError:
            pass
        except protocol.ProtocolError as exc:
            log.warning("client pid %d: %s; closing its connection", self.pid, exc)
            self.send({"type": "error", "error": str(exc)})
        except OSError:
            pass
        finally:
            self._disconnected()

    def send(self, msg: dict[str, Any], fd: int | None = None) -> bool:
        """Best effort: a vanished trainer must not fail a persist or the daemon."""
        try:
            with self._send_lock:
                protocol.send(self.sock, msg, fd=fd, limit=protocol.MAX_REPLY)
            return True
        except (OSError, protocol.ProtocolError):
            return False

    def _dispatch(self, msg: dict[str, Any], fds: list[int]) -> None:
        kind = msg["type"]
        if kind != "save" and fds:
            raise protocol.ProtocolError(f"{kind} must not carry file descriptors")
        if kind == "hello":
            self._hello(msg)
        elif self.job is None:
            self.daemon.request(self, msg)
        elif kind == "heartbeat":
            self._heartbeat(msg)
        elif kind == "save":
            self._save(msg, fds)
        elif kind == "skipped":
            self._count_missed(MissedReason.BACKPRESSURE)  # the hook skipped a save: on_busy="skip"
        elif kind == "committed":
            self._committed(msg)
        elif kind == "end":
            self._end(msg)
        else:
            self.daemon.request(self, msg)

    # -- hello ------------------------------------------------------------------------------

    def _hello(self, msg: dict[str, Any]) -> None:
        if self.job is not None:
            raise protocol.ProtocolError("hello sent twice")
        try:
            job = check_job(msg["job"])
            with acting_as(self.identity):  # resolved as the client would: no oracle, no other uid's path
                directory = self.daemon.access.directory(msg["directory"], self.uid)
            self.daemon.access.job(JobKey(job, directory), self.uid)
            kwargs = parse_table(msg["settings"], f"job {job}")
            settings, policy = self.resolved(self.daemon.config, job, directory, kwargs)
        except (TargetError, SettingsError, ValueError, PermissionError) as exc:
            self.send({"type": "error", "error": str(exc)})
            raise protocol.ProtocolError(f"hello refused: {exc}") from None
        self.kwargs = kwargs
        self.job = self.daemon.registry.register(
            job, self.uid, self.pid, directory, settings, policy, msg["step"], self
        )
        log.info(
            "job %s: trainer pid %d (uid %d) connected at step %d, directory %s; %s",
            job,
            self.pid,
            self.uid,
            msg["step"],
            directory,
            _described(settings),
        )
        self.sock.settimeout(None)  # a trainer may be quiet for as long as an evaluation takes
        self.job.world_size = max(1, _count(msg.get("world_size")))
        self.job.state_bytes = _count(msg.get("state_bytes"))
        self.job.sharded = msg.get("sharded") is True
        self.job.memory_budget = self.daemon.memory.budget
        self.daemon.ledger.hook_version(self.job.key, _version(msg.get("version")))
        self.send({"type": "welcome", "job": job, "directory": directory})

    def resolved(self, config: Config, job: str, directory: str, kwargs: dict[str, Any]) -> tuple[Settings, SavePolicy]:
        """The job's settings (its trainer's kwargs over ``config``'s tables) with what only the daemon
        decides filled in: at hello, and again for a connected job when the configuration is reloaded."""
        settings = resolve(kwargs, {}, config.job_table(job), config.defaults)
        policy = SavePolicy.from_settings(settings.group("policy"))
        if settings.remote:  # the store, its endpoint and the job's key prefix: the daemon's word
            endpoint = self.daemon.access.remote(settings.remote, kwargs.get("remote_endpoint"))
            settings = settings.but(remote_endpoint=endpoint, remote_prefix=job_prefix(job, directory, self.uid))
        if settings.quarantine_dir:  # the daemon moves files there: it must be a place the client may use
            with acting_as(self.identity):
                quarantine = self.daemon.access.directory(settings.quarantine_dir, self.uid, must_exist=False)
            settings = settings.but(quarantine_dir=quarantine)
        return settings, policy

    # -- heartbeats and missed steps --------------------------------------------------------

    def _heartbeat(self, msg: dict[str, Any]) -> None:
        assert self.job is not None
        now = time.time()
        with self.daemon.registry.lock:
            j = self.job
            j.observe(msg["step"], now)
            due = missed.skipped_step(j.policy, j.last_saved_step, j.step, j.flagged_due)
            if due is not None:
                j.flagged_due = due
        if due is not None:
            log.warning("job %s: step %d was due for a save and the trainer went past it", j.name, due)
            self._count_missed(MissedReason.STEP_SKIPPED)

    def _count_missed(self, reason: MissedReason) -> None:
        assert self.job is not None
        with self.daemon.registry.lock:
            self.job.missed += 1
        self.daemon.ledger.missed(self.job.key, reason, step=self.job.step)

    # -- saves ------------------------------------------------------------------------------

    def _save(self, msg: dict[str, Any], fds: list[int]) -> None:
        assert self.job is not None
        if len(fds) != 1:
            raise protocol.ProtocolError("save must carry exactly one memfd")
        problem = protocol.snapshot_problem(fds[0], msg["length"])
        if problem:
            raise protocol.ProtocolError(f"save: {problem}")
        name = msg["filename"]
        if "/" in name or name.startswith(".") or not name.endswith(".safetensors"):
            raise protocol.ProtocolError(f"save: invalid file name {name!r}")
        msg = {**msg, "trigger": Trigger.of(msg["trigger"])}  # a label value: a client must not grow the series
        memory_only = msg.get("memory_only") is True
        with self.daemon.registry.lock:
            # the hook reuses its buffers (one for disk saves, one for memory-only saves): a second save
            # of a kind before the first's "saved" reply is no trainer's
            if self.job.in_flight_memory if memory_only else self.job.in_flight:
                raise protocol.ProtocolError("save: one save of a kind at a time per job; wait for its saved reply")
            self.job.in_flight += not memory_only
            self.job.in_flight_memory += memory_only
            if not memory_only:  # a snapshot kept in memory only is not a saved step (the disk says what is)
                self.job.last_saved_step = max(self.job.last_saved_step, msg["step"])
            self.job.observe(msg["step"], time.time())
        self.send({"type": "accepted", "id": msg["id"]})
        if memory_only:
            self._futures.append(self.daemon.memory_executor.submit(self._remember, self.job, msg, fds[0]))
        else:
            self._futures.append(self.daemon.executor.submit(self._persist, self.job, msg, fds[0]))

    def _remember(self, job: JobState, msg: dict[str, Any], fd: int) -> None:
        """Executor thread, ``every_memory``: a snapshot for the memory tier only. Sealed (digests)
        like a save, checked to be the job and step it claims, then kept as the job's newest."""
        reply: dict[str, Any] = {"type": "saved", "id": msg["id"], "step": msg["step"], "memory": True}
        t0 = time.monotonic()
        try:
            header = seal(fd, msg["length"])
            if header.metadata.get("ckptd.job") != job.name or header.metadata.get("ckptd.step") != str(msg["step"]):
                raise PersistError(FailReason.INVALID_SNAPSHOT, "the snapshot is not the job and step it claims")
            if not self.daemon.memory.keep(job.key, fd, msg["length"], msg["step"], "", time.time(), **_whose(job)):
                raise PersistError(FailReason.NO_SPACE, "the snapshot does not fit the memory budget")
            seconds = time.monotonic() - t0
            with self.daemon.registry.lock:
                job.kept_in_memory(time.time(), _reported_seconds(msg, ("stall",)).get("stall"), seconds)
            self.daemon.ledger.remembered(job.key, msg["step"], msg["length"], seconds)
            reply.update(ok=True, path=None)
        except Exception as exc:  # costs nothing on disk: said, not paged (no save_failures count)
            error = failure(exc, msg["step"])
            log.warning("job %s: step %d not kept in memory (%s): %s", job.name, msg["step"], error.reason, error)
            reply.update(ok=False, reason=error.reason, error=str(error))
        finally:
            os.close(fd)
            with self.daemon.registry.lock:
                job.in_flight_memory -= 1
        self.send(reply)

    def _persist(self, job: JobState, msg: dict[str, Any], fd: int) -> None:
        """Executor thread: the save pipeline (``ckptd.save.pipeline``), then the reply."""
        reply: dict[str, Any] = {"type": "saved", "id": msg["id"], "step": msg["step"]}
        try:
            with acting_as(self.identity):  # every file of the save as its owner (ckptd.disk.owner)
                result = save_unit(
                    self._target(job),
                    fd,
                    msg["length"],
                    msg["filename"],
                    msg["step"],
                    self._hooks(job, msg, ("stall",)),
                )
            reply.update(ok=True, path=result.path)
            self._keep_in_memory(job, fd, msg, result.path)
        except Exception as exc:  # never lose the daemon to one save
            error = failure(exc, msg["step"])
            self.daemon.registry.save_failed(job, msg["trigger"], error)
            reply.update(ok=False, reason=error.reason, error=str(error))
        finally:
            os.close(fd)
            with self.daemon.registry.lock:
                job.in_flight -= 1
        self.send(reply)

    def _keep_in_memory(self, job: JobState, fd: int, msg: dict[str, Any], path: str) -> None:
        """The memory tier (SPEC §14): the verified snapshot, copied before the reply frees the
        trainer's buffer. It is a cache: failing to keep it costs nothing saved."""
        try:
            if self.daemon.memory.keep(job.key, fd, msg["length"], msg["step"], path, time.time(), **_whose(job)):
                with self.daemon.registry.lock:
                    job.kept_in_memory(time.time(), None, None)
        except OSError as exc:
            log.warning("job %s: step %d not kept in memory: %s", job.name, msg["step"], exc)

    def _target(self, job: JobState) -> Target:
        """The job's directory as every write and deletion for this client must find it: under the
        roots, reached without a link, and (unless the client is privileged) still owned by it."""
        d = self.daemon
        return Target(
            job.directory, job.name, job.settings, d.roots, owner=None if d.access.privileged(self.uid) else self.uid
        )

    def _hooks(
        self,
        job: JobState,
        msg: dict[str, Any],
        reported: tuple[str, ...],
        unit: bool = False,
        info_of: Callable[[str], Checkpoint] = read_info,
    ) -> Hooks:
        """Stages 5 and 7 as the daemon runs them: catalogue and count, then the uploader.
        (That a snapshot is the job and step it claimed was checked by ``persist`` before a
        byte was written: ``save_unit`` passes them as ``expect``.) A sharded ``unit`` was
        announced, not sent: its step counts only now, and the catalogue drops the units
        its ranks' retention removed meanwhile (``info_of`` reads what it is: a DeepSpeed tag
        from its commit record). They run inside the owner's rights (the files)
        and step back to the daemon's for its own records (``as_daemon``)."""
        d = self.daemon
        seen: dict[str, Checkpoint] = {}  # the header read at commit, for the upload too

        def committed(result: Persisted) -> None:
            info = seen[result.path] = info_of(result.path)
            if unit:
                with d.registry.lock:
                    job.last_saved_step = max(job.last_saved_step, info.step)
                    job.step = max(job.step, info.step)
                with as_daemon():
                    rows = d.catalog.checkpoints(*job.key)
                gone = [r.path for r in rows if not os.path.exists(r.path)]
            with as_daemon():
                if unit:
                    d.catalog.forget(gone)
                d.catalog.record(info, verified=True, uid=job.uid)
                d.registry.save_succeeded(
                    job,
                    msg["trigger"],
                    info,
                    {**result.durations, **_reported_seconds(msg, reported)},
                    _reported_seconds(msg, ("cost",)).get("cost"),
                )

        def replicate(result: Persisted) -> None:
            if job.settings.remote:
                info = seen.get(result.path) or read_info(result.path)
                with as_daemon():
                    d.uploads.submit(job.key, job.settings, result.path, info.created, job.uid, result.fd)

        def removed(removals: list[Removal]) -> None:
            with as_daemon():
                d.ledger.removed(job.key, removals)

        return Hooks(removed=removed, committed=committed, replicate=replicate)

    def _committed(self, msg: dict[str, Any]) -> None:
        """A sharded checkpoint its ranks wrote and agreed on: stages 5-7 of the pipeline
        (``commit_unit``: the guard, its manifest and shards checked, catalogue, retention), or
        a DeepSpeed engine job's committed tag (``commit_tag``: every rank's file verified)."""
        job, d = self.job, self.daemon
        assert job is not None
        trigger = Trigger.of(msg["trigger"])
        if not msg.get("ok", True):
            with (
                d.registry.lock
            ):  # attempted at its step, as a plain save is once sent: a failure pages, not a skip too
                job.last_saved_step = max(job.last_saved_step, msg["step"])
            d.registry.save_failed(
                job,
                trigger,
                PersistError(FailReason.of(msg.get("reason", FailReason.UNCOMMITTED)), str(msg.get("error"))),
            )
            return
        with acting_as(self.identity):
            path = os.path.realpath(msg["path"])
            inside_job = os.path.dirname(path) == os.path.realpath(job.directory)
            tag = dsfmt.is_committed(path)
        if not inside_job:
            raise protocol.ProtocolError(f"committed: {msg['path']} is not in the job's directory")
        reported = ("stall", "persist", "verify")
        try:
            with acting_as(self.identity):
                if tag:
                    commit_tag(
                        self._target(job),
                        os.path.basename(path),
                        msg["step"],
                        self._hooks(job, {**msg, "trigger": trigger}, reported, True, dsfmt.committed_info),
                    )
                else:
                    commit_unit(
                        self._target(job),
                        os.path.basename(path),
                        msg["step"],
                        self._hooks(job, {**msg, "trigger": trigger}, reported, unit=True),
                    )
        except Exception as exc:  # refused by the guard, or it does not verify: a failed save, counted
            d.registry.save_failed(job, trigger, failure(exc, msg["step"]))

    # -- the end ---------------------------------------------------------------------------

    def _wait_in_flight(self, timeout: float = 600) -> None:
        for f in list(self._futures):
            try:
                f.result(timeout)
            except Exception:
                pass

    def _end(self, msg: dict[str, Any]) -> None:
        assert self.job is not None
        self._wait_in_flight()
        self.ended = True
        with self.daemon.registry.lock:
            self.job.step = max(self.job.step, msg["step"])
            lost = missed.final_missing(self.job.policy, msg["step"], self.job.last_verified_step)
        if lost:
            self._count_missed(MissedReason.FINAL_MISSING)
        log.info(
            "job %s: trainer pid %d ended its run at step %d; newest verified step %d%s",
            self.job.name,
            self.pid,
            msg["step"],
            self.job.last_verified_step,
            " (its final save is missing)" if lost else "",
        )
        self.send({"type": "bye"})

    def _disconnected(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
        if self.job is None:
            return
        self._wait_in_flight()
        with self.daemon.registry.lock:
            unsaved = missed.unsaved_at_exit(self.job.step, self.job.last_verified_step)
        if not self.ended and unsaved > 0 and not self.daemon.stopping:  # a daemon's restart is no trainer's exit
            log.warning("job %s: trainer pid %d went away with %d unsaved steps", self.job.name, self.pid, unsaved)
            self._count_missed(MissedReason.TRAINER_EXIT_UNSAVED)
        self.daemon.registry.unregister(self.job, self.ended, self.daemon.stopping)


def _described(settings: Settings) -> str:
    """The resolved policy and retention, for the connect line: what this job will be held to."""
    keys = {**settings.group("policy"), **settings.group("retention"), **settings.group("quota")}
    return "; ".join(f"{k}={v}" for k, v in sorted(keys.items()) if v is not None) or "no save rule"


def _version(value: Any) -> str:
    """The hook's version from hello, a label value: a short version string, or "unknown"."""
    ok = isinstance(value, str) and 0 < len(value) <= 32 and all(c.isalnum() or c in ".+-_" for c in value)
    return value if ok else "unknown"


def _whose(job: JobState) -> dict[str, Any]:
    """Whose snapshot the memory tier keeps, and for which directory (an fd of it, which the tier
    holds with the snapshot): a resume from memory needs both to be the asker's now (L9)."""
    return {"owner": job.uid, "directory_fd": os.open(job.directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)}


def _count(value: Any) -> int:
    """An untrusted field that must be a non-negative int (bools are not); 0 when it is not."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _reported_seconds(msg: dict[str, Any], keys: tuple[str, ...]) -> dict[str, float]:
    """Durations a hook reports for the histograms: untrusted, so only non-negative numbers count."""
    return {
        k: float(msg[k])
        for k in keys
        if isinstance(msg.get(k), (int, float)) and not isinstance(msg[k], bool) and msg[k] >= 0
    }

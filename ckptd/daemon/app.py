"""``ckptd serve``: the host daemon that trainers hand their checkpoints to.

Start-up, in order: open (or rebuild) the catalogue and reconcile it with the roots;
remove temp files of dead writers; serve ``/metrics`` and ``/healthz``; bind the
socket (mode 0660); start the accept thread and the scheduler (a one-second tick for
overdue saves, gauges and the systemd watchdog); tell systemd READY=1. Shutdown on
SIGTERM: stop accepting, let in-flight persists finish (bounded), close, STOPPING=1.
"""

from __future__ import annotations

import grp
import logging
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from ckptd.core.config import Config, default_state_dir
from ckptd.core.policy import SavePolicy
from ckptd.core.settings import Settings
from ckptd.core.units import parse_listen
from ckptd.daemon import schedlog, sdnotify
from ckptd.daemon.access import Access
from ckptd.daemon.catalog import Catalog
from ckptd.daemon.instance import InstanceLock
from ckptd.daemon.jobkey import JobKey
from ckptd.daemon.jobstate import TICK, JobState
from ckptd.daemon.ledger import Ledger
from ckptd.daemon.listener import Listener
from ckptd.daemon.memtier import MemoryTier, budget_of
from ckptd.daemon.metrics import HttpLimits, JobGauges, Metrics, serve_http
from ckptd.daemon.registry import ENDED_JOB_TTL, Registry
from ckptd.daemon.session import Session
from ckptd.daemon.uploads import Uploads
from ckptd.daemon.watch import Context, Watching
from ckptd.disk.owner import acting_as, owner_of
from ckptd.disk.persist import cleanup_temp
from ckptd.disk.preflight import TargetError, free_bytes
from ckptd.disk.remove import inside
from ckptd.wire import protocol

log = logging.getLogger(__name__)
SWEEP_EVERY = 30.0  # seconds between sweeps of the roots for checkpoints saved without the daemon
MAX_UNATTENDED_JOBS = 64  # jobs found by the sweep that get series (job names there come from file headers)
OVERDUE_GRACE = 60.0
MAX_CONNECTIONS_PER_UID = 64  # unprivileged uids; root and admins are not capped
MAX_JOBS_PER_UID = 64  # jobs connected or ended within ENDED_JOB_TTL: each is a set of metric series
HELLO_TIMEOUT = 10.0  # seconds a new connection has to send its first message


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        socket_path: str | None = None,
        state_dir: str | None = None,
        metrics_listen: str | None = None,
        roots: Sequence[str] | None = None,
        overdue_grace: float = OVERDUE_GRACE,
    ) -> None:
        d = config.daemon
        self.config = config
        self.socket_path = socket_path or d.socket or protocol.default_socket_path()
        self.state_dir = state_dir or d.state_dir or default_state_dir(os.getuid(), os.environ, os.path.expanduser("~"))
        self.metrics_listen = metrics_listen or d.metrics_listen or "127.0.0.1:9733"
        self.roots = [os.path.realpath(r) for r in (roots if roots is not None else d.roots)]
        self.group_gid = _gid(d.group, "group")  # who may connect (the socket's group)
        self.admin_gid = _gid(d.admin_group, "admin_group")  # who may act on every job
        self.overdue_grace = overdue_grace
        self.max_connections_per_uid = d.max_connections_per_uid or MAX_CONNECTIONS_PER_UID
        self.max_jobs_per_uid = d.max_jobs_per_uid or MAX_JOBS_PER_UID
        self.lock = threading.RLock()  # the registry's, and the session set's: the daemon's one lock
        self.sessions: set[Session] = set()
        self.metrics = Metrics()
        self.metrics.registry.register(JobGauges(self._job_gauges))
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckptd-persist")
        # memory-only saves (a copy and a hash) never queue behind the disk's persists
        self.memory_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckptd-memory")
        self.memory = MemoryTier(budget_of(d.memory_budget))
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._started_with = config  # what a reload cannot change (socket, state_dir, metrics_listen, [[watch]])
        self._ready = threading.Event()  # set when start() has finished: /healthz says 503 until then
        self._threads: list[threading.Thread] = []
        self.clock = time.time
        self.started_at = time.time()
        self.watching: Watching | None = None
        self._unhealthy: list[str] = []  # the failing health checks the watchdog last saw
        self._unattended: set[JobKey] = set()  # jobs the sweep gave series (MAX_UNATTENDED_JOBS)

    # -- lifecycle ----------------------------------------------------------------------

    def check(self) -> str:
        """``ckptd serve --check``: what ``start`` would refuse, found without starting (nothing is
        bound, locked or written); the summary of what it would run with."""
        _check_roots(self.roots)
        parse_listen(self.metrics_listen)
        for w in self.config.watch:
            if not inside(os.path.realpath(w.path), self.roots):
                raise TargetError(f"watched path {w.path} is outside the daemon's roots")
        for what, path in (("state_dir", self.state_dir), ("socket", os.path.dirname(self.socket_path))):
            existing = path
            while not os.path.isdir(existing) and existing not in ("", "/"):
                existing = os.path.dirname(existing)
            if not os.access(existing or "/", os.W_OK | os.X_OK):
                raise TargetError(f"{what} {path}: uid {os.getuid()} cannot write {existing}")
        return (
            f"roots {', '.join(self.roots)}; socket {self.socket_path}; state_dir {self.state_dir}; metrics on "
            f"{self.metrics_listen}; {len(self.config.jobs)} [jobs] tables, {len(self.config.watch)} [[watch]]"
        )

    def start(self) -> None:
        _check_roots(self.roots)
        _raise_fd_limit()
        self.instance = InstanceLock(self.socket_path, self.state_dir)  # before anything is opened or bound
        try:
            self.catalog = Catalog(self.state_dir)
        except OSError as exc:
            raise TargetError(
                f"state_dir {self.state_dir}: cannot keep the catalogue there ({exc.strerror or exc}); "
                f"set [daemon] state_dir (or --state-dir) to a directory uid {os.getuid()} may write"
            ) from None
        self.ledger = Ledger(self.metrics, self.catalog)
        self.scheduler = self._scheduler()  # started once the socket is bound
        self.registry = Registry(self.lock, self.catalog, self.metrics, self.ledger, self.scheduler)
        self.access = Access(
            self.roots,
            self.catalog,
            self.admin_gid,
            self.max_jobs_per_uid,
            self.registry.live,
            self.config.daemon.remote_allow,
            self.config.daemon.remote_endpoint,
        )
        counts = self.catalog.reconcile(self.roots)
        log.info("catalogue %s (%s): %s", self.catalog.path, "rebuilt" if self.catalog.rebuilt else "opened", counts)
        self._cleanup_temp()
        self.uploads = Uploads(self.metrics, self.catalog, self.ledger, self.access, self.roots)
        self.uploads.resync()
        self._refresh_free()  # from the first scrape on, not from the first tick
        self.ledger.restore_failures(time.time() - ENDED_JOB_TTL)
        self.http = serve_http(
            self.metrics, self.metrics_listen, self.health, self._http_limits(), self._owner_of, self._http_status
        )
        self.listener = Listener(self.socket_path, self.group_gid, self._admit)
        self.scheduler.start()
        self._start_watchers()
        self.ledger.refresh_all()
        self._ready.set()
        sdnotify.notify("READY=1", f"STATUS=listening on {self.socket_path}")
        log.info("ckptd serving on %s, metrics on %s", self.socket_path, self.metrics_listen)

    def _http_limits(self) -> HttpLimits:
        d, default = self.config.daemon, HttpLimits()
        return HttpLimits(
            d.max_http_connections or default.connections,
            d.max_http_connections_per_peer or default.per_peer,
            d.http_request_timeout or default.deadline,
        )

    def _scheduler(self) -> Any:
        """APScheduler owns everything periodic: the tick, the sweep, the scrub, the systemd
        watchdog, and each job's cron rule (``Registry``)."""
        from apscheduler.schedulers.background import BackgroundScheduler

        logging.getLogger("apscheduler").setLevel(logging.WARNING)
        schedlog.install()  # "skipped: maximum number of running instances" once in a while, with a count
        sched = BackgroundScheduler(
            daemon=True, job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30}
        )
        sched.add_job(self._tick_job, "interval", seconds=TICK, id="tick")
        sched.add_job(self.sweep, "interval", seconds=SWEEP_EVERY, id="sweep")
        scrub = self.config.daemon.scrub_every
        if scrub:
            sched.add_job(self.scrub, "interval", seconds=float(scrub), id="scrub")
        interval = sdnotify.watchdog_interval()
        if interval:
            sched.add_job(self._watchdog, "interval", seconds=interval, id="watchdog")
        return sched

    def _start_watchers(self) -> None:
        if not self.config.watch:
            return
        self.watching = Watching(
            self.config.watch, Context(self.catalog, self.ledger, self.roots, self.started_at, self.clock)
        )
        for w in self.watching.watchers:
            if not inside(w.root, self.roots):
                raise TargetError(f"watched path {w.root} is outside the daemon's roots")
        self.watching.start(
            self.metrics, lambda fn, seconds, id: self.scheduler.add_job(fn, "interval", seconds=seconds, id=id)
        )

    def scrub(self) -> dict[str, int]:
        from ckptd.daemon.scrub import scrub

        return scrub(self.catalog, self.ledger)

    def sweep(self) -> int:
        """Checkpoints under the roots that no connected trainer handed over: a trainer saving in
        embedded mode (the daemon was down, its socket refused it) is seen within ``SWEEP_EVERY``.
        One walk of the roots' directories; only new files' headers are read. Connected jobs'
        directories and watched trees are skipped (their sessions and watchers record them)."""
        busy = self.registry.connected_directories()
        watched = [w.root for w in self.watching.watchers] if self.watching is not None else []
        found = self.catalog.sweep(self.roots, lambda d: d in busy or inside(d, watched))
        for info in found:
            key = JobKey(info.job, os.path.dirname(info.path))
            if not info.ok or not _valid_job(info.job):
                continue
            if key not in self._unattended and len(self._unattended) >= MAX_UNATTENDED_JOBS:
                log.warning(
                    "job %s: step %d saved without the daemon: %s (no series: %d such jobs already)",
                    key,
                    info.step,
                    info.path,
                    MAX_UNATTENDED_JOBS,
                )
                continue
            self._unattended.add(key)
            self.ledger.unattended(key, info)
            self.metrics.job_ended(key, time.time())  # its series go ENDED_JOB_TTL after, unless it connects
        return len(found)

    def _owner_of(self, key: JobKey) -> str:
        """The ``user`` label of a job's series: its owner's name, from the catalogue (a watched
        tree's: its directory's owner)."""
        from ckptd.daemon.metrics import owner_name

        uid = self.catalog.job_owner(key)
        if uid is None:
            try:
                uid = os.stat(key.directory).st_uid
            except OSError:
                return ""
        return owner_name(uid)

    def _http_status(self) -> dict[str, Any]:
        """``/status`` on the metrics port: what ``ckptd status --json`` says of every job, and the host."""
        from ckptd import __version__
        from ckptd.daemon import requests

        return {
            "host": socket.gethostname(),
            "version": __version__,
            "time": time.time(),
            "socket": self.socket_path,
            "started_at": self.started_at,
            "jobs": requests.job_rows(self, None),
        }

    def _tick_job(self) -> None:
        try:
            self.tick(time.time())
        except Exception:
            log.exception("tick failed")

    def _spawn(self, target: Any, name: str) -> threading.Thread:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)
        return t

    def serve_forever(self) -> None:
        """Run until SIGTERM/SIGINT, then drain; SIGHUP re-reads the configuration."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())
        self.start()
        # Woken twice a second: the kernel may deliver SIGTERM to any of the daemon's threads, and
        # CPython runs the Python handler only when the main thread runs; blocked in a wait with no
        # timeout it never would, and the daemon would ignore SIGTERM (seen in CI, under load).
        while not self._stop.wait(0.5):
            if self._reload.is_set():
                self._reload.clear()
                try:
                    self.reload()
                except Exception:  # a reload never takes the daemon down
                    log.exception("reload failed; the running configuration stays")
        self.stop()

    def reload(self) -> bool:
        """SIGHUP (``systemctl reload``): re-read the configuration file and apply what can change
        under running trainers: policies, retention and quota for every job (connected ones keep
        their connection and their own kwargs on top), the roots and ``remote_allow``. A file
        that does not validate changes nothing: the running configuration stays, and the log
        says why. What needs a restart (socket, state_dir, metrics_listen, watch tables) is named."""
        from ckptd.core import config as config_mod

        path = self.config.path
        sdnotify.notify("RELOADING=1", f"STATUS=reloading {path}")
        try:
            if path is None:
                raise TargetError("the daemon was started without a configuration file; nothing to re-read")
            cfg = config_mod.load(path)
            roots = [os.path.realpath(r) for r in cfg.daemon.roots]
            _check_roots(roots)
        except (ValueError, OSError) as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
            sdnotify.notify("READY=1", "STATUS=reload refused; running on the previous configuration")
            return False
        with self.lock:
            self.config, self.roots[:] = cfg, roots
            self.access.remote_allow[:] = [u.rstrip("/") for u in cfg.daemon.remote_allow]
            self.access.remote_endpoint = cfg.daemon.remote_endpoint
        resolved = self._resolve_connected(cfg)
        with self.lock:
            for job, values, policy in resolved:
                job.settings, job.policy = values, policy
        was = self._started_with.daemon
        fixed = [k for k in ("socket", "state_dir", "metrics_listen") if getattr(cfg.daemon, k) != getattr(was, k)]
        if cfg.watch != self._started_with.watch:
            fixed.append("[[watch]]")
        log.info(
            "reloaded %s: %d connected jobs re-resolved, roots %s%s",
            path,
            len(resolved),
            ", ".join(roots),
            f"; {', '.join(fixed)} changed and take effect at the next restart" if fixed else "",
        )
        sdnotify.notify("READY=1", f"STATUS=reloaded {path}")
        return True

    def _resolve_connected(self, cfg: Config) -> list[tuple[JobState, Settings, SavePolicy]]:
        """Each connected job's settings under ``cfg``, its trainer's own kwargs still on top. A job
        the new configuration refuses (its remote no longer allowed) keeps what it had, and the log
        names it: a reload never drops a trainer."""
        with self.lock:
            sessions = [s for s in self.sessions if s.job is not None and s.kwargs is not None]
        out = []
        for s in sessions:
            assert s.job is not None and s.kwargs is not None
            try:
                values, policy = s.resolved(cfg, s.job.name, s.job.directory, s.kwargs)
            except (ValueError, PermissionError) as exc:
                log.warning("reload: job %s keeps its previous settings: %s", s.job.key, exc)
                continue
            out.append((s.job, values, policy))
        return out

    def stop(self, drain_timeout: float = 60.0) -> None:
        sdnotify.notify("STOPPING=1", "STATUS=draining in-flight saves")
        self._stop.set()
        self.listener.close()
        with self.lock:
            sessions = list(self.sessions)
            connected = sorted(j.name for j in self.registry.jobs.values() if j.connected)
        log.info(
            "ckptd stopping: %d trainers connected (%s); in-flight saves drain for up to %.0fs; the trainers "
            "carry on and reconnect to the next daemon",
            len(connected),
            ", ".join(connected) or "none",
            drain_timeout,
        )
        for s in sessions:
            try:
                s.sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        deadline = time.monotonic() + drain_timeout
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))
        self.executor.shutdown(wait=True, cancel_futures=False)
        self.memory_executor.shutdown(wait=True, cancel_futures=False)
        self.uploads.close(timeout=10)
        self.scheduler.shutdown(wait=False)
        if self.watching is not None:
            self.watching.stop()
        self.http.shutdown()
        self.http.server_close()
        self.catalog.close()
        self.memory.close()
        self.instance.release()
        log.info("ckptd stopped")

    def _admit(self, conn: socket.socket) -> None:
        """A session per connection, within ``max_connections_per_uid`` for unprivileged uids;
        until its first message it has ``HELLO_TIMEOUT`` seconds to say something."""
        try:
            session = Session(self, conn)
        except OSError:
            conn.close()
            return
        capped = not self.access.privileged(session.uid)
        with self.lock:
            mine = sum(1 for s in self.sessions if s.uid == session.uid)
            refused = capped and mine >= self.max_connections_per_uid
            if not refused:
                self.sessions.add(session)
        if refused:
            session.send(
                {
                    "type": "error",
                    "error": f"uid {session.uid} already holds {mine} connections (max_connections_per_uid)",
                }
            )
            conn.close()
            return
        conn.settimeout(HELLO_TIMEOUT)
        try:
            self._spawn(lambda s=session: self._run_session(s), f"ckptd-client-{session.pid}")
        except BaseException:  # no thread (RuntimeError: can't start new thread): the listener refuses it
            with self.lock:
                self.sessions.discard(session)
            raise

    def _run_session(self, session: Session) -> None:
        try:
            session.run()
        finally:
            with self.lock:
                self.sessions.discard(session)
            me = threading.current_thread()
            self._threads = [t for t in self._threads if t is not me]

    def _watchdog(self) -> None:
        """``WATCHDOG=1`` only while every check of ``health`` (``/healthz``) passes: a daemon
        whose socket no longer accepts is restarted by systemd after ``WatchdogSec=``, not kept
        alive by a scheduler that still ticks."""
        checks = self.health()
        failing = sorted(name for name, ok in checks.items() if not ok)
        if not failing:
            sdnotify.notify("WATCHDOG=1")
            if self._unhealthy:
                log.info("healthy again: the systemd watchdog is fed again")
        elif failing != self._unhealthy:
            log.error("unhealthy (%s failing): the systemd watchdog is no longer fed", ", ".join(failing))
            sdnotify.notify(f"STATUS=unhealthy: {', '.join(failing)} failing; the watchdog is not fed")
        self._unhealthy = failing

    @property
    def stopping(self) -> bool:
        """Is the daemon shutting down? Its trainers' connections then end by the daemon's hand,
        not by the trainers': nothing is a trainer exit (``Session._disconnected``)."""
        return self._stop.is_set()

    def health(self) -> dict[str, bool]:
        """Served before start() ends (the HTTP port opens early), so "started" gates readiness:
        a probe must not see a daemon whose watchers and scheduler are not up yet as healthy."""
        if not self._ready.is_set():
            return {"started": False}
        return {
            "started": True,
            "socket": not self._stop.is_set() and self.listener.alive,
            "catalog": self.catalog.healthy(),
            "scheduler": bool(self.scheduler.running),
        }

    def _job_gauges(self, now: float) -> list[tuple[JobKey, dict[str, float]]]:
        """Scrape time: every known job's state gauges (``JobGauges``), watched trees' too."""
        rows = self.registry.gauges(now, self.uploads.lag(now), self.memory.held)
        return rows + (self.watching.gauges() if self.watching is not None else [])

    # -- the one-second tick ---------------------------------------------------------------

    def _refresh_free(self) -> None:
        for root in self.roots:
            try:
                self.metrics.fs_free.labels(root).set(free_bytes(root))
            except OSError:
                pass

    def tick(self, now: float) -> None:
        """Once a second (APScheduler): each job's overdue and due rules, the watched trees',
        free space, and the series and states of jobs ended ``ENDED_JOB_TTL`` ago."""
        self.registry.tick(now, self.overdue_grace)
        if self.watching is not None:
            self.watching.tick(now)
        self._refresh_free()
        self._unattended.difference_update(self.metrics.drop_ended(now, ENDED_JOB_TTL))
        self.registry.expire(now)
        running, known = self.registry.counts()
        sdnotify.notify(f"STATUS={running} jobs connected, {known} known")

    def _cleanup_temp(self) -> None:
        dirs = {k.directory for k, _ in self.catalog.jobs()} | {
            os.path.dirname(r.path) for r in self.catalog.checkpoints()
        }
        for d in dirs:
            if inside(d, self.roots):
                try:
                    with acting_as(owner_of(d)):  # a job's files, as their owner (ckptd.disk.owner)
                        removed = cleanup_temp(d)
                except OSError:
                    continue
                for name in removed:
                    log.info("removed abandoned temp file %s/%s", d, name)

    # -- CLI requests (ckptd.daemon.requests) ------------------------------------------------------

    def request(self, session: Session, msg: dict[str, Any]) -> None:
        from ckptd.daemon import requests

        requests.handle(self, session, msg)


def _check_roots(roots: Sequence[str]) -> None:
    if not roots:
        raise TargetError(
            "no roots configured: set [daemon] roots to the directories checkpoints may be written to and deleted from"
        )
    for root in roots:
        if not os.path.isdir(root):
            raise TargetError(f"root {root} does not exist: create it (and name it in the unit's ReadWritePaths=)")
        if not os.access(root, os.W_OK | os.X_OK):
            raise TargetError(f"root {root} is not writable by the daemon (uid {os.getuid()})")


def _valid_job(name: str) -> bool:
    """A job name read from a file's header: a label value only if a hello could have named it."""
    from ckptd.disk.preflight import check_job

    try:
        check_job(name)
        return True
    except (TargetError, ValueError):
        return False


def _raise_fd_limit() -> None:
    """Up to the hard limit: every client connection and every open checkpoint is a descriptor."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _gid(name: str | None, key: str) -> int | None:
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise TargetError(f"[daemon] {key} {name!r} does not exist") from None

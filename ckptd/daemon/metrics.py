"""Prometheus metrics (SPEC §8) and the small HTTP server that serves them.

Names and labels are a contract with dashboards and alert rules. Labels are bounded:
training_job, trigger, outcome, reason, phase, rule, root; never a step or a path. Jobs that
ended are dropped after ``ended_job_ttl`` so a host that runs thousands of short
jobs does not grow its series forever.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from ckptd import __version__
from ckptd.core.units import parse_listen
from ckptd.core.vocab import DeleteRule, FailReason, MissedReason, Outcome, Trigger
from ckptd.daemon.jobkey import JobKey
from ckptd.daemon.tcppeer import local_uid

log = logging.getLogger(__name__)

JOB = "training_job"  # not "job": that label is Prometheus' own (the scrape job), SPEC §8
DIRECTORY = "directory"  # with the name, what identifies a job (two runs named alike are two jobs)
USER = "user"  # the job's owner, added to every job series at exposition (``Owners``): alert routing
MISSED_REASONS = tuple(MissedReason)
FAILURE_REASONS = tuple(FailReason)
TRIGGERS = tuple(Trigger)
LABEL_MAX = 128  # characters of a label value; a longer one keeps its ends and a digest of the whole
_HEAD, _TAIL = 32, 64


def bounded(value: str) -> str:
    """A label value within ``LABEL_MAX`` characters, the same for the same value and different
    for different ones: a long value keeps its first and last characters (a directory's root and
    its run) around a digest of the whole. A client's directory of 4,000 characters must not make
    every one of its series, and every scrape, 4 kB longer."""
    if len(value) <= LABEL_MAX:
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"{value[:_HEAD]}…{digest}…{value[-_TAIL:]}"


class _Bounded:
    """Every label value through ``bounded``, whoever sets it (the ledger, uploads, watch)."""

    def labels(self, *values: Any, **named: Any) -> Any:
        bound = {k: _bound(v) for k, v in named.items()}
        return super().labels(*(_bound(v) for v in values), **bound)  # type: ignore[misc]

    def remove_by_labels(self, labels: dict[str, str]) -> None:
        super().remove_by_labels({k: bounded(v) for k, v in labels.items()})  # type: ignore[misc]


def _bound(value: Any) -> Any:
    return bounded(value) if isinstance(value, str) else value


class BoundedCounter(_Bounded, Counter):
    pass


class BoundedGauge(_Bounded, Gauge):
    pass


class BoundedHistogram(_Bounded, Histogram):
    pass


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.saves = BoundedCounter(
            "ckptd_saves_total", "Saves by trigger and outcome", [JOB, DIRECTORY, "trigger", "outcome"], registry=r
        )
        self.failures = BoundedCounter(
            "ckptd_save_failures_total", "Failed saves by reason", [JOB, DIRECTORY, "reason"], registry=r
        )
        self.missed = BoundedCounter(
            "ckptd_missed_saves_total",
            "Saves that should have happened and did not",
            [JOB, DIRECTORY, "reason"],
            registry=r,
        )
        self.verify = BoundedCounter(
            "ckptd_verify_total", "Verifications by outcome", [JOB, DIRECTORY, "outcome"], registry=r
        )
        self.duration = BoundedHistogram(
            "ckptd_save_duration_seconds",
            "Time per save phase",
            [JOB, DIRECTORY, "phase"],
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.last_success = BoundedGauge(
            "ckptd_last_success_timestamp_seconds", "Time of the last verified save", [JOB, DIRECTORY], registry=r
        )
        self.last_saved_step = BoundedGauge(
            "ckptd_last_saved_step", "Step of the last verified save", [JOB, DIRECTORY], registry=r
        )
        self.checkpoints = BoundedGauge(
            "ckptd_checkpoints", "Verified checkpoints on disk", [JOB, DIRECTORY], registry=r
        )
        self.checkpoint_bytes = BoundedGauge(
            "ckptd_checkpoint_bytes", "Bytes of checkpoints on disk", [JOB, DIRECTORY], registry=r
        )
        self.deleted = BoundedCounter(
            "ckptd_deleted_total", "Checkpoints deleted, by rule", [JOB, DIRECTORY, "rule"], registry=r
        )
        self.fs_free = BoundedGauge(
            "ckptd_filesystem_free_bytes", "Free bytes on a root's filesystem", ["root"], registry=r
        )
        self.remote_uploads = BoundedCounter(
            "ckptd_remote_uploads_total",
            "Uploads to the remote tier by outcome",
            [JOB, DIRECTORY, "outcome"],
            registry=r,
        )
        self.remote_last_success = BoundedGauge(
            "ckptd_remote_last_success_timestamp_seconds",
            "Time of the last checkpoint verified on the remote tier",
            [JOB, DIRECTORY],
            registry=r,
        )
        self.remote_checkpoints = BoundedGauge(
            "ckptd_remote_checkpoints", "Committed checkpoints on the remote tier", [JOB, DIRECTORY], registry=r
        )
        self.remote_bytes = BoundedGauge(
            "ckptd_remote_bytes", "Bytes of committed checkpoints on the remote tier", [JOB, DIRECTORY], registry=r
        )
        # "failing now" and "missed since the last good save": alerts compare them with last_success,
        # so they resolve at the next verified save, not when a counter window forgets the event
        self.last_failure = BoundedGauge(
            "ckptd_last_failure_timestamp_seconds",
            "Time of the last failed save, by reason",
            [JOB, DIRECTORY, "reason"],
            registry=r,
        )
        self.last_missed = BoundedGauge(
            "ckptd_last_missed_timestamp_seconds",
            "Time of the last missed save, by reason",
            [JOB, DIRECTORY, "reason"],
            registry=r,
        )
        self.corrupt = BoundedGauge(
            "ckptd_corrupt_checkpoints",
            "Checkpoints on disk known not to verify (from the catalogue)",
            [JOB, DIRECTORY],
            registry=r,
        )
        self.last_unattended = BoundedGauge(
            "ckptd_last_unattended_save_timestamp_seconds",
            "Time of the newest checkpoint found under the roots that no connected trainer "
            "handed the daemon (a trainer saving in embedded mode)",
            [JOB, DIRECTORY],
            registry=r,
        )
        self.hook_info = BoundedGauge(
            "ckptd_hook_info",
            "Version of the hook (trainer_hooks) each job's trainer said hello with",
            [JOB, DIRECTORY, "version"],
            registry=r,
        )
        self.build_info = BoundedGauge("ckptd_build_info", "Version of ckptd", ["version"], registry=r)
        self.build_info.labels(__version__).set(1)
        self._ended: dict[JobKey, float] = {}
        self._lock = threading.Lock()

    def init_job(self, job: JobKey) -> None:
        """Create every counter series of a job at 0, so the first failure is an increase.

        A counter whose series appears at 1 has no increase() in Prometheus: the one
        trainer_exit_unsaved of a run would never fire its alert.
        """
        for missed in MISSED_REASONS:
            self.missed.labels(*job, missed)
        for failure in FAILURE_REASONS:
            self.failures.labels(*job, failure)
        for verified in Outcome:
            self.verify.labels(*job, verified)
        for rule in DeleteRule:
            self.deleted.labels(*job, rule)
        for trigger in TRIGGERS:
            for outcome in ("ok", "failed"):
                self.saves.labels(*job, trigger, outcome)
        for outcome in ("ok", "failed"):  # the remote series too, at 0 without a remote tier: a basic
            self.remote_uploads.labels(*job, outcome)  # install's dashboard must not say "No data"
        self.corrupt.labels(*job)
        self.remote_checkpoints.labels(*job)  # an existing value is kept: labels() only creates
        self.remote_bytes.labels(*job)

    def job_ended(self, job: JobKey, now: float) -> None:
        with self._lock:
            self._ended[job] = now

    def job_started(self, job: JobKey) -> None:
        with self._lock:
            self._ended.pop(job, None)

    def drop_ended(self, now: float, ttl: float) -> list[JobKey]:
        """Remove every series of jobs that ended more than ``ttl`` seconds ago."""
        with self._lock:
            old = [j for j, t in self._ended.items() if now - t > ttl]
            for j in old:
                del self._ended[j]
        for job in old:
            for metric in (
                self.saves,
                self.failures,
                self.missed,
                self.verify,
                self.duration,
                self.deleted,
                self.last_success,
                self.last_saved_step,
                self.checkpoints,
                self.checkpoint_bytes,
                self.remote_uploads,
                self.remote_last_success,
                self.remote_checkpoints,
                self.remote_bytes,
                self.last_failure,
                self.last_missed,
                self.corrupt,
                self.last_unattended,
                self.hook_info,
            ):
                _remove_job(metric, job)
        return old


# Gauges of a job's state, computed at scrape time from the job registry (``JobGauges``): exact
# whenever Prometheus asks (several depend on the time they are read at), and gone with their
# job, so nothing has to push them on every change or remember to drop them.
JOB_GAUGES = {
    "ckptd_job_up": "1 while the job's trainer is connected",
    "ckptd_unsaved_steps": "Steps done since the last verified save",
    "ckptd_expected_save_interval_seconds": "Expected time between saves",
    "ckptd_quota_bytes": "max_bytes of the job (0 = none)",
    "ckptd_expected_loss_seconds": "Training seconds lost if the job died now (since its newest verified save)",
    "ckptd_save_overhead_ratio": "Share of training time stalled by saves over the last hour",
    "ckptd_auto_interval_seconds": "The save interval every=auto chose (0: the job does not use every=auto)",
    "ckptd_auto_memory_interval_seconds": "The interval of memory-only saves every=auto chose (0: none, the "
    "disk's saves are enough or the job does not use every=auto)",
    "ckptd_remote_lag_seconds": "Age of the oldest verified local checkpoint not yet verified remotely "
    "(0: none waiting, or no remote tier)",
    "ckptd_memory_bytes": "Bytes of the job's newest verified snapshot the daemon holds in memory (0: none)",
}
JobSource = Callable[[float], list[tuple[JobKey, dict[str, float]]]]


class JobGauges(Collector):
    """``JOB_GAUGES`` for every job the daemon knows: ``source(now)`` gives each job's values."""

    def __init__(self, source: JobSource, clock: Callable[[], float] = time.time) -> None:
        self._source, self._clock = source, clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = {name: GaugeMetricFamily(name, text, labels=[JOB, DIRECTORY]) for name, text in JOB_GAUGES.items()}
        for key, values in self._source(self._clock()):
            for name, value in values.items():
                families[name].add_metric([bounded(key.name), bounded(key.directory)], value)
        yield from families.values()

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """Names only, so registering does not call ``source`` before the daemon is ready."""
        for name, text in JOB_GAUGES.items():
            yield GaugeMetricFamily(name, text, labels=[JOB, DIRECTORY])


class Owners(Collector):
    """Every series of ``inner`` as it is, plus ``user`` (the job's owner) on job series: so "your
    trainer hung" can be routed to its owner and "disk full" to the platform's rotation.

    Added here, at exposition, from the job's key (``owner_of``, cached per job): the metrics
    themselves and every place that counts stay keyed by (training_job, directory). A job whose
    owner is unknown carries no ``user``."""

    def __init__(self, inner: CollectorRegistry, owner_of: Callable[[JobKey], str]) -> None:
        self._inner, self._owner_of = inner, owner_of
        self._names: dict[JobKey, str] = {}
        self._lock = threading.Lock()

    def owner(self, job: JobKey) -> str:
        with self._lock:
            name = self._names.get(job)
        if name is None:
            name = self._owner_of(job)
            with self._lock:
                if len(self._names) > 100_000:  # bounded: jobs come and go on a long-lived host
                    self._names.clear()
                self._names[job] = name
        return name

    def collect(self) -> Iterator[Any]:
        for family in self._inner.collect():
            samples = []
            for sample in family.samples:
                if JOB in sample.labels and DIRECTORY in sample.labels and USER not in sample.labels:
                    user = self.owner(JobKey(sample.labels[JOB], sample.labels[DIRECTORY]))
                    if user:
                        sample = sample._replace(labels={**sample.labels, USER: user})
                samples.append(sample)
            family.samples = samples
            yield family


def owner_name(uid: int | None) -> str:
    """The user name of ``uid`` (its number when it has none; "" when unknown)."""
    import pwd

    if uid is None:
        return ""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _remove_job(metric: Counter | Gauge | Histogram, job: JobKey) -> None:
    metric.remove_by_labels({JOB: job.name, DIRECTORY: job.directory})


@dataclass(frozen=True)
class HttpLimits:
    """What one client of the metrics port may hold (``[daemon] max_http_connections``,
    ``max_http_connections_per_peer``): each connection is a thread and a descriptor of the
    daemon's, and the port is open to users outside the socket's group. A peer is a local
    uid (the kernel says whose the client's socket is) or, from another host, an address."""

    connections: int = 32
    per_peer: int = 8
    deadline: float = 10.0  # seconds for the whole request and its reply: one byte a second is cut here


class _Handler(WSGIRequestHandler):
    """Quiet, and an idle connection is dropped after ``timeout`` seconds (the whole request's
    deadline is the server's, ``HttpLimits.deadline``)."""

    timeout = 10

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass


REFUSED = b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class BoundedServer(ThreadingWSGIServer):
    """A thread per connection, within ``HttpLimits``: a connection past a cap gets a 503 and
    is closed at once, and one still open at its deadline is shut down (its thread then ends).
    Deadlines are checked by the serving loop itself (``service_actions``), no thread per timer."""

    limits = HttpLimits()
    request_queue_size = 128  # the listen backlog: a flood waits in the kernel, not in our descriptors

    def __init__(self, *args: Any, **kw: Any) -> None:
        self._open: dict[socket.socket, tuple[str, float]] = {}  # connection -> (peer, deadline)
        self._open_lock = threading.Lock()
        self._refusing = ""  # the last cap that refused someone, logged once per change
        super().__init__(*args, **kw)

    def process_request(self, request: Any, client_address: Any) -> None:
        peer = _peer(request, client_address)
        with self._open_lock:
            mine = sum(1 for p, _ in self._open.values() if p == peer)
            full = (
                "max_http_connections"
                if len(self._open) >= self.limits.connections
                else "max_http_connections_per_peer"
                if mine >= self.limits.per_peer
                else ""
            )
            if not full:
                self._open[request] = (peer, time.monotonic() + self.limits.deadline)
        if full:
            self._refuse(request, peer, full)
            return
        super().process_request(request, client_address)  # a thread that cannot start: shutdown_request

    def _refuse(self, request: socket.socket, peer: str, cap: str) -> None:
        if cap != self._refusing:
            log.warning("metrics port: refusing connections (%s reached; the latest from %s)", cap, peer)
            self._refusing = cap
        try:
            request.setblocking(False)
            request.send(REFUSED)
        except OSError:
            pass
        request.close()

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.pop(request, None)
            if not self._open:
                self._refusing = ""
        super().shutdown_request(request)

    def service_actions(self) -> None:
        """Shut down every connection past its deadline: its handler's read or write fails at
        once, and the handler's thread closes it."""
        now = time.monotonic()
        with self._open_lock:
            late = [conn for conn, (_, deadline) in self._open.items() if deadline < now]
            for conn in late:
                self._open[conn] = (self._open[conn][0], float("inf"))  # cut once
        for conn in late:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        """No traceback on stderr per connection (a flood would fill the journal): one line."""
        import sys

        log.debug("metrics port: a request from %s failed: %r", client_address, sys.exc_info()[1])


def _peer(conn: socket.socket, address: Any) -> str:
    uid = local_uid(conn)
    return f"uid {uid}" if uid is not None else str(address[0])


def serve_http(
    metrics: Metrics,
    listen: str,
    health: Callable[[], dict[str, bool]],
    limits: HttpLimits = HttpLimits(),
    owner_of: Callable[[JobKey], str] | None = None,
    status: Callable[[], dict[str, Any]] | None = None,
) -> WSGIServer:
    """``/metrics`` (prometheus_client's own app: content negotiation, gzip), ``/healthz`` and
    the read-only ``/status`` (``ckptd status --json`` and the host) beside it, on ``host:port``
    (IPv4 or IPv6), in a daemon thread, within ``limits``. ``owner_of``: a job's owner, the
    ``user`` label."""
    host, port = parse_listen(listen)
    exposed = metrics.registry
    if owner_of is not None:
        exposed = CollectorRegistry(auto_describe=False)
        exposed.register(Owners(metrics.registry, owner_of))
    prometheus_app = make_wsgi_app(exposed)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return list(prometheus_app(environ, start_response))
        if path == "/healthz":
            checks = health()
            body = json.dumps({"ok": all(checks.values()), "checks": checks, "time": time.time()}).encode()
            start_response(
                "200 OK" if all(checks.values()) else "503 Service Unavailable",
                [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
            )
            return [body]
        if path == "/status" and status is not None:
            body = json.dumps(status(), default=str).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    class Server(BoundedServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    Server.limits = limits
    try:
        server = make_server(host, port, app, Server, handler_class=_Handler)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen for metrics on {listen}: {exc.strerror}") from None
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.25}, name="ckptd-metrics", daemon=True
    ).start()
    return server

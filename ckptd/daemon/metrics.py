"""Prometheus metrics (SPEC §8) and the small HTTP server that serves them.

Names and labels are a contract with dashboards and alert rules. Labels are bounded:
job, trigger, outcome, reason, phase, rule, root; never a step or a path. Jobs that
ended are dropped after ``ended_job_ttl`` so a host that runs thousands of short
jobs does not grow its series forever.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ckptd import __version__
from ckptd.core.vocab import DeleteRule, FailReason, MissedReason, Outcome, Trigger

MISSED_REASONS = tuple(MissedReason)
FAILURE_REASONS = tuple(FailReason)
TRIGGERS = tuple(Trigger)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.saves = Counter("ckptd_saves_total", "Saves by trigger and outcome", ["job", "trigger", "outcome"], registry=r)
        self.failures = Counter("ckptd_save_failures_total", "Failed saves by reason", ["job", "reason"], registry=r)
        self.missed = Counter("ckptd_missed_saves_total", "Saves that should have happened and did not",
                              ["job", "reason"], registry=r)
        self.verify = Counter("ckptd_verify_total", "Verifications by outcome", ["job", "outcome"], registry=r)
        self.duration = Histogram("ckptd_save_duration_seconds", "Time per save phase", ["job", "phase"], registry=r,
                                  buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.last_success = Gauge("ckptd_last_success_timestamp_seconds", "Time of the last verified save", ["job"], registry=r)
        self.last_saved_step = Gauge("ckptd_last_saved_step", "Step of the last verified save", ["job"], registry=r)
        self.expected_interval = Gauge("ckptd_expected_save_interval_seconds", "Expected time between saves",
                                       ["job"], registry=r)
        self.unsaved_steps = Gauge("ckptd_unsaved_steps", "Steps done since the last verified save", ["job"], registry=r)
        self.checkpoints = Gauge("ckptd_checkpoints", "Verified checkpoints on disk", ["job"], registry=r)
        self.checkpoint_bytes = Gauge("ckptd_checkpoint_bytes", "Bytes of checkpoints on disk", ["job"], registry=r)
        self.deleted = Counter("ckptd_deleted_total", "Checkpoints deleted, by rule", ["job", "rule"], registry=r)
        self.quota_bytes = Gauge("ckptd_quota_bytes", "max_bytes of the job (0 = none)", ["job"], registry=r)
        self.fs_free = Gauge("ckptd_filesystem_free_bytes", "Free bytes on a root's filesystem", ["root"], registry=r)
        self.job_up = Gauge("ckptd_job_up", "1 while the job's trainer is connected", ["job"], registry=r)
        self.build_info = Gauge("ckptd_build_info", "Version of ckptd", ["version"], registry=r)
        self.build_info.labels(__version__).set(1)
        self._ended: dict[str, float] = {}
        self._lock = threading.Lock()

    def init_job(self, job: str) -> None:
        """Create every counter series of a job at 0, so the first failure is an increase.

        A counter whose series appears at 1 has no increase() in Prometheus: the one
        trainer_exit_unsaved of a run would never fire its alert.
        """
        for missed in MISSED_REASONS:
            self.missed.labels(job, missed)
        for failure in FAILURE_REASONS:
            self.failures.labels(job, failure)
        for verified in Outcome:
            self.verify.labels(job, verified)
        for rule in DeleteRule:
            self.deleted.labels(job, rule)
        for trigger in TRIGGERS:
            for outcome in ("ok", "failed"):
                self.saves.labels(job, trigger, outcome)

    def job_ended(self, job: str, now: float) -> None:
        with self._lock:
            self._ended[job] = now

    def job_started(self, job: str) -> None:
        with self._lock:
            self._ended.pop(job, None)

    def drop_ended(self, now: float, ttl: float) -> list[str]:
        """Remove every series of jobs that ended more than ``ttl`` seconds ago."""
        with self._lock:
            old = [j for j, t in self._ended.items() if now - t > ttl]
            for j in old:
                del self._ended[j]
        for job in old:
            for metric in (self.saves, self.failures, self.missed, self.verify, self.duration, self.deleted,
                           self.last_success, self.last_saved_step, self.expected_interval, self.unsaved_steps,
                           self.checkpoints, self.checkpoint_bytes, self.quota_bytes, self.job_up):
                _remove_job(metric, job)
        return old


def _remove_job(metric: Counter | Gauge | Histogram, job: str) -> None:
    for labels in list(metric._metrics):  # prometheus_client keeps children keyed by label tuples
        if labels and labels[0] == job:
            metric.remove(*labels)


def serve_http(metrics: Metrics, listen: str, health: Callable[[], dict[str, bool]]) -> ThreadingHTTPServer:
    """Start ``/metrics`` and ``/healthz`` on ``host:port`` in a daemon thread."""
    host, _, port = listen.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path.split("?")[0] == "/metrics":
                self._reply(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif self.path.split("?")[0] == "/healthz":
                checks = health()
                body = json.dumps({"ok": all(checks.values()), "checks": checks, "time": time.time()}).encode()
                self._reply(200 if all(checks.values()) else 503, body, "application/json")
            else:
                self._reply(404, b"not found\n", "text/plain")

        def _reply(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((host.strip("[]") or "127.0.0.1", int(port)), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="ckptd-metrics", daemon=True).start()
    return server

"""The alerts end to end, as on-call receives them (issue 34): Debian's Prometheus and
Alertmanager with the shipped rules (deploy/prometheus/alerts.yml), a webhook receiver, a
real daemon and a real trainer. A preemption, a resume and a daemon restart page nobody; a
save that fails pages, naming the host, and resolves when the disk is fixed. Each other fault
(S3 down under a training job, the daemon down, a checkpoint rotting on disk, a trainer saving
without the daemon, a hung trainer, a job near its quota) is caused for real, its alert reaches the webhook with its
host and severity, the fix resolves it, and nothing else fires.

Short scrape and evaluation intervals (1 s) and Alertmanager's group timers at 1 s come from
this test's configs. The first test runs the rules as shipped, unchanged. The fault tests run
them on a time scale ``SCALE`` (20) times shorter, or each would take 10 to 25 minutes: every
duration in alerts.yml is divided by SCALE, and only durations: each ``for:``, each range
window (``[15m]``, ``[1d]``), and the age in seconds an expression compares with that the test's
fault is about (the 900 s of replication lag or of an unattended save, the 300 s floor of a
stale checkpoint; the others stay as shipped, so that a slow start on a loaded machine pages
nobody). The
expressions are otherwise the shipped ones (``scaled_rules`` fails if one of those it rewrites
is no longer there). The S3 outage test runs them ``LAG_SCALE`` (60) times shorter: at 20, its
15 minutes of lag and 10 of ``for`` would still take 75 s. SCALE stays at 20 for the others:
the unattended window (900 s) must stay longer than the daemon's sweep (30 s, not scaled), and
the stale floor (300 s) longer than a save's delay on a loaded test machine."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import PYTHON, ROOT, S3_ENV, DaemonProc, MotoServer, free_port, project_env, tmpfs_at, wait_until

DEPLOY = ROOT / "deploy" / "prometheus"
SCALE = 20  # the fault tests' rules run on a time scale this many times shorter (the module's docstring)
LAG_SCALE = 60  # the S3 outage's: 25 minutes of lag and `for` would still be 75 s at SCALE
UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


AGES = {
    "lag": ("ckptd_remote_lag_seconds > 900", 900),
    "unattended": ("ckptd_last_unattended_save_timestamp_seconds < 900", 900),
    "stale": ("ckptd_expected_save_interval_seconds, 300)", 300),
}


def scaled_rules(text: str, scale: int, ages: tuple[str, ...] = ()) -> str:
    """alerts.yml with every duration divided by ``scale``: ``for:``, range windows, and the ages
    in seconds named in ``ages`` (of AGES) that the expressions compare with. Nothing else of an
    expression changes. A test scales only the age its fault is about: unscaled, the others keep
    a loaded machine's slow trainer start (a save 20 s late) from paging."""

    def duration(m: re.Match[str]) -> str:
        return f"{max(1, int(m[2]) * UNIT[m[3]] // scale)}s"

    for name, (phrase, seconds) in AGES.items():
        assert phrase in text, f"alerts.yml no longer has {phrase!r}: update scaled_rules"
        if name in ages:
            text = text.replace(phrase, phrase.replace(str(seconds), str(seconds // scale)))
    text = re.sub(r"(for: )(\d+)([smhd])\b", lambda m: m[1] + duration(m), text)
    return re.sub(r"(\[)(\d+)([smhd])\]", lambda m: m[1] + duration(m) + "]", text)


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(
            f"{tool} is not installed: `make tools` installs it (Debian packages prometheus, prometheus-alertmanager)"
        )
    return path


class Webhook:
    """Alertmanager's receiver: every notification it posts, kept in order."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        received = self.notifications

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, name="webhook", daemon=True)
        self.thread.start()

    def alerts(self, status: str | None = None) -> list[dict[str, Any]]:
        return [a for n in list(self.notifications) for a in n["alerts"] if status is None or a["status"] == status]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class Stack:
    """Prometheus (scrape job named "hosts": no rule may depend on it) and Alertmanager."""

    def __init__(self, base: Path, target_port: int, webhook: str, scale: int = 1, ages: tuple[str, ...] = ()) -> None:
        base.mkdir(parents=True, exist_ok=True)
        self.am_port, self.prom_port = free_port(), free_port()
        (base / "alerts.yml").write_text(scaled_rules((DEPLOY / "alerts.yml").read_text(), scale, ages))
        (base / "alertmanager.yml").write_text(
            "route:\n  receiver: hook\n  group_by: [alertname, instance, training_job, reason]\n"
            "  group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1h\n"
            f"receivers:\n  - name: hook\n    webhook_configs:\n      - url: {webhook}\n        send_resolved: true\n"
        )
        (base / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [alerts.yml]\n"
            f"alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['127.0.0.1:{self.am_port}']\n"
            f"scrape_configs:\n  - job_name: hosts\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
        )
        self.log = open(base / "stack.log", "wb")
        self.procs = [
            subprocess.Popen(
                [
                    need("prometheus-alertmanager"),
                    f"--config.file={base / 'alertmanager.yml'}",
                    f"--storage.path={base / 'am'}",
                    f"--web.listen-address=127.0.0.1:{self.am_port}",
                    "--cluster.listen-address=",
                ],
                stdout=self.log,
                stderr=subprocess.STDOUT,
            ),
            subprocess.Popen(
                [
                    need("prometheus"),
                    f"--config.file={base / 'prometheus.yml'}",
                    f"--storage.tsdb.path={base / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.prom_port}",
                    "--rules.alert.resend-delay=1s",
                ],
                stdout=self.log,
                stderr=subprocess.STDOUT,
            ),
        ]
        for port in (self.am_port, self.prom_port):
            wait_until(lambda p=port: _ok(f"http://127.0.0.1:{p}/-/ready"), 60, "prometheus and alertmanager")

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as r:
            return list(json.loads(r.read())["data"]["result"])

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            p.wait(60)
        self.log.close()


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _trainer(
    d: DaemonProc, run: Path, steps: int = 1000000, every: int = 20, socket: str | None = None, **env: str
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            PYTHON,
            str(ROOT / "examples" / "train_toy.py"),
            "--dir",
            str(run),
            "--job",
            "e2e",
            "--steps",
            str(steps),
            "--every-steps",
            str(every),
            "--step-sleep",
            "0.02",
            "--keep-last",
            "3",
        ],
        env=project_env(CKPTD_SOCKET=socket or d.socket, **env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _end(trainer: subprocess.Popen[bytes] | None) -> None:
    if trainer is not None and trainer.poll() is None:
        trainer.kill()
        trainer.wait()


@contextmanager
def _rig(
    base: Path,
    extra_config: str = "",
    env: dict[str, str] | None = None,
    scale: int = SCALE,
    ages: tuple[str, ...] = (),
) -> Iterator[tuple[DaemonProc, Stack, Webhook]]:
    """A started daemon scraped by Prometheus with the rules at ``scale`` (and ``ages``), and the webhook."""
    d = DaemonProc(base / "d", extra_config, env=env)
    hook = Webhook()
    stack = None
    try:
        d.start()
        stack = Stack(base / "stack", d.port, hook.url, scale, ages)
        wait_until(lambda: stack.query('up{job="hosts"} == 1'), 30, "the first scrape")
        yield d, stack, hook
    finally:
        if stack is not None:
            stack.stop()
        hook.stop()
        d.stop()


def _fired(hook: Webhook, alert: str, status: str = "firing") -> list[dict[str, Any]]:
    return [a for a in hook.alerts(status) if a["labels"]["alertname"] == alert]


def _pages(hook: Webhook, d: DaemonProc, alert: str, severity: str, fault: float) -> dict[str, Any]:
    """The alert at the webhook, naming this daemon's host, with its severity; prints how long
    it took from the fault."""
    wait_until(lambda: _fired(hook, alert), 150, f"{alert} at the webhook")
    print(f"{alert}: at the webhook {time.monotonic() - fault:.1f} s after the fault")
    fired = _fired(hook, alert)[0]
    assert fired["labels"]["instance"] == f"127.0.0.1:{d.port}", fired
    assert fired["labels"]["severity"] == severity and fired["labels"]["service"] == "ckptd", fired
    assert f"127.0.0.1:{d.port}" in fired["annotations"]["summary"], fired
    return fired


def _resolves(hook: Webhook, alert: str, fix: float) -> None:
    wait_until(lambda: _fired(hook, alert, "resolved"), 150, f"{alert} resolved at the webhook")
    print(f"{alert}: resolved at the webhook {time.monotonic() - fix:.1f} s after the fix")


def _only(hook: Webhook, *alerts: str) -> None:
    fired = {a["labels"]["alertname"] for a in hook.alerts()}
    assert fired == set(alerts), hook.alerts()


@pytest.mark.slow
def test_preemption_resume_and_restart_page_nobody_and_a_failed_save_pages_and_resolves(tmp_path: Path) -> None:
    d = DaemonProc(tmp_path / "d")
    hook = Webhook()
    stack = trainer = None
    with tmpfs_at(d.root, "64m"):
        try:
            d.start()
            stack = Stack(tmp_path / "stack", d.port, hook.url)
            instance = f"127.0.0.1:{d.port}"
            wait_until(lambda: stack.query('up{job="hosts"} == 1'), 30, "the first scrape")
            run = d.root / "e2e"
            trainer = _trainer(d, run)

            def saved() -> float:
                return d.metric("ckptd_last_saved_step", training_job="e2e")

            wait_until(lambda: saved() >= 40, 120, "two saves")
            trainer.send_signal(signal.SIGTERM)  # a preemption: the hook saves, then the signal ends it
            trainer.wait(60)
            wait_until(
                lambda: d.metric("ckptd_saves_total", training_job="e2e", trigger="preempt", outcome="ok") == 1,
                30,
                "the preemption save",
            )
            preempted = saved()
            trainer = _trainer(d, run)  # the resume: hello at step 0, then resume() from the preemption save
            wait_until(lambda: saved() > preempted + 20, 120, "saves after the resume")
            assert d.stop() == 0  # a graceful daemon restart under a running trainer
            d.start()
            wait_until(lambda: d.metric("ckptd_job_up", training_job="e2e") == 1, 60, "the trainer to reconnect")
            restarted = saved()
            wait_until(lambda: saved() > restarted + 20, 60, "saves after the restart")
            wait_until(lambda: stack.query(f'count_over_time(up{{instance="{instance}"}}[1m]) > 5'), 30, "scrapes")
            # fired at any time (CkptdDown and CkptdMetricsAbsent were pending during the restart: their `for`)
            ever = stack.query('max_over_time(ALERTS{service="ckptd",alertstate="firing"}[10m])')
            assert not ever and not hook.alerts(), (ever, hook.alerts())

            subprocess.run(["mount", "-o", "remount,ro", str(d.root)], check=True)  # the fault: a read-only disk
            wait_until(
                lambda: [a for a in hook.alerts("firing") if a["labels"]["alertname"] == "CkptdSaveFailed"],
                60,
                "CkptdSaveFailed at the webhook",
            )
            (fired,) = [a for a in hook.alerts("firing") if a["labels"]["alertname"] == "CkptdSaveFailed"]
            assert fired["labels"]["instance"] == instance and fired["labels"]["reason"] == "read_only"
            assert fired["labels"]["severity"] == "critical" and fired["labels"]["user"] == "root"
            assert instance in fired["annotations"]["summary"]
            subprocess.run(["mount", "-o", "remount,rw", str(d.root)], check=True)  # fixed: the next save verifies
            wait_until(
                lambda: [a for a in hook.alerts("resolved") if a["labels"]["alertname"] == "CkptdSaveFailed"],
                60,
                "CkptdSaveFailed resolved at the webhook",
            )
            others = {a["labels"]["alertname"] for a in hook.alerts()} - {"CkptdSaveFailed"}
            assert not others, hook.alerts()
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(d.root)], check=False)
            if trainer is not None and trainer.poll() is None:
                trainer.kill()
                trainer.wait()
            if stack is not None:
                stack.stop()
            hook.stop()
            d.stop()


@pytest.mark.slow
def test_s3_down_under_a_training_job_fires_replication_lagging_only_and_resolves_when_it_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    s3 = MotoServer(tmp_path).start()
    s3.client().create_bucket(Bucket="ckpt")
    allow = f'remote_allow = ["s3://ckpt/fleet"]\nremote_endpoint = "{s3.endpoint}"\n'
    trainer = None
    try:
        with _rig(tmp_path, allow, env=S3_ENV, scale=LAG_SCALE, ages=("lag",)) as (d, stack, hook):
            labels = {"training_job": "e2e", "directory": str(d.root / "e2e")}
            # a save every few seconds: on the scaled clock, minutes; the backlog the outage piles up is as small
            trainer = _trainer(d, d.root / "e2e", every=100, CKPTD_REMOTE="s3://ckpt/fleet")
            wait_until(lambda: d.metric("ckptd_remote_uploads_total", outcome="ok", **labels) >= 1, 120, "an upload")
            s3.stop()  # the outage, under a job that keeps training and saving
            fault = time.monotonic()
            fired = _pages(hook, d, "CkptdReplicationLagging", "warning", fault)
            assert fired["labels"]["training_job"] == "e2e" and fired["labels"]["user"] == "root", fired
            assert d.metric("ckptd_remote_uploads_total", outcome="failed", **labels) >= 1
            s3 = MotoServer(tmp_path, port=s3.port).start()  # back, on the same address (moto keeps nothing)
            s3.client().create_bucket(Bucket="ckpt")
            fix = time.monotonic()
            _resolves(hook, "CkptdReplicationLagging", fix)
            assert d.metric("ckptd_remote_lag_seconds", **labels) < 900 / LAG_SCALE
            _only(hook, "CkptdReplicationLagging")
    finally:
        _end(trainer)
        s3.stop()


@pytest.mark.slow
def test_the_daemon_down_fires_ckptd_down_and_metrics_absent_and_both_resolve_when_it_is_back(tmp_path: Path) -> None:
    with _rig(tmp_path) as (d, stack, hook):
        wait_until(lambda: stack.query("ckptd_build_info"), 30, "ckptd_build_info scraped")
        d.kill(9)  # a crash
        fault = time.monotonic()
        _pages(hook, d, "CkptdDown", "critical", fault)
        wait_until(lambda: _fired(hook, "CkptdMetricsAbsent"), 150, "CkptdMetricsAbsent at the webhook")
        print(f"CkptdMetricsAbsent: at the webhook {time.monotonic() - fault:.1f} s after the fault")
        (absent,) = _fired(hook, "CkptdMetricsAbsent")  # no instance: the fleet's alert, not a host's
        assert absent["labels"]["severity"] == "warning", absent
        d.start()
        fix = time.monotonic()
        _resolves(hook, "CkptdDown", fix)
        _resolves(hook, "CkptdMetricsAbsent", fix)
        _only(hook, "CkptdDown", "CkptdMetricsAbsent")


@pytest.mark.slow
def test_a_checkpoint_rotting_on_disk_fires_verify_failed_and_resolves_when_it_is_deleted(tmp_path: Path) -> None:
    with _rig(tmp_path, 'scrub_every = "1s"\n') as (d, stack, hook):
        run = d.root / "e2e"
        trainer = _trainer(d, run, steps=60)  # saves steps 20, 40 and 60, and ends its run
        assert trainer.wait(120 * 4) == 0
        wait_until(lambda: d.metric("ckptd_checkpoints", training_job="e2e") == 3, 30, "three verified checkpoints")
        victim = sorted(run.glob("*.safetensors"))[0]
        with open(victim, "r+b") as f:  # bit rot in a verified checkpoint, behind the daemon's back
            f.seek(os.path.getsize(victim) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
        fault = time.monotonic()
        fired = _pages(hook, d, "CkptdVerifyFailed", "critical", fault)
        assert fired["labels"]["training_job"] == "e2e" and fired["labels"]["directory"] == str(run), fired
        victim.unlink()  # the runbook's fix: the corrupt file goes
        _resolves(hook, "CkptdVerifyFailed", time.monotonic())
        _only(hook, "CkptdVerifyFailed")


@pytest.mark.slow
def test_a_trainer_saving_without_the_daemon_fires_trainer_unattended_and_resolves_when_it_connects(
    tmp_path: Path,
) -> None:
    trainer = None
    try:
        with _rig(tmp_path, ages=("unattended",)) as (d, stack, hook):
            run = d.root / "e2e"
            # embedded mode: its socket is not the daemon's (a typo, the daemon down at start)
            trainer = _trainer(d, run, every=50, socket=str(tmp_path / "nowhere.sock"))
            wait_until(lambda: list(run.glob("*.safetensors")), 120, "a save in embedded mode")
            fault = time.monotonic()
            fired = _pages(hook, d, "CkptdTrainerUnattended", "warning", fault)
            assert fired["labels"]["training_job"] == "e2e" and fired["labels"]["directory"] == str(run), fired
            _end(trainer)
            trainer = _trainer(d, run, every=50)  # fixed: the run resumes, through the daemon
            _resolves(hook, "CkptdTrainerUnattended", time.monotonic())
            _only(hook, "CkptdTrainerUnattended")
    finally:
        _end(trainer)


@pytest.mark.slow
def test_a_hung_trainer_fires_checkpoint_stale_and_resolves_when_it_goes_on(tmp_path: Path) -> None:
    trainer = None
    try:
        with _rig(tmp_path, ages=("stale",)) as (d, stack, hook):
            trainer = _trainer(d, d.root / "e2e")
            wait_until(lambda: d.metric("ckptd_last_saved_step", training_job="e2e") >= 40, 120, "two saves")
            trainer.send_signal(signal.SIGSTOP)  # hung: connected, saving nothing
            fault = time.monotonic()
            fired = _pages(hook, d, "CkptdCheckpointStale", "critical", fault)
            assert fired["labels"]["training_job"] == "e2e", fired
            trainer.send_signal(signal.SIGCONT)
            _resolves(hook, "CkptdCheckpointStale", time.monotonic())
            _only(hook, "CkptdCheckpointStale")
    finally:
        if trainer is not None:
            trainer.send_signal(signal.SIGCONT)
        _end(trainer)


@pytest.mark.slow
def test_a_job_near_its_quota_fires_quota_nearly_exhausted_and_resolves_when_the_quota_grows(tmp_path: Path) -> None:
    trainer = None
    try:
        with _rig(tmp_path) as (d, stack, hook):
            run = d.root / "e2e"
            trainer = _trainer(d, run)
            wait_until(lambda: list(run.glob("*.safetensors")), 120, "a first save")
            size = max(os.path.getsize(p) for p in run.glob("*.safetensors"))
            trainer.send_signal(signal.SIGTERM)  # preempted; it resumes with a quota 3 checkpoints fill to ~94%
            trainer.wait(60)
            trainer = _trainer(d, run, CKPTD_MAX_BYTES=str(int(size * 3.2)))
            fault = time.monotonic()
            fired = _pages(hook, d, "CkptdQuotaNearlyExhausted", "warning", fault)
            assert fired["labels"]["training_job"] == "e2e" and fired["labels"]["user"] == "root", fired
            trainer.send_signal(signal.SIGTERM)
            trainer.wait(60)
            trainer = _trainer(d, run, CKPTD_MAX_BYTES=str(size * 100))  # fixed: a bigger quota, resumed
            _resolves(hook, "CkptdQuotaNearlyExhausted", time.monotonic())
            _only(hook, "CkptdQuotaNearlyExhausted")
    finally:
        _end(trainer)

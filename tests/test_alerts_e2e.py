"""The alerts end to end, as on-call receives them (issue 34): Debian's Prometheus and
Alertmanager with the shipped rules (deploy/prometheus/alerts.yml), a webhook receiver, a
real daemon and a real trainer. A preemption, a resume and a daemon restart page nobody; a
save that fails pages, naming the host, and resolves when the disk is fixed.

Short scrape and evaluation intervals (1 s) and Alertmanager's group timers at 1 s come from
this test's configs; the rules are the shipped ones, unchanged."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PYTHON, ROOT, DaemonProc, free_port, project_env, tmpfs_at, wait_until

DEPLOY = ROOT / "deploy" / "prometheus"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed: `make tools` installs it (Debian packages prometheus, "
                    "prometheus-alertmanager)")
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

    def __init__(self, base: Path, target_port: int, webhook: str) -> None:
        base.mkdir(parents=True, exist_ok=True)
        self.am_port, self.prom_port = free_port(), free_port()
        shutil.copy(DEPLOY / "alerts.yml", base / "alerts.yml")
        (base / "alertmanager.yml").write_text(
            "route:\n  receiver: hook\n  group_by: [alertname, instance, training_job, reason]\n"
            "  group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1h\n"
            f"receivers:\n  - name: hook\n    webhook_configs:\n      - url: {webhook}\n        send_resolved: true\n")
        (base / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [alerts.yml]\n"
            f"alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['127.0.0.1:{self.am_port}']\n"
            f"scrape_configs:\n  - job_name: hosts\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n")
        self.log = open(base / "stack.log", "wb")
        self.procs = [
            subprocess.Popen([need("prometheus-alertmanager"), f"--config.file={base / 'alertmanager.yml'}",
                              f"--storage.path={base / 'am'}", f"--web.listen-address=127.0.0.1:{self.am_port}",
                              "--cluster.listen-address="], stdout=self.log, stderr=subprocess.STDOUT),
            subprocess.Popen([need("prometheus"), f"--config.file={base / 'prometheus.yml'}",
                              f"--storage.tsdb.path={base / 'data'}", f"--web.listen-address=127.0.0.1:{self.prom_port}",
                              "--rules.alert.resend-delay=1s"], stdout=self.log, stderr=subprocess.STDOUT)]
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


def _trainer(d: DaemonProc, run: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([PYTHON, str(ROOT / "examples" / "train_toy.py"), "--dir", str(run), "--job", "e2e",
                             "--steps", "1000000", "--every-steps", "20", "--step-sleep", "0.02", "--keep-last", "3"],
                            env=project_env(CKPTD_SOCKET=d.socket), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


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
            wait_until(lambda: d.metric("ckptd_saves_total", training_job="e2e", trigger="preempt", outcome="ok") == 1,
                       30, "the preemption save")
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
            wait_until(lambda: [a for a in hook.alerts("firing") if a["labels"]["alertname"] == "CkptdSaveFailed"],
                       60, "CkptdSaveFailed at the webhook")
            (fired,) = [a for a in hook.alerts("firing") if a["labels"]["alertname"] == "CkptdSaveFailed"]
            assert fired["labels"]["instance"] == instance and fired["labels"]["reason"] == "read_only"
            assert fired["labels"]["severity"] == "critical" and fired["labels"]["user"] == "root"
            assert instance in fired["annotations"]["summary"]
            subprocess.run(["mount", "-o", "remount,rw", str(d.root)], check=True)  # fixed: the next save verifies
            wait_until(lambda: [a for a in hook.alerts("resolved") if a["labels"]["alertname"] == "CkptdSaveFailed"],
                       60, "CkptdSaveFailed resolved at the webhook")
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

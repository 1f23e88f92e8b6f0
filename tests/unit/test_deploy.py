"""Deployment artefacts read as data: alert rules (each with its promtool tests, host, routing and
runbook), the dashboard's aggregations, tmpfiles/sysusers, and the metrics of ended jobs."""

from __future__ import annotations

import json
import re

from ckptd.daemon.metrics import Metrics
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    import yaml  # noqa: F401 (pyyaml comes with the test extras)

    rules = re.findall(r"- alert: (\w+)", (DEPLOY / "prometheus" / "alerts.yml").read_text())
    doc = yaml.safe_load((DEPLOY / "prometheus" / "alerts_test.yml").read_text())
    firing = {t["alert_rule_test"][0]["alertname"] for t in doc["tests"] if t["alert_rule_test"][0]["exp_alerts"]}
    quiet = {t["alert_rule_test"][0]["alertname"] for t in doc["tests"] if not t["alert_rule_test"][0]["exp_alerts"]}
    assert set(rules) == firing == quiet
    assert set(rules) == {
        "CkptdSaveFailed",
        "CkptdSaveMissed",
        "CkptdCheckpointStale",
        "CkptdVerifyFailed",
        "CkptdQuotaNearlyExhausted",
        "CkptdTrainerExitUnsaved",
        "CkptdDown",
        "CkptdReplicationLagging",
        "CkptdTrainerUnattended",
        "CkptdMetricsAbsent",
    }


def test_every_alert_names_its_host_routes_and_links_its_runbook() -> None:
    """Fleet routing (issue 34): the host in every text (but absent()'s, which has none), the
    severity and service labels common Alertmanager configs route on, a runbook section each."""
    import yaml

    runbooks = (ROOT / "docs" / "runbooks.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^## (.+)$", runbooks, re.M)
    }
    rules = [
        r for g in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"] for r in g["rules"]
    ]
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning") and rule["labels"]["service"] == "ckptd", rule
        url = rule["annotations"]["runbook_url"]
        assert url == f"docs/runbooks.md#{rule['alert'].lower()}" and rule["alert"].lower() in anchors, url
        if "absent(" not in rule["expr"]:
            assert "{{ $labels.instance }}" in rule["annotations"]["summary"], rule["alert"]
        assert 'job="ckptd"' not in rule["expr"], rule["alert"]


def test_the_dashboard_keeps_the_host_in_every_aggregation_and_names_every_series() -> None:
    """Two hosts' `llm-pretrain` must not merge (issue 34): every `by (...)` keeps `instance`
    (the fleet row's `count(...)` of hosts excepted), every per-job selector takes the host
    variable, every target has a legend naming its host."""
    dashboard = json.loads((DEPLOY / "grafana" / "ckptd.json").read_text())
    targets = [t for p in dashboard["panels"] for t in p.get("targets", [])]
    assert dashboard["panels"][0]["type"] == "row" and dashboard["panels"][0]["title"] == "Fleet overview"
    for t in targets:
        for group in re.findall(r"by \(([^)]*)\)", t["expr"]):
            assert "instance" in group, t["expr"]
        assert 'instance=~"$host"' in t["expr"], t["expr"]
        assert t.get("legendFormat") and ("{{instance}}" in t["legendFormat"] or t["expr"].startswith("count(")), t


def test_the_shipped_tmpfiles_and_sysusers_share_nothing_writable() -> None:
    """No shared writable group (issue 33, H3/H4): the root is sticky and root's (everyone may make
    a directory, nobody may rename or delete another's), and the service user's group is the
    socket's alone. tests/security/test_owner_rights.py uses this very mode against real users."""
    tmpfiles = (ROOT / "systemd" / "ckptd.tmpfiles").read_text()
    root = next(x.split() for x in tmpfiles.splitlines() if x.startswith("d /srv/checkpoints "))
    assert root[2:5] == ["1777", "root", "root"], root
    assert "ckptd" not in " ".join(root)


def test_ended_jobs_are_dropped_from_metrics() -> None:
    from ckptd.daemon.jobkey import JobKey

    m = Metrics()
    old, live, namesake = JobKey("old", "/runs/a"), JobKey("live", "/runs/b"), JobKey("old", "/runs/c")
    m.saves.labels(*old, "step", "ok").inc()
    m.last_saved_step.labels(*old).set(5)
    m.saves.labels(*live, "step", "ok").inc()
    m.saves.labels(*namesake, "step", "ok").inc()  # the same name in another directory is another job
    m.job_ended(old, now=1000.0)
    assert m.drop_ended(now=1000.0 + 10, ttl=3600) == []
    assert m.drop_ended(now=1000.0 + 3601, ttl=3600) == [old]
    from prometheus_client import generate_latest

    text = generate_latest(m.registry).decode()
    assert 'directory="/runs/a"' not in text and 'training_job="live"' in text and 'directory="/runs/c"' in text

"""Writes alerts_test.yml (promtool unit tests) from the cases below and alerts.yml.

promtool compares annotations exactly, so the expected annotations are rendered from
alerts.yml here rather than copied by hand. Run after changing alerts.yml:
    python3 deploy/prometheus/gen_alert_tests.py
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

HERE = Path(__file__).parent
RULES = {r["alert"]: r for g in yaml.safe_load((HERE / "alerts.yml").read_text())["groups"] for r in g["rules"]}
L = 'job="ckptd",training_job="gpt",directory="/runs/gpt",instance="h:9733"'

# (name, input series, eval time, alert, labels of the expected alerts or [] for "must not fire")
CASES = [
    ("save failed fires", [(f'ckptd_save_failures_total{{{L},reason="no_space"}}', "0 0 1 1")], "3m",
     "CkptdSaveFailed", [{"reason": "no_space"}]),
    ("no failures, no alert", [(f'ckptd_save_failures_total{{{L},reason="no_space"}}', "0 0 0 0")], "3m",
     "CkptdSaveFailed", []),
    ("failure older than 15m is forgotten", [(f'ckptd_save_failures_total{{{L},reason="io_error"}}', "0 1 1x30")],
     "30m", "CkptdSaveFailed", []),
    ("missed save fires", [(f'ckptd_missed_saves_total{{{L},reason="step_skipped"}}', "0 1 1")], "2m",
     "CkptdSaveMissed", [{"reason": "step_skipped"}]),
    ("trainer exit is not a missed save", [(f'ckptd_missed_saves_total{{{L},reason="trainer_exit_unsaved"}}', "0 1 1")],
     "2m", "CkptdSaveMissed", []),
    ("trainer exit fires its own alert", [(f'ckptd_missed_saves_total{{{L},reason="trainer_exit_unsaved"}}', "0 1 1")],
     "2m", "CkptdTrainerExitUnsaved", [{"reason": "trainer_exit_unsaved"}]),
    ("other missed reasons are not a trainer exit", [(f'ckptd_missed_saves_total{{{L},reason="step_skipped"}}', "0 1 1")],
     "2m", "CkptdTrainerExitUnsaved", []),
    ("stale checkpoint fires", [(f"ckptd_job_up{{{L}}}", "1x20"), (f"ckptd_last_success_timestamp_seconds{{{L}}}", "0x20"),
                                (f"ckptd_expected_save_interval_seconds{{{L}}}", "300x20")], "15m",
     "CkptdCheckpointStale", [{}]),
    ("fresh checkpoint does not", [(f"ckptd_job_up{{{L}}}", "1x20"),
                                   (f"ckptd_last_success_timestamp_seconds{{{L}}}", "0+60x20"),
                                   (f"ckptd_expected_save_interval_seconds{{{L}}}", "300x20")], "15m",
     "CkptdCheckpointStale", []),
    ("stale but the job ended", [(f"ckptd_job_up{{{L}}}", "0x20"), (f"ckptd_last_success_timestamp_seconds{{{L}}}", "0x20"),
                                 (f"ckptd_expected_save_interval_seconds{{{L}}}", "300x20")], "15m",
     "CkptdCheckpointStale", []),
    ("corrupt verify fires", [(f'ckptd_verify_total{{{L},outcome="corrupt"}}', "0 1 1")], "2m",
     "CkptdVerifyFailed", [{"outcome": "corrupt"}]),
    ("ok verifies do not", [(f'ckptd_verify_total{{{L},outcome="ok"}}', "0 5 10")], "2m", "CkptdVerifyFailed", []),
    ("quota at 95% fires", [(f"ckptd_quota_bytes{{{L}}}", "1000x10"), (f"ckptd_checkpoint_bytes{{{L}}}", "950x10")],
     "8m", "CkptdQuotaNearlyExhausted", [{}]),
    ("quota at 50% does not", [(f"ckptd_quota_bytes{{{L}}}", "1000x10"), (f"ckptd_checkpoint_bytes{{{L}}}", "500x10")],
     "8m", "CkptdQuotaNearlyExhausted", []),
    ("no quota set does not", [(f"ckptd_quota_bytes{{{L}}}", "0x10"), (f"ckptd_checkpoint_bytes{{{L}}}", "500x10")],
     "8m", "CkptdQuotaNearlyExhausted", []),
    # ckptd_remote_lag_seconds as the exporter gives it (tests/test_remote.py, ..._lag_counts_from_the_oldest_waiting...):
    # the age of the oldest checkpoint not yet remote, so an outage under a job that keeps saving grows by the
    # scrape interval; a store keeping up is a sawtooth of upload times.
    ("replication lagging fires", [(f"ckptd_remote_lag_seconds{{{L}}}", "0 60 120 180 240 300+60x30")], "30m",
     "CkptdReplicationLagging", [{}]),
    ("replication keeping up does not", [(f"ckptd_remote_lag_seconds{{{L}}}", "0 30 0 30 0 30 0x30")], "25m",
     "CkptdReplicationLagging", []),
    ("daemon down fires", [('up{job="ckptd",instance="h:9733"}', "0x5")], "3m", "CkptdDown", [{"job": "ckptd"}]),
    ("daemon up does not", [('up{job="ckptd",instance="h:9733"}', "1x5")], "3m", "CkptdDown", []),
]


def render(text: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), text)


def series_labels(series: str) -> dict[str, str]:
    """The labels an alert over ``series`` carries: the series' own, less the metric's reason etc."""
    return dict(re.findall(r'(job|training_job|directory|instance)="([^"]*)"', series))


def expected(alert: str, extra: dict[str, str], series: str) -> dict:
    labels = {**series_labels(series), **extra}
    rule = RULES[alert]
    return {"exp_labels": {**labels, **rule.get("labels", {})},
            "exp_annotations": {k: render(v, labels) for k, v in rule["annotations"].items()}}


def main() -> None:
    tests = []
    for name, series, at, alert, alerts in CASES:
        tests.append({"name": name, "interval": "1m",
                      "input_series": [{"series": s, "values": v} for s, v in series],
                      "alert_rule_test": [{"eval_time": at, "alertname": alert,
                                           "exp_alerts": [expected(alert, a, series[0][0]) for a in alerts]}]})
    missing = set(RULES) - {c[3] for c in CASES if c[4]}
    assert not missing, f"no firing test for {missing}"
    doc = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": tests}
    (HERE / "alerts_test.yml").write_text("# Generated by gen_alert_tests.py; run `promtool test rules alerts_test.yml`.\n"
                                          + yaml.safe_dump(doc, sort_keys=False, width=200))


if __name__ == "__main__":
    main()

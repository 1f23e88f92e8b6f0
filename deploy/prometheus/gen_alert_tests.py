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
# The labels of a job series as Prometheus stores them: ckptd's own (training_job, directory, user: the
# exporter's, checked against a real daemon's /metrics by tests/test_deploy.py) and the scrape's (job, instance).
L = 'job="ckptd",instance="h:9733",training_job="gpt",directory="/runs/gpt",user="alice"'


def s(name: str, extra: str = "") -> str:
    return f"{name}{{{L}{',' + extra if extra else ''}}}"


FAILED, SUCCESS = (
    s("ckptd_last_failure_timestamp_seconds", 'reason="no_space"'),
    s("ckptd_last_success_timestamp_seconds"),
)
MISSED = s("ckptd_last_missed_timestamp_seconds", 'reason="step_skipped"')
OVERDUE = s("ckptd_last_missed_timestamp_seconds", 'reason="time_overdue"')
EXITED = s("ckptd_last_missed_timestamp_seconds", 'reason="trainer_exit_unsaved"')
UP, LOSS, EVERY = s("ckptd_job_up"), s("ckptd_expected_loss_seconds"), s("ckptd_expected_save_interval_seconds")
QUOTA, BYTES = s("ckptd_quota_bytes"), s("ckptd_checkpoint_bytes")
UNATTENDED = s("ckptd_last_unattended_save_timestamp_seconds")
BUILD = 'ckptd_build_info{job="nodes-ckptd",instance="h:9733",version="0.1.0"}'

# (name, input series (the alert's own first), eval time, alert, fires?); values one a minute from t=0
CASES = [
    ("a failure after the last save fires", [(FAILED, "_ _ 150x8"), (SUCCESS, "60x10")], "4m", "CkptdSaveFailed", True),
    (
        "the next verified save resolves it",
        [(FAILED, "_ _ 150x8"), (SUCCESS, "60 60 60 60 300x6")],
        "6m",
        "CkptdSaveFailed",
        False,
    ),
    ("a failure with no save ever fires", [(FAILED, "100x5")], "3m", "CkptdSaveFailed", True),
    (
        "a failure older than the last save does not",
        [(FAILED, "30x5"), (SUCCESS, "60x5")],
        "3m",
        "CkptdSaveFailed",
        False,
    ),
    ("a missed step after the last save fires", [(MISSED, "_ 90x5"), (SUCCESS, "30x6")], "3m", "CkptdSaveMissed", True),
    (
        "a hung trainer's time_overdue before its first save stays firing",
        [(OVERDUE, "_ _ 120x30")],
        "30m",
        "CkptdSaveMissed",
        True,
    ),
    (
        "the next verified save resolves a miss",
        [(MISSED, "_ 90x7"), (SUCCESS, "30 30 30 200x5")],
        "5m",
        "CkptdSaveMissed",
        False,
    ),
    ("a trainer exit is not a missed save", [(EXITED, "_ 90x5"), (SUCCESS, "30x6")], "3m", "CkptdSaveMissed", False),
    (
        "a trainer exit fires its own alert",
        [(EXITED, "_ 90x5"), (SUCCESS, "30x6")],
        "3m",
        "CkptdTrainerExitUnsaved",
        True,
    ),
    (
        "a resumed run's save resolves a trainer exit",
        [(EXITED, "_ 90x7"), (SUCCESS, "30 30 30 200x5")],
        "5m",
        "CkptdTrainerExitUnsaved",
        False,
    ),
    (
        "hung before its first save: stale after twice the interval",
        [(UP, "1x20"), (LOSS, "0+60x20"), (EVERY, "120x20")],
        "10m",
        "CkptdCheckpointStale",
        True,
    ),
    (
        "saving on time is not stale",
        [(UP, "1x20"), (LOSS, "0 60 120 0 60 120 0 60 120 0 60 120 0"), (EVERY, "120x20")],
        "12m",
        "CkptdCheckpointStale",
        False,
    ),
    (
        "a 1s interval is floored at 5 minutes",
        [(UP, "1x20"), (LOSS, "10x20"), (EVERY, "1x20")],
        "15m",
        "CkptdCheckpointStale",
        False,
    ),
    (
        "stale but the job ended",
        [(UP, "0x20"), (LOSS, "0x20"), (EVERY, "120x20")],
        "15m",
        "CkptdCheckpointStale",
        False,
    ),
    (
        "a corrupt checkpoint on disk fires",
        [(s("ckptd_corrupt_checkpoints"), "0 1 1 1")],
        "3m",
        "CkptdVerifyFailed",
        True,
    ),
    ("none corrupt, no alert", [(s("ckptd_corrupt_checkpoints"), "0x5")], "3m", "CkptdVerifyFailed", False),
    (
        "the corrupt file deleted, the next scrub's gauge resolves it",
        [(s("ckptd_corrupt_checkpoints"), "0 1 1 0 0")],
        "4m",
        "CkptdVerifyFailed",
        False,
    ),
    ("quota at 95% fires", [(QUOTA, "1000x10"), (BYTES, "950x10")], "8m", "CkptdQuotaNearlyExhausted", True),
    (
        "quota deletions' dips do not reset it",
        [(QUOTA, "1000x12"), (BYTES, "950 800 950 800 950 800 950 800 950 800")],
        "8m",
        "CkptdQuotaNearlyExhausted",
        True,
    ),
    ("quota at 50% does not", [(QUOTA, "1000x10"), (BYTES, "500x10")], "8m", "CkptdQuotaNearlyExhausted", False),
    ("no quota set does not", [(QUOTA, "0x10"), (BYTES, "500x10")], "8m", "CkptdQuotaNearlyExhausted", False),
    ("saving without the daemon fires", [(UNATTENDED, "_ 60x10"), (UP, "0x10")], "5m", "CkptdTrainerUnattended", True),
    ("reconnected, it resolves", [(UNATTENDED, "_ 60x10"), (UP, "0 0 0 1x8")], "5m", "CkptdTrainerUnattended", False),
    (
        "15 minutes after its last such save it resolves",
        [(UNATTENDED, "60x30")],
        "25m",
        "CkptdTrainerUnattended",
        False,
    ),
    (
        "replication lagging fires",
        [(s("ckptd_remote_lag_seconds"), "0 60 120 180 240 300+60x30")],
        "30m",
        "CkptdReplicationLagging",
        True,
    ),
    (
        "the backlog uploaded after the outage, it resolves",
        [(s("ckptd_remote_lag_seconds"), "0+60x30 0x5")],
        "33m",
        "CkptdReplicationLagging",
        False,
    ),
    (
        "replication keeping up does not",
        [(s("ckptd_remote_lag_seconds"), "0 30 0 30 0 30 0x30")],
        "25m",
        "CkptdReplicationLagging",
        False,
    ),
    (
        "a daemon down fires whatever its scrape job is named",
        [('up{job="nodes-ckptd",instance="h:9733"}', "1 1 0 0 0 0"), (BUILD, "1 1 _ _ _ _")],
        "5m",
        "CkptdDown",
        True,
    ),
    (
        "a daemon up does not",
        [('up{job="nodes-ckptd",instance="h:9733"}', "1x5"), (BUILD, "1x5")],
        "3m",
        "CkptdDown",
        False,
    ),
    ("another exporter down is not ckptd", [('up{job="node",instance="h:9100"}', "0x5")], "3m", "CkptdDown", False),
    ("no ckptd anywhere fires", [('up{job="node",instance="h:9100"}', "1x15")], "12m", "CkptdMetricsAbsent", True),
    ("a ckptd reporting does not", [(BUILD, "1x15")], "12m", "CkptdMetricsAbsent", False),
]


def render(text: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), text)


def series_labels(series: str, alert: str) -> dict[str, str]:
    """The labels an alert over ``series`` carries: all of the series' own (absent() has none)."""
    return {} if alert == "CkptdMetricsAbsent" else dict(re.findall(r'(\w+)="([^"]*)"', series))


def expected(alert: str, series: str) -> dict:
    labels = series_labels(series, alert)
    rule = RULES[alert]
    return {
        "exp_labels": {**labels, **rule.get("labels", {})},
        "exp_annotations": {k: render(v, labels) for k, v in rule["annotations"].items()},
    }


def main() -> None:
    tests = []
    for name, series, at, alert, fires in CASES:
        tests.append(
            {
                "name": name,
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series],
                "alert_rule_test": [
                    {
                        "eval_time": at,
                        "alertname": alert,
                        "exp_alerts": [expected(alert, series[0][0])] if fires else [],
                    }
                ],
            }
        )
    missing = set(RULES) - {c[3] for c in CASES if c[4]}
    assert not missing, f"no firing test for {missing}"
    doc = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": tests}
    (HERE / "alerts_test.yml").write_text(
        "# Generated by gen_alert_tests.py; run `promtool test rules alerts_test.yml`.\n"
        + yaml.safe_dump(doc, sort_keys=False, width=200)
    )


if __name__ == "__main__":
    main()

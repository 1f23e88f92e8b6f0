"""Typed settings (issue 37): one ``Settings`` value per job, with a field for every key of
``KEYS`` and nothing else but the daemon's ``remote_prefix``; resolved, stored and read back
without a key lost or a default changed."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ckptd.core import config
from ckptd.core.settings import KEYS, Settings, SettingsError, default, parse_table, resolve


def test_every_key_is_a_field_and_every_field_a_key_but_the_daemons_prefix() -> None:
    names = {f.name for f in dataclasses.fields(Settings)}
    assert names - set(KEYS) == {"remote_prefix"}
    assert set(KEYS) - names == set()


def test_the_groups_are_the_keys_tables_groups() -> None:
    s = Settings()
    for name in {spec.group for spec in KEYS.values()}:
        assert set(s.group(name)) == {k for k, spec in KEYS.items() if spec.group == name}


def test_built_in_defaults_are_what_the_spec_says() -> None:
    """SPEC §4/§5/§11: the values a job gets when nothing is set."""
    s = resolve({}, {}, {}, {})
    assert s == Settings()
    assert (s.max_overhead, s.start_after, s.save_final, s.on_preempt, s.best_mode) == (0.02, 0, True, True, "min")
    assert (s.min_interval, s.on_busy, s.keep_final, s.remote_timeout) == (0.0, "wait", True, 300.0)
    assert (s.snapshot, s.save, s.template) == ("auto", "all", "{job}-step{step:08d}.safetensors")
    assert s.keep_last is None and s.remote_keep_final is None and s.remote_prefix is None
    assert default("keep_final") is True and default("remote_keep_final") is None


def test_precedence_kwargs_over_env_over_job_table_over_defaults() -> None:
    s = resolve(
        {"keep_last": 1},
        {"keep_last": 2, "every_steps": 20},
        {"every_steps": 30, "max_bytes": 9},
        {"cron": "0 * * * *", "max_bytes": 8},
    )
    assert (s.keep_last, s.every_steps, s.max_bytes, s.cron) == (1, 20, 9, "0 * * * *")


def test_a_client_cannot_name_the_daemons_prefix() -> None:
    """``remote_prefix`` is the daemon's word (issue 33 H5): no table, kwarg or variable sets it."""
    with pytest.raises(SettingsError, match="unknown key 'remote_prefix'"):
        parse_table({"remote_prefix": "u0/elsewhere"}, "Checkpointer()")


def test_retention_and_remote_retention_read_their_own_rules() -> None:
    s = Settings(keep_last=3, remote_keep_last=1, remote_keep_best=2, best_metric="loss", best_mode="max")
    local = s.retention()
    assert local["keep_last"] == 3 and local["best_metric"] == "loss" and local["best_mode"] == "max"
    assert s.remote_retention() == {"keep_last": 1, "keep_best": 2, "best_metric": "loss", "best_mode": "max"}
    assert Settings(remote_keep_last=1).remote_retention() == {"keep_last": 1}  # no best rule: no metric


def test_what_the_catalogue_stores_reads_back_the_same() -> None:
    s = resolve(
        parse_table({"remote": "s3://b/p", "min_free": "10%", "every": "auto", "keep_within": "2h"}, "t"), {}, {}, {}
    )
    s = s.but(remote_prefix="u1/x/job")
    back = Settings.stored(json.loads(json.dumps(s.given())))
    assert back == s
    assert Settings.stored({"keep_last": 2, "a_key_of_an_older_daemon": 1}) == Settings(keep_last=2)


def test_the_daemon_table_and_watch_tables_are_typed_and_parsed() -> None:
    """``[daemon]`` and ``[[watch]]`` read as typed values: durations in seconds, sizes parsed, a
    watched tree's retention keys a job's ``Settings``, every default in one place."""
    cfg = config.parse(
        {
            "daemon": {"roots": ["/srv/a"], "scrub_every": "1h", "memory_budget": "10%", "max_jobs_per_uid": 3},
            "watch": [{"path": "/srv/a/x", "expect_every": "30m", "keep_last": 2, "on_corrupt": "quarantine"}],
        }
    )
    assert cfg.daemon.roots == ("/srv/a",) and cfg.daemon.scrub_every == 3600.0
    assert cfg.daemon.memory_budget == 0.1 and cfg.daemon.max_jobs_per_uid == 3 and cfg.daemon.socket is None
    (w,) = cfg.watch
    assert (w.path, w.expect_every, w.on_corrupt, w.settle, w.dry_run) == ("/srv/a/x", 1800.0, "quarantine", 5.0, False)
    assert w.settings.keep_last == 2 and w.settings.keep_final is True
    assert config.DAEMON_KEYS == {f.name for f in dataclasses.fields(config.DaemonConfig)}


def test_a_bad_daemon_or_watch_key_is_still_named() -> None:
    with pytest.raises(config.ConfigError, match="unknown key 'rootz'"):
        config.parse({"daemon": {"rootz": ["/srv"]}})
    with pytest.raises(SettingsError, match="keep_lats"):
        config.parse({"watch": [{"path": "/srv/x", "keep_lats": 1}]})


def test_the_policy_and_the_retention_rules_take_settings_keys_and_their_defaults() -> None:
    """``SavePolicy`` and ``retention.Rules`` keep their own dataclasses (the policy validates
    its values and reads every="auto" as ``auto``), so their fields restate keys of
    ``Settings``: each must be one (``auto`` aside), and the built-in settings must give
    exactly their defaults, so that neither twin can drift from the other unnoticed."""
    from dataclasses import fields

    from ckptd.core.policy import SavePolicy
    from ckptd.core.retention import Rules

    keys = {f.name for f in fields(Settings)}
    for twin in (SavePolicy, Rules):
        assert {f.name for f in fields(twin)} - {"auto"} <= keys, twin
    assert SavePolicy.from_settings(Settings().group("policy")) == SavePolicy()
    assert Rules.from_settings(Settings().retention()) == Rules()
    assert Rules.from_settings(Settings().remote_retention()) == Rules()

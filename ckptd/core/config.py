"""The TOML configuration file, validated at start with errors that name the key.

Sections: ``[daemon]`` (socket, state_dir, metrics_listen, roots), ``[defaults]`` and
``[jobs.NAME]`` (policy, retention and quota keys), ``[[watch]]`` (path, pattern,
expect_every and the same keys). Found at ``--config``, ``$CKPTD_CONFIG`` or
``/etc/ckptd/ckptd.toml``; a missing default file is an empty config, a missing
named file is an error.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from ckptd.core.settings import Settings, SettingsError, check_combination, parse_table, resolve
from ckptd.core.units import parse_duration, parse_listen, parse_remote, parse_size_or_percent

DEFAULT_PATH = "/etc/ckptd/ckptd.toml"
ON_CORRUPT = ("keep", "quarantine", "delete")


@dataclass(frozen=True)
class DaemonConfig:
    """The ``[daemon]`` table, typed and parsed. ``None``: the daemon's own default, which its
    module states (``ckptd.daemon.app``), so a default is written in one place."""

    socket: str | None = None
    state_dir: str | None = None
    metrics_listen: str | None = None
    roots: tuple[str, ...] = ()
    scrub_every: float | None = None  # seconds
    group: str | None = None  # who may connect: the socket's group
    admin_group: str | None = None  # who may act on every job
    max_connections_per_uid: int | None = None
    max_jobs_per_uid: int | None = None
    max_http_connections: int | None = None
    max_http_connections_per_peer: int | None = None
    http_request_timeout: float | None = None  # seconds
    remote_allow: tuple[str, ...] = ()
    remote_endpoint: str | None = None
    memory_budget: int | float | None = None  # bytes, or a share of memory


@dataclass(frozen=True)
class WatchSpec:
    """One ``[[watch]]`` table, typed: a tree of another tool's checkpoints and how ckptd adopts
    them. Its policy and retention keys are a job's (``Settings``)."""

    path: str
    pattern: str | None = None
    expect_every: float | None = None  # seconds: a save is missed when none comes this long
    job: str | None = None
    settle: float = 5.0  # seconds a checkpoint must stay unchanged before it is judged
    rescan_every: float = 180.0
    abandon_after: float = 3600.0
    on_corrupt: str = "keep"  # keep | quarantine | delete
    dry_run: bool = False
    settings: Settings = field(default_factory=Settings)


DAEMON_KEYS = {f.name for f in fields(DaemonConfig)}
WATCH_KEYS = {f.name for f in fields(WatchSpec)} - {"settings"}


class ConfigError(SettingsError):
    """A config file problem; the message names the file and the key."""


@dataclass(frozen=True)
class Config:
    path: str | None = None
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    defaults: dict[str, Any] = field(default_factory=dict)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    watch: tuple[WatchSpec, ...] = ()

    def job_table(self, job: str) -> dict[str, Any]:
        return self.jobs.get(job, {})


def config_path(explicit: str | None = None, environ: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """(path, must_exist): an explicit or $CKPTD_CONFIG path must exist, the default may not."""
    env = os.environ if environ is None else environ
    if explicit:
        return explicit, True
    if env.get("CKPTD_CONFIG"):
        return env["CKPTD_CONFIG"], True
    return DEFAULT_PATH, False


def default_state_dir(uid: int, environ: Mapping[str, str], home: str) -> str:
    """Where the catalogue goes when ``[daemon] state_dir`` is unset: systemd's own
    (``StateDirectory=`` sets ``$STATE_DIRECTORY``), root's ``/var/lib/ckptd``, else the user's
    XDG state directory. A user's daemon never writes a system directory it may not own (it
    wrote ``/var/lib/ckptd`` whenever that happened to be writable, and failed where not)."""
    if environ.get("STATE_DIRECTORY"):
        return environ["STATE_DIRECTORY"].split(":")[0]
    if uid == 0:
        return "/var/lib/ckptd"
    base = environ.get("XDG_STATE_HOME") or os.path.join(environ.get("HOME") or home, ".local", "state")
    return os.path.join(base, "ckptd")


def load(explicit: str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    path, must_exist = config_path(explicit, environ)
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        if must_exist:
            raise ConfigError(f"config file {path} does not exist") from None
        return Config()
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse(doc, path)


def parse(doc: Mapping[str, Any], path: str = "<config>") -> Config:
    unknown = set(doc) - {"daemon", "defaults", "jobs", "watch"}
    if unknown:
        raise ConfigError(
            f"{path}: unknown section [{sorted(unknown)[0]}] (expected [daemon], [defaults], [jobs.NAME], [[watch]])"
        )
    daemon = _daemon(_table(doc, "daemon", path), path)
    defaults = parse_table(_table(doc, "defaults", path), f"{path} [defaults]")
    jobs = {
        name: parse_table(_as_table(t, f"{path} [jobs.{name}]"), f"{path} [jobs.{name}]")
        for name, t in _table(doc, "jobs", path).items()
    }
    watch = doc.get("watch", [])
    if not isinstance(watch, list):
        raise ConfigError(f"{path}: watch must be an array of tables ([[watch]])")
    return Config(
        path, daemon, defaults, jobs, tuple(_watch(w, f"{path} [[watch]] #{i + 1}") for i, w in enumerate(watch))
    )


def _table(doc: Mapping[str, Any], name: str, path: str) -> dict[str, Any]:
    return _as_table(doc.get(name, {}), f"{path} [{name}]")


def _as_table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table")
    return value


def _daemon(t: dict[str, Any], path: str) -> DaemonConfig:
    """The [daemon] table: every key known and of its type first, then each value parsed."""
    for key, value in t.items():
        _daemon_key(key, value, f"{path} [daemon]")
    out = _daemon_values(dict(t), f"{path} [daemon]")
    return DaemonConfig(
        **{**out, "roots": tuple(out.get("roots", ())), "remote_allow": tuple(out.get("remote_allow", ()))}
    )


def _daemon_key(key: str, value: Any, where: str) -> None:
    if key not in DAEMON_KEYS:
        raise ConfigError(f"{where}: unknown key {key!r} (expected one of {', '.join(sorted(DAEMON_KEYS))})")
    if key in ("roots", "remote_allow") and not (isinstance(value, list) and all(isinstance(r, str) for r in value)):
        raise ConfigError(f"{where}: {key} must be a list of " + ("paths" if key == "roots" else "URLs"))
    if key in ("socket", "state_dir", "metrics_listen", "group", "admin_group", "remote_endpoint") and not isinstance(
        value, str
    ):
        raise ConfigError(f"{where}: {key} must be a string")
    if key.startswith("max_") and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{where}: {key} must be a positive integer, got {value!r}")


def _daemon_values(out: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        if "memory_budget" in out:
            out["memory_budget"] = parse_size_or_percent(out["memory_budget"])
    except ValueError as exc:
        raise ConfigError(f"{where}: memory_budget: {exc}") from None
    try:
        if "metrics_listen" in out:
            parse_listen(out["metrics_listen"])
    except ValueError as exc:
        raise ConfigError(f"{where}: metrics_listen: {exc}") from None
    try:
        for url in out.get("remote_allow", []):
            parse_remote(url)
    except ValueError as exc:
        raise ConfigError(f"{where}: remote_allow: {exc}") from None
    for key in ("scrub_every", "http_request_timeout"):
        if key in out:
            out[key] = _duration(out[key], f"{where}: {key}")
    if out.get("http_request_timeout", 1) <= 0:
        raise ConfigError(f"{where}: http_request_timeout must be a positive duration")
    return out


def _watch(t: Any, where: str) -> WatchSpec:
    t = _as_table(t, where)
    if not isinstance(t.get("path"), str):
        raise ConfigError(f"{where}: path is required")
    own = {k: v for k, v in t.items() if k in WATCH_KEYS}
    for key in ("path", "pattern", "job"):
        if key in own and not isinstance(own[key], str):
            raise ConfigError(f"{where}: {key} must be a string, got {own[key]!r}")
    if own.get("on_corrupt", "keep") not in ON_CORRUPT:
        raise ConfigError(f"{where}: on_corrupt must be one of {', '.join(ON_CORRUPT)}, got {own['on_corrupt']!r}")
    if not isinstance(own.get("dry_run", False), bool):
        raise ConfigError(f"{where}: dry_run must be true or false")
    for key in ("expect_every", "settle", "rescan_every", "abandon_after"):
        if key in own:
            own[key] = _duration(own[key], f"{where}: {key}")
    keys = parse_table({k: v for k, v in t.items() if k not in WATCH_KEYS}, where)
    check_combination({**own, **keys}, where)
    return WatchSpec(**own, settings=resolve(keys, {}, {}, {}))


def _duration(value: Any, where: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None

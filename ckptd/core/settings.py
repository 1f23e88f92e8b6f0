"""Every user-facing policy, retention and quota key, parsed one way everywhere.

The same key arrives as a hook kwarg, a ``CKPTD_*`` environment variable, a TOML
value under ``[defaults]`` / ``[jobs.NAME]`` / ``[[watch]]``, or a ``--dashed`` CLI
option. One table (``KEYS``) says how each is parsed, so an error always names the
key and where it came from, and the precedence (kwargs > env > job table >
defaults) is applied in exactly one place: ``resolve``.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, Mapping

from ckptd.core.units import parse_duration, parse_remote, parse_size, parse_size_or_percent


class SettingsError(ValueError):
    """A bad key or value; the message names the key and its source."""


def _int(minimum: int) -> Callable[[Any], int]:
    def parse(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise ValueError(f"expected an integer, got {v!r}")
        try:
            n = int(v)
        except ValueError:
            raise ValueError(f"expected an integer, got {v!r}") from None
        if n < minimum:
            raise ValueError(f"must be at least {minimum}, got {n}")
        return n

    return parse


def _pos_float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got {v!r}")
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {v!r}") from None
    if not math.isfinite(x) or not x > 0:
        raise ValueError(f"must be a finite number greater than 0, got {v!r}")
    return x


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    text = str(v).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {v!r}")


def _choice(*options: str) -> Callable[[Any], str]:
    def parse(v: Any) -> str:
        if v not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {v!r}")
        return str(v)

    parse.choices = options  # type: ignore[attr-defined]  # the CLI offers them as a click.Choice
    return parse


def _text(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"expected a non-empty string, got {v!r}")
    return v


def _cron(v: Any) -> str:
    """Validated with APScheduler itself, imported only when a cron key is used."""
    from apscheduler.triggers.cron import CronTrigger

    text = _text(v)
    try:
        CronTrigger.from_crontab(text)
    except ValueError as exc:
        raise ValueError(f"not a valid cron expression {text!r}: {exc}") from None
    return text


def _every(v: Any) -> float | str:
    """A duration, or "auto": the interval chosen from measured save cost and failure rate."""
    if isinstance(v, str) and v.strip().lower() == "auto":
        return "auto"
    return parse_duration(v)


def _fraction(v: Any) -> float:
    """0.02 or "2%": a share of something, strictly between 0 and 1."""
    text = v.strip() if isinstance(v, str) else v
    if isinstance(text, str) and text.endswith("%"):
        x = _pos_float(text[:-1]) / 100
    else:
        x = _pos_float(text)
    if not x < 1:
        raise ValueError(f"must be a fraction below 1 (0.02 or '2%'), got {v!r}")
    return x


def _template(v: Any) -> str:
    text = _text(v)
    if "/" in text or "{step" not in text:
        raise ValueError(f"a file name template must contain {{step}} and no '/', got {v!r}")
    return text


@dataclass(frozen=True)
class Key:
    parse: Callable[[Any], Any]
    group: str
    help: str


KEYS: dict[str, Key] = {
    # save policy (SPEC §4)
    "every_steps": Key(_int(1), "policy", "save every N completed steps"),
    "saves_per_epoch": Key(_int(1), "policy", "saves per epoch (needs steps_per_epoch; interval rounds down)"),
    "steps_per_epoch": Key(_int(1), "policy", "optimizer steps in one epoch"),
    "every_epochs": Key(_pos_float, "policy", "save every F epochs (0.25 = each quarter epoch)"),
    "every": Key(
        _every,
        "policy",
        "save when this long has passed since the last save (90s, 30m, 2h), "
        "or 'auto': the interval from the measured save cost and the job's failure rate",
    ),
    "mtbf": Key(
        parse_duration,
        "policy",
        "with every='auto': mean time between failures (default: "
        "estimated from the job's unclean exits, starting from 24h)",
    ),
    "max_overhead": Key(
        _fraction, "policy", "with every='auto': at most this share of training stalled by saves (0.02 or '2%')"
    ),
    "cron": Key(_cron, "policy", "save on a cron schedule (APScheduler crontab syntax)"),
    "start_after": Key(
        _int(0), "policy", "no scheduled save before this step (final and preemption saves still happen)"
    ),
    "total_steps": Key(_int(1), "policy", "steps in the run; the final save is at this step"),
    "save_final": Key(_bool, "policy", "always save the last step of the run"),
    "on_preempt": Key(_bool, "policy", "save on SIGTERM/SIGUSR1 before the original handler runs"),
    "best_metric": Key(_text, "policy", "metric name: save when it improves"),
    "best_mode": Key(_choice("min", "max"), "policy", "min or max: which direction is better"),
    "min_interval": Key(parse_duration, "policy", "never two scheduled saves closer than this"),
    "on_busy": Key(
        _choice("wait", "skip"), "policy", "scheduled save while the last is still being written: wait or skip"
    ),
    # retention (SPEC §5)
    "keep_last": Key(_int(0), "retention", "keep the N newest verified checkpoints"),
    "keep_best": Key(_int(0), "retention", "keep the K best by best_metric"),
    "keep_every_steps": Key(_int(1), "retention", "keep milestones: step % M == 0"),
    "keep_hourly": Key(_int(0), "retention", "keep the newest checkpoint of each of the last N hours"),
    "keep_daily": Key(_int(0), "retention", "keep the newest checkpoint of each of the last N days"),
    "keep_within": Key(parse_duration, "retention", "keep everything newer than this"),
    "keep_final": Key(_bool, "retention", "keep the final checkpoint of a run"),
    "quarantine_dir": Key(_text, "retention", "move corrupt or deleted checkpoints here instead of deleting"),
    # quota (SPEC §5)
    "max_bytes": Key(parse_size, "quota", "disk budget of the job (500MiB, 2TB)"),
    "min_free": Key(parse_size_or_percent, "quota", "free space to leave on the filesystem (bytes or 10%)"),
    # remote tier (SPEC §11); the remote_keep_* rules are added below from §5's
    "remote": Key(parse_remote, "remote", "replicate verified checkpoints to s3://bucket/prefix or file:///path"),
    "remote_endpoint": Key(_text, "remote", "S3 endpoint URL, for S3-compatible stores (MinIO, Ceph, ...)"),
    "remote_timeout": Key(parse_duration, "remote", "embedded mode: how long close() waits for uploads"),
    # GPU state (SPEC §10)
    "snapshot": Key(
        _choice("auto", "host", "device", "overlap"),
        "hook",
        "'host' copies the state straight "
        "into (page-locked) shared memory in step(); 'overlap' copies parameters and optimizer state while "
        "the next forward/backward run, done before the optimizer writes them; 'device' (not yet built: "
        "host is used) a GPU copy first; 'auto' picks host",
    ),
    # the memory tier (SPEC §14)
    "every_memory": Key(
        parse_duration,
        "hook",
        "with a daemon: also a save to its memory tier only (no disk) "
        "this often, shorter than the disk interval; resume after a trainer crash starts there",
    ),
    # fine-tuning (SPEC §13)
    "save": Key(
        _choice("all", "trainable"),
        "hook",
        "'trainable': only parameters with requires_grad, "
        "the buffers that changed, the optimizer and the rest (resume needs the base loaded first)",
    ),
    # naming (SPEC §7)
    "template": Key(_template, "naming", "checkpoint file name template"),
}


for _key in ("keep_last", "keep_best", "keep_every_steps", "keep_hourly", "keep_daily", "keep_within", "keep_final"):
    _local = KEYS[_key]
    KEYS["remote_" + _key] = Key(_local.parse, "remote", f"remote copies: {_local.help}")


@dataclass(frozen=True)
class Settings:
    """One job's resolved settings, typed: the built-in defaults here, each key's parser and help in
    ``KEYS``. Code reads ``settings.keep_last``, never a string key, so a misspelt key is a type
    error, not a silent None. ``remote_prefix`` is no user's key: the daemon sets it (the owner's
    uid, the directory and the name; issue 33), and a trainer's value is never asked for."""

    # save policy (SPEC §4)
    every_steps: int | None = None
    saves_per_epoch: int | None = None
    steps_per_epoch: int | None = None
    every_epochs: float | None = None
    every: float | str | None = None  # seconds, or "auto"
    mtbf: float | None = None
    max_overhead: float = 0.02
    cron: str | None = None
    start_after: int = 0
    total_steps: int | None = None
    save_final: bool = True
    on_preempt: bool = True
    best_metric: str | None = None
    best_mode: str = "min"
    min_interval: float = 0.0
    on_busy: str = "wait"
    # retention (SPEC §5)
    keep_last: int | None = None
    keep_best: int | None = None
    keep_every_steps: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_within: float | None = None
    keep_final: bool = True
    quarantine_dir: str | None = None
    # quota (SPEC §5)
    max_bytes: int | None = None
    min_free: int | float | None = None  # bytes, or a share of the filesystem
    # remote tier (SPEC §11)
    remote: str | None = None
    remote_endpoint: str | None = None
    remote_timeout: float = 300.0
    remote_keep_last: int | None = None
    remote_keep_best: int | None = None
    remote_keep_every_steps: int | None = None
    remote_keep_hourly: int | None = None
    remote_keep_daily: int | None = None
    remote_keep_within: float | None = None
    remote_keep_final: bool | None = None
    remote_prefix: str | None = None  # the daemon's word, not a key
    # the hook (SPEC §10, §13, §14)
    snapshot: str = "auto"
    every_memory: float | None = None
    save: str = "all"
    # naming (SPEC §7)
    template: str = "{job}-step{step:08d}.safetensors"

    def group(self, name: str) -> dict[str, Any]:
        """The keys of one group (policy, retention, quota, remote, ...), as the policies take them."""
        return {k: getattr(self, k) for k, spec in KEYS.items() if spec.group == name}

    def retention(self) -> dict[str, Any]:
        """The retention rules with the metric the best rule ranks by, as ``retention.Rules`` takes them."""
        return {**self.group("retention"), "best_metric": self.best_metric, "best_mode": self.best_mode}

    def remote_retention(self) -> dict[str, Any]:
        """The remote copies' retention rules under the local rules' names (``remote_keep_last`` as
        ``keep_last``), with the metric the best rule ranks by."""
        remote = self.group("remote").items()
        rules = {k[len("remote_") :]: v for k, v in remote if k.startswith("remote_keep") and v is not None}
        if "keep_best" in rules:
            rules.update(best_metric=self.best_metric, best_mode=self.best_mode)
        return rules

    def remote_url(self) -> str:
        """The remote tier's URL, for code that runs only when there is one (a bug otherwise: raised)."""
        if self.remote is None:
            raise SettingsError("no remote tier is set (remote=)")
        return self.remote

    def given(self) -> dict[str, Any]:
        """The keys with a value (what the catalogue stores and a status shows)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def but(self, **changes: Any) -> Settings:
        """These settings with ``changes``; the names are checked as the dataclass checks them."""
        return replace(self, **changes)

    @classmethod
    def stored(cls, values: Mapping[str, Any]) -> Settings:
        """Settings written by ``given`` (already parsed) read back; keys no longer known are left out."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


DEFAULTS = Settings()


def default(key: str) -> Any:
    """A key's built-in default (``None``: unset)."""
    return getattr(DEFAULTS, key)


def parse_value(key: str, value: Any, source: str) -> Any:
    """One value through its parser; the error names the key and where it came from."""
    if key not in KEYS:
        raise SettingsError(f"{source}: unknown key {key!r}" + _suggest(key))
    try:
        return KEYS[key].parse(value)
    except ValueError as exc:
        raise SettingsError(f"{source}: {key}: {exc}") from None


def _suggest(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, KEYS, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_table(table: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A TOML table or kwargs dict, every key checked; None values are left out."""
    return {k: parse_value(k, v, source) for k, v in table.items() if v is not None}


ENV_NAMES = {"CKPTD_SOCKET", "CKPTD_CONFIG", "CKPTD_SOAK", "CKPTD_BENCH_DIR", "CKPTD_BENCH_RESULTS"}


def unknown_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """``CKPTD_*`` variables that are no key and no variable of ours, each with a suggestion:
    a typo there (``CKPTD_EVERY_STEP``) would otherwise be ignored silently."""
    env = os.environ if environ is None else environ
    known = {"CKPTD_" + k.upper() for k in KEYS} | ENV_NAMES
    out = []
    for name in sorted(n for n in env if n.startswith("CKPTD_") and n not in known):
        close = difflib.get_close_matches(name, sorted(known), n=1)
        out.append(f"{name} is not a ckptd setting" + (f" (did you mean {close[0]}?)" if close else ""))
    return out


def env_table(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The keys set as ``CKPTD_*`` variables, as written (the hook passes them on to the daemon,
    which parses them itself, exactly as the hook's kwargs)."""
    env = os.environ if environ is None else environ
    return {key: env["CKPTD_" + key.upper()] for key in KEYS if env.get("CKPTD_" + key.upper(), "") != ""}


def from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``CKPTD_EVERY_STEPS=500`` and friends (``unknown_env`` lists the names that are not)."""
    return {
        key: parse_value(key, value, f"environment variable CKPTD_{key.upper()}")
        for key, value in env_table(environ).items()
    }


def resolve(
    kwargs: Mapping[str, Any], env: Mapping[str, Any], job_table: Mapping[str, Any], defaults_table: Mapping[str, Any]
) -> Settings:
    """Precedence: kwargs > env > job table > defaults table > built-in defaults."""
    out: dict[str, Any] = {}
    for layer in (defaults_table, job_table, env, kwargs):
        out.update(layer)
    check_combination(out)
    return Settings(**{k: v for k, v in out.items() if k in KEYS})


def check_combination(settings: Mapping[str, Any], source: str = "settings") -> None:
    """Keys that only mean something together."""
    if settings.get("keep_best") and not settings.get("best_metric"):
        raise SettingsError(f"{source}: keep_best={settings['keep_best']} needs best_metric (the metric to rank by)")

"""Verbs that run or ask the service: serve, watch, status, demo."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import click

from ckptd.cli.base import SOCKET_OPTION, ask, main, setting_options
from ckptd.core.settings import SettingsError
from ckptd.core.units import format_bytes, format_duration, parse_listen


@main.command()
@click.option("--config", "config_file", default=None, envvar="CKPTD_CONFIG", help="TOML config file")
@click.option("--socket", "socket_path", default=None, help="overrides [daemon] socket")
@click.option("--state-dir", default=None, help="overrides [daemon] state_dir")
@click.option("--metrics-listen", default=None, help="overrides [daemon] metrics_listen (host:port)")
@click.option("--root", "roots", multiple=True, help="overrides [daemon] roots (repeatable)")
@click.option("--log-level", default="INFO", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@click.option("--check", is_flag=True, help="validate the configuration and exit (0: valid) without starting")
def serve(
    config_file: str | None,
    socket_path: str | None,
    state_dir: str | None,
    metrics_listen: str | None,
    roots: tuple[str, ...],
    log_level: str,
    check: bool,
) -> None:
    """Run the daemon: trainers hand it their checkpoints over the socket. SIGHUP re-reads the config."""
    from ckptd.core import config as config_mod
    from ckptd.daemon import journal
    from ckptd.daemon.app import Daemon

    journal.configure(log_level)
    try:
        cfg = config_mod.load(config_file)
        if metrics_listen is not None:
            parse_listen(metrics_listen)
        daemon = Daemon(
            cfg, socket_path=socket_path, state_dir=state_dir, metrics_listen=metrics_listen, roots=list(roots) or None
        )
        if check:
            click.echo(f"{cfg.path or 'no configuration file'}: valid ({daemon.check()})")
            return
        daemon.serve_forever()
    except ValueError as exc:  # SettingsError, TargetError and a malformed --metrics-listen
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@setting_options("retention", "quota")
@click.option("--job", default=None, help="job name for metrics and the catalogue (default: the directory's name)")
@click.option("--pattern", default=None, help="only checkpoints whose name matches this glob")
@click.option("--expect-every", default=None, help="alert (missed, time_overdue) when no new checkpoint for this long")
@click.option("--settle", default="5s", help="quiet time before a new checkpoint is judged")
@click.option("--rescan-every", default="3m", help="full rescan period (catches events inotify dropped)")
@click.option(
    "--abandon-after", default="1h", help="judge a checkpoint that stayed incomplete this long with no writes"
)
@click.option(
    "--on-corrupt",
    type=click.Choice(["keep", "quarantine", "delete"]),
    default="keep",
    show_default=True,
    help="what retention does with a checkpoint that fails verification (keep: alert only)",
)
@click.option("--dry-run", is_flag=True, help="log what retention would keep and delete, and why; delete nothing")
@click.option(
    "--state-dir",
    default=None,
    help="catalogue directory (default: a private one under /var/lib/ckptd or ~/.local/state/ckptd)",
)
@click.option("--metrics-listen", default="127.0.0.1:9733")
@click.option("--socket", "socket_path", default=None, help="socket for status/list (default: STATE_DIR/ckptd.sock)")
def watch(
    directory: str,
    job: str | None,
    pattern: str | None,
    expect_every: str | None,
    settle: str,
    rescan_every: str,
    abandon_after: str,
    on_corrupt: str,
    dry_run: bool,
    state_dir: str | None,
    metrics_listen: str,
    socket_path: str | None,
    **options: Any,
) -> None:
    """Adopt the checkpoints another tool writes into DIRECTORY: verify, catalogue, retain, alert."""
    from ckptd.core import config as config_mod
    from ckptd.daemon import journal
    from ckptd.daemon.app import Daemon
    from ckptd.disk.preflight import TargetError

    journal.configure("INFO")
    root = os.path.realpath(directory)
    if not os.path.isdir(root):
        raise click.UsageError(
            f"{directory} is not a directory (watch mode adopts what another tool writes there; it does not create it)"
        )
    state = state_dir or _private_state_dir(root)
    table = {
        "path": root,
        "settle": settle,
        "rescan_every": rescan_every,
        "abandon_after": abandon_after,
        "on_corrupt": on_corrupt,
        "dry_run": dry_run,
        **({"job": job} if job else {}),
        **({"pattern": pattern} if pattern else {}),
        **({"expect_every": expect_every} if expect_every else {}),
        **{k: v for k, v in options.items() if v is not None},
    }
    try:
        cfg = config_mod.parse({"watch": [table]}, "command line")
        Daemon(
            cfg,
            socket_path=socket_path or os.path.join(state, "ckptd.sock"),
            state_dir=state,
            metrics_listen=metrics_listen,
            roots=[root],
        ).serve_forever()
    except (SettingsError, TargetError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@SOCKET_OPTION
def status(as_json: bool, socket_path: str | None) -> None:
    """Every job the daemon knows: step, last verified save and its age, next due, missed, failed."""
    jobs = ask(socket_path, {"type": "status"})["jobs"]
    if as_json:
        click.echo(json.dumps(jobs, indent=2))
        return
    click.echo(
        f"{'job':<16} {'pid':>7} {'step':>8} {'verified':>8} {'age':>6} {'next':>8} "
        f"{'ckpts':>5} {'bytes':>10} {'missed':>6} {'failed':>6}  directory"
    )
    for j in jobs:
        age = format_duration(j["last_verified_age"]) if j["last_verified_age"] is not None else "-"
        click.echo(
            f"{j['job']:<16} {j['pid'] or '-':>7} {j['step']:>8} {_dash(j['last_verified_step']):>8} "
            f"{age:>6} {_dash(j['next_due_step']):>8} {j['checkpoints']:>5} {format_bytes(j['bytes']):>10} "
            f"{j['missed']:>6} {j['failed']:>6}  {j.get('directory', '')}"
        )
        if j.get("auto"):
            memory = (j["auto"].get("memory") or {}).get("seconds")
            also = f", a memory-only save every {memory:.3g}s" if memory else ""
            click.echo(
                f"{'':<16} every=auto: a save every {j['auto']['seconds']:.3g}s{also} "
                f"({j['auto']['reason']}; rule {j['auto']['rule']})"
            )
        standing = _standing(j)
        if standing:
            click.echo(f"{'':<16} {standing}")
        if j.get("memory_bytes"):
            click.echo(
                f"{'':<16} memory tier: the newest snapshot, {format_bytes(j['memory_bytes'])}, held by the "
                "daemon (a crashed trainer resumes from it)"
            )


def _standing(j: dict[str, Any]) -> str:
    """The second line of a job: its state, what failed last, replication and quota (what on-call
    asks first). Counts are since the catalogue began, so they survive a daemon restart."""
    parts = [f"state {j.get('state', '-')}"]
    if j.get("missed_total") or j.get("failed_total"):
        parts.append(f"{j.get('missed_total', 0)} missed, {j.get('failed_total', 0)} failed in all")
    err = j.get("last_error")
    if err:
        parts.append(f"last error {format_duration(time.time() - err['time'])} ago: {err['reason']}: {err['error']}")
    if j.get("remote"):
        lag = j.get("remote_lag")
        parts.append(
            f"remote {j['remote']}: {j.get('remote_pending', 0)} pending"
            + (f", lag {format_duration(lag)}" if lag else "")
        )
    if j.get("quota_bytes"):
        parts.append(
            f"quota {format_bytes(j['bytes'])} of {format_bytes(j['quota_bytes'])} "
            f"({100 * (j.get('quota_used') or 0):.0f}%)"
        )
    return "; ".join(parts)


def _dash(v: Any) -> str:
    return "-" if v is None else str(v)


@main.command()
@click.option("--dir", "directory", default=None, help="where to put the demo run (default: a temp dir)")
def demo(directory: str | None) -> None:
    """A toy training run with the hook: saves, a crash, a resume, verification."""
    from ckptd.demo import run_demo

    run_demo(directory)


def _private_state_dir(root: str) -> str:
    """``ckptd watch``'s catalogue and socket: in the user's own state directory, never in the
    watched tree, where another user could have prepared them."""
    import hashlib

    base = os.environ.get("XDG_STATE_HOME") or (
        "/var/lib" if os.getuid() == 0 else os.path.join(os.path.expanduser("~"), ".local", "state")
    )
    path = os.path.join(base, "ckptd", "watch-" + hashlib.sha256(root.encode()).hexdigest()[:16])
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if st.st_uid != os.getuid() or not os.path.isdir(path) or os.path.islink(path):
        raise click.UsageError(f"{path} is not a directory of yours; pass --state-dir")
    return path

"""Verbs on checkpoints: verify, plan, list, latest, pin/unpin, gc. They read the files
themselves (ckptd's and other tools'), and ask the daemon only about a job name."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import click

from ckptd.cli.base import SOCKET_OPTION, ask, is_directory, main, setting_options
from ckptd.cli.remote import is_remote, job_url, list_remote, remote_options, verify_remote_cmd
from ckptd.core.settings import KEYS, Settings, SettingsError, parse_table, resolve
from ckptd.core.units import format_bytes, format_duration
from ckptd.disk.scan import Checkpoint, pin_path, read_info, scan, set_pinned
from ckptd.disk.verify import VerifyResult, verify_file


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="print one JSON object per checkpoint, in a list, at the end")
@remote_options
def verify(paths: tuple[str, ...], as_json: bool, endpoint: str | None) -> None:
    """Verify checkpoints, ckptd's or other tools' (.pt/.bin/.ckpt, HF checkpoint-N/, DCP, sharded
    safetensors), or a remote job's (s3://bucket/prefix/JOB[/FILE], file:///...): every tensor read
    and checked. One line per checkpoint as it finishes; exit 1 on any that is corrupt, unsafe or missing."""
    from ckptd.foreign import formats as foreign

    remote_ok = all([verify_remote_cmd(p, endpoint, as_json) for p in paths if is_remote(p)])
    paths = tuple(p for p in paths if not is_remote(p))
    if not paths:
        sys.exit(0 if remote_ok else 1)
    results: list[VerifyResult] = []
    for p in paths:
        if not os.path.lexists(p):
            results.append(VerifyResult(p, False, "no such file or directory"))
            _verified_line(results[-1], as_json, "MISSING")
            continue
        units = foreign.find(p)
        if not units:
            results.append(VerifyResult(p, False, "no checkpoint found here (ckptd's or a known foreign format)"))
            _verified_line(results[-1], as_json, "MISSING")
        for unit in units:
            results.append(foreign.verify(unit))
            _verified_line(results[-1], as_json)
    if as_json:
        click.echo(json.dumps([r.to_json() for r in results], indent=2))
    sys.exit(0 if remote_ok and all(r.ok for r in results) else 1)


def _verified_line(r: VerifyResult, as_json: bool, status: str = "") -> None:
    if as_json:
        return
    status = status or ("ok" if r.ok else "UNSAFE" if r.unsafe else "CORRUPT")
    detail = f"{r.tensors} tensors, {format_bytes(r.bytes)}" if r.ok else r.reason
    click.echo(f"{status:<7} {r.path}: {detail}")


@main.command("list")
@click.argument("target", required=False)
@click.option("--job", default=None, help="only this job's checkpoints (with a directory)")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@click.option(
    "--remote",
    "remote",
    is_flag=True,
    help="TARGET's remote tier: a job name (its remote from $CKPTD_*/the config), the hook's remote= URL (every job below it) or s3://bucket/prefix/JOB",
)
@remote_options
@SOCKET_OPTION
def list_cmd(
    target: str | None, job: str | None, as_json: bool, remote: bool, endpoint: str | None, socket_path: str | None
) -> None:
    """Checkpoints of a directory (read from the files), of a job (asked from the daemon), or with
    --remote the committed checkpoints of a job on its remote tier."""
    if remote or (target is not None and is_remote(target)):
        if target is None:
            raise click.UsageError("--remote needs a job: its name, or its URL s3://bucket/prefix/JOB")
        if not is_remote(target):  # a job's name: the caller's own jobs of that name
            url, endpoint = job_url(target, endpoint, os.environ.get("CKPTD_CONFIG"))
            list_remote(url, endpoint, as_json, own_job=target)
            return
        list_remote(target, endpoint, as_json)
        return
    if target is not None and is_directory(target):
        items = _directory_items(target, job)
    else:
        rows = ask(socket_path, {"type": "list", "job": target})["checkpoints"]
        items = [{**r, "problem": "" if r["verified"] else (r.get("reason") or "not verified")} for r in rows]
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    now = time.time()
    click.echo(f"{'step':>10}  {'job':<16} {'trigger':<11} {'size':>10}  {'age':>6}  path")
    for c in items:
        pin = " (pinned)" if c["pinned"] else ""
        bad = f"  UNREADABLE: {c['problem']}" if c["problem"] else ""
        step = "-" if c["step"] is None or c["step"] < 0 else c["step"]
        click.echo(
            f"{step:>10}  {c['job'] or '-':<16} {c['trigger'] or '-':<11} {format_bytes(c['bytes']):>10}  "
            f"{format_duration(max(0.0, now - c['created'])):>6}  {c['path']}{pin}{bad}"
        )


def _directory_items(directory: str, job: str | None) -> list[dict[str, Any]]:
    """Every checkpoint at or below ``directory``: ckptd's own described by their headers wherever
    they are (a parent of job directories too), other tools' by what their layout says (a step
    that cannot be known is None, shown as "-", never 0 or -1)."""
    from ckptd.foreign import formats as foreign

    own = [c for c in scan(directory) if c.job or not c.ok]  # a header without ckptd's keys is foreign
    items = [_info_json(c) for c in own if job is None or c.job == job]
    seen = {c.path for c in own}
    for f in foreign.find(directory):
        if f.path in seen:
            continue
        info = read_info(f.path) if f.kind in ("safetensors", "ckptd-sharded") else None
        if info is not None and info.job:
            if job is None or info.job == job:
                items.append(_info_json(info))
        elif job is None:
            items.append(
                {
                    "path": f.path,
                    "job": "",
                    "step": f.step,
                    "epoch": None,
                    "bytes": f.bytes,
                    "created": f.mtime,
                    "trigger": f.kind,
                    "rule": "",
                    "metrics": {},
                    "pinned": os.path.exists(pin_path(f.path)),
                    "problem": "",
                }
            )
    return sorted(items, key=lambda c: (c["step"] if c["step"] is not None else -1, c["created"], c["path"]))


def _info_json(c: Checkpoint) -> dict[str, Any]:
    return {
        "path": c.path,
        "job": c.job,
        "step": c.step,
        "epoch": c.epoch,
        "bytes": c.bytes,
        "created": c.created,
        "trigger": c.trigger,
        "rule": c.rule,
        "metrics": c.metrics,
        "pinned": c.pinned,
        "problem": c.problem,
    }


@main.command()
@click.argument("target")
@click.option("--job", default=None, help="with a directory: only this job")
@click.option("--json", "as_json", is_flag=True, help='print {"path": ...} instead of the bare path')
@SOCKET_OPTION
def latest(target: str, job: str | None, as_json: bool, socket_path: str | None) -> None:
    """Path of the newest checkpoint that verifies now, of a directory or a job (exit 1 if none)."""
    path = (
        ask(socket_path, {"type": "latest", "job": target})["path"]
        if not is_directory(target)
        else _newest_in(target, job)
    )
    click.echo(json.dumps({"path": path}) if as_json else path)


def _newest_in(target: str, job: str | None) -> str:
    """ckptd's own first (by step), then other tools' checkpoints (by step, then time)."""
    from ckptd.foreign import formats as foreign
    from ckptd.save.newest import first_verified, newest_verified

    def check(c: Checkpoint) -> VerifyResult:
        result = verify_file(c.path)
        if not result.ok:
            click.echo(f"skipping {c.path}: {result.reason}", err=True)
        return result

    found = newest_verified(target, job, check=check)
    if found is not None:
        return found.path
    others = sorted(
        (f for f in foreign.find(target) if f.kind not in ("safetensors", "ckptd-sharded")),
        key=lambda f: (f.step if f.step is not None else -1, f.mtime),
        reverse=True,
    )
    if job is None and (other := first_verified(others, foreign.verify)) is not None:
        return other.path
    raise click.ClickException(f"no verified checkpoint in {target}")


@main.command()
@click.argument("path", type=click.Path(exists=True))
def pin(path: str) -> None:
    """Keep PATH whatever the retention rules say."""
    _set_pin(path, True)
    _tell_daemon({"type": "pin", "path": os.path.abspath(path)})
    click.echo(f"pinned {path}")


@main.command()
@click.argument("path", type=click.Path())
def unpin(path: str) -> None:
    """Let retention rules decide about PATH again."""
    _set_pin(path, False)
    _tell_daemon({"type": "unpin", "path": os.path.abspath(path)})
    click.echo(f"unpinned {path}")


def _set_pin(path: str, pinned: bool) -> None:
    try:
        set_pinned(path, pinned)
    except OSError as exc:
        raise click.ClickException(
            f"cannot {'pin' if pinned else 'unpin'} {path}: "
            f"{exc.strerror or exc} (the marker .{os.path.basename(path)}.pinned "
            "lives beside it)"
        ) from None


def _tell_daemon(msg: dict[str, Any]) -> None:
    """The pin marker file is the truth; a running daemon's catalogue follows it when it can."""
    from ckptd.wire.client import DaemonUnavailable, request
    from ckptd.wire.protocol import default_socket_path

    try:
        request(default_socket_path(), msg, timeout=5)
    except DaemonUnavailable:
        pass


@main.command()
@click.argument("target")
@click.option("--job", default=None, help="with a directory: only this job (default: each job in it)")
@click.option("--dry-run", is_flag=True, help="show what would be deleted and why; delete nothing")
@click.option("--config", "config_file", default=None, help="TOML config whose [defaults]/[jobs.NAME] apply")
@setting_options("retention", "quota")
@click.option("--best-metric", default=None, help="metric name for --keep-best")
@click.option("--best-mode", default=None, type=click.Choice(["min", "max"]))
@click.option("--json", "as_json", is_flag=True, help="print every verdict as one JSON list")
@SOCKET_OPTION
def gc(
    target: str,
    job: str | None,
    dry_run: bool,
    config_file: str | None,
    socket_path: str | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Apply retention to a directory, or to a job of the daemon: keep/delete and the rule that decided."""
    directory = is_directory(target)
    reply = (
        _daemon_gc(socket_path, target, job, dry_run)
        if directory
        else ask(socket_path, {"type": "gc", "job": target, "dry_run": dry_run})
    )
    if reply is not None:
        _show_daemon_gc(reply, target, job, dry_run, as_json, options)
    else:
        _local_gc(target, job, dry_run, config_file, as_json, options)


def _show_daemon_gc(
    reply: dict[str, Any], target: str, job: str | None, dry_run: bool, as_json: bool, options: dict[str, Any]
) -> None:
    """What the daemon did with the job's own settings (the command line's are said to be unused)."""
    given = sorted(k for k, v in options.items() if v is not None and k in KEYS)
    if given:
        click.echo(
            f"ckptd gc: the daemon owns {target} and applies the job's own settings; "
            f"{', '.join('--' + k.replace('_', '-') for k in given)} not used",
            err=True,
        )
    if as_json:
        click.echo(json.dumps(reply["verdicts"], indent=2))
    else:
        _print_verdicts(job or target, reply["verdicts"], dry_run, {})


def _local_gc(
    target: str, job: str | None, dry_run: bool, config_file: str | None, as_json: bool, options: dict[str, Any]
) -> None:
    """No daemon owns ``target``: retention applied here, per job, with the config and command line."""
    from ckptd.core import config as config_mod
    from ckptd.core.retention import verdict_row
    from ckptd.save.keep import collect

    try:
        cfg = config_mod.load(config_file)
        cli = parse_table({k: v for k, v in options.items() if k in KEYS}, "command line")
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None
    jobs = [job] if job else sorted({c.job for c in scan(target) if c.job})
    if not jobs:  # no checkpoint of ckptd's here: other tools' (or none), said, never deleted from here
        try:
            settings = resolve(cli, {}, {}, cfg.defaults)
        except SettingsError as exc:
            raise click.UsageError(str(exc)) from None
        _foreign_gc(target, settings, as_json)
        return
    failed, everything = False, []
    for name in jobs:
        try:
            settings = resolve(cli, {}, cfg.job_table(name), cfg.defaults)
        except SettingsError as exc:
            raise click.UsageError(str(exc)) from None
        verdicts, removals = collect(target, name, settings, time.time(), [target], dry_run)
        errors = {r.verdict.item.id: r.error for r in removals if r.error}
        rows = [verdict_row(v, name, error=errors.get(v.item.id, "")) for v in verdicts]
        everything += rows
        if not as_json:
            _print_verdicts(name, rows, dry_run, errors)
        failed |= bool(errors)
    if as_json:
        click.echo(json.dumps(everything, indent=2))
    if failed:
        sys.exit(1)


def _daemon_gc(socket_path: str | None, directory: str, job: str | None, dry_run: bool) -> dict[str, Any] | None:
    """``gc DIR`` through the daemon when it has jobs in DIR: it alone knows what is still waiting
    to be replicated (``remote_pending``) and what it is writing, so a gc of its directory run beside
    it must be its own. None when no daemon answers or none of its jobs lives there (then the CLI
    applies retention itself)."""
    from ckptd.cli.base import configured_socket
    from ckptd.wire.client import DaemonUnavailable, request
    from ckptd.wire.protocol import default_socket_path

    try:
        reply = request(
            socket_path or configured_socket() or default_socket_path(),
            {"type": "gc", "directory": os.path.realpath(directory), "job": job, "dry_run": dry_run},
            timeout=120,
        )
    except DaemonUnavailable:
        return None
    if not reply.get("ok"):
        raise click.ClickException(str(reply.get("error", reply)))
    return reply if reply.get("jobs") else None


def _foreign_gc(target: str, settings: Settings, as_json: bool) -> None:
    """Other tools' checkpoints: what retention would do (each verified first, grouped by directory
    as watch mode groups them; one that fails is kept, as watch mode's on_corrupt="keep" keeps it).
    Deleting them is watch mode's: it judges each as it is written."""
    from ckptd.core import retention
    from ckptd.foreign import formats as foreign

    units = foreign.find(target)
    if not units:
        raise click.ClickException(f"{target}: no checkpoints here (ckptd's or a known foreign format)")
    rules = retention.Rules.from_settings(settings.retention())
    groups: dict[str, list[retention.Item]] = {}
    for u in units:
        ok = foreign.verify(u).ok
        groups.setdefault(os.path.dirname(u.path), []).append(
            retention.item_of(u.path, u.step if u.step is not None else -1, u.mtime, u.bytes, verified=ok)
        )
    by_dir = {
        d: [retention.verdict_row(v, None, error="") for v in retention.judge(items, rules, time.time())]
        for d, items in groups.items()
    }
    if as_json:
        click.echo(json.dumps([r for rows in by_dir.values() for r in rows], indent=2))
        return
    for directory, rows in by_dir.items():
        _print_verdicts(f"(other tools' checkpoints in {directory})", rows, True, {})
    click.echo(
        "nothing deleted: other tools' checkpoints are retained by watch mode, which verifies each as it is "
        f"written (ckptd watch {target} with these retention options)"
    )


def _print_verdicts(job: str, rows: list[dict[str, Any]], dry_run: bool, errors: dict[str, str]) -> None:
    click.secho(
        f"job {job}: {sum(not r['keep'] for r in rows)} of {len(rows)} to delete" + (" (dry run)" if dry_run else ""),
        bold=True,
    )
    for r in rows:
        action = "keep  " if r["keep"] else ("would delete" if dry_run else "delete")
        note = f"  FAILED: {errors[r['path']]}" if r["path"] in errors else ""
        click.echo(f"  {action:<12} step {r['step']:>10}  {', '.join(r['reasons']):<40} {r['path']}{note}")

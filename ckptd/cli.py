"""``ckptd``: the command line (click). Thin: parsing and printing only."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable

import click

from ckptd import __version__
from ckptd.core.policy import PolicyError, SavePolicy
from ckptd.core.policy import plan as make_plan
from ckptd.core.settings import KEYS, SettingsError, group, parse_table, resolve
from ckptd.core.units import format_bytes, format_duration, parse_listen
from ckptd.store.scan import Checkpoint, pin_path, scan, set_pinned
from ckptd.store.verify import VerifyResult, verify_file


def setting_options(*groups: str, exclude: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Every policy/retention key of the given groups as a ``--dashed`` option (SPEC §6)."""
    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        for key, spec in reversed(list(KEYS.items())):
            if spec.group in groups and key not in exclude:
                f = _option(key, spec)(f)
        return f
    return decorate


def _option(key: str, spec: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--keep-final/--no-keep-final`` for a boolean key, a ``[min|max]`` choice for a choice."""
    name = "--" + key.replace("_", "-")
    if isinstance(spec.default, bool):
        return click.option(f"{name}/--no-{name[2:]}", key, default=None, help=spec.help)
    choices = getattr(spec.parse, "choices", None)
    if choices:
        return click.option(name, key, type=click.Choice(choices), default=None, help=spec.help)
    return click.option(name, key, default=None, help=spec.help)


def settings_from(options: dict[str, Any], source: str = "command line") -> dict[str, Any]:
    try:
        return resolve(parse_table({k: v for k, v in options.items() if k in KEYS}, source), {}, {}, {})
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None


@click.group()
@click.version_option(__version__, prog_name="ckptd")
def main() -> None:
    """ckptd: checkpoints that are written, verified and kept, or an alert says why not."""


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="print one JSON object per checkpoint, in a list, at the end")
def verify(paths: tuple[str, ...], as_json: bool) -> None:
    """Verify checkpoints, ckptd's or other tools' (.pt/.bin/.ckpt, HF checkpoint-N/, DCP, sharded
    safetensors): every tensor read and checked. One line per checkpoint as it finishes; exit 1 on
    any that is corrupt, unsafe or missing."""
    from ckptd.store import foreign

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
    sys.exit(0 if all(r.ok for r in results) else 1)


def _verified_line(r: VerifyResult, as_json: bool, status: str = "") -> None:
    if as_json:
        return
    status = status or ("ok" if r.ok else "UNSAFE" if r.unsafe else "CORRUPT")
    detail = f"{r.tensors} tensors, {format_bytes(r.bytes)}" if r.ok else r.reason
    click.echo(f"{status:<7} {r.path}: {detail}")


@main.command()
@click.option("--total-steps", type=int, required=True, help="steps in the run")
@setting_options("policy", exclude=("total_steps",))
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def plan(total_steps: int, as_json: bool, **options: Any) -> None:
    """The steps that will be saved, with the rule behind each, and warnings about surprises."""
    settings = settings_from({**options, "total_steps": total_steps})
    try:
        result = make_plan(SavePolicy.from_settings(group(settings, "policy")))
    except PolicyError as exc:
        raise click.UsageError(str(exc)) from None
    if as_json:
        click.echo(json.dumps({"total_steps": total_steps,
                               "saves": [s.__dict__ for s in result.saves],
                               "warnings": list(result.warnings)}, indent=2))
        return
    click.echo(f"{len(result.saves)} saves over {total_steps} steps")
    shown = result.saves if len(result.saves) <= 40 else result.saves[:20] + result.saves[-10:]
    for i, s in enumerate(shown):
        if len(result.saves) > 40 and i == 20:
            click.echo(f"  ... {len(result.saves) - 30} more ...")
        click.echo(f"  step {s.step:>10}  {s.trigger:<6} ({s.rule})")
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)


SOCKET_OPTION = click.option("--socket", "socket_path", default=None, envvar="CKPTD_SOCKET",
                             help="daemon socket (default: $CKPTD_SOCKET, $XDG_RUNTIME_DIR/ckptd.sock, /run/ckptd/ckptd.sock)")


def is_directory(target: str | None) -> bool:
    """A directory to read, or a job name to ask the daemon about. Something written like a path
    (a '/', a leading '.') that is not there is an error about the path, not about the daemon."""
    if target is None:
        return False
    if os.path.isdir(target):
        return True
    if "/" in target or target.startswith(".") or os.path.exists(target):
        raise click.ClickException(f"{target}: no such directory")
    return False


def ask(socket_path: str | None, msg: dict[str, Any]) -> dict[str, Any]:
    """One request to the running daemon; a clear error when there is none."""
    from ckptd.wire.client import DaemonUnavailable, request
    from ckptd.wire.protocol import default_socket_path

    try:
        reply = request(socket_path or default_socket_path(), msg)
    except DaemonUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    if not reply.get("ok"):
        raise click.ClickException(str(reply.get("error", reply)))
    return reply


@main.command("list")
@click.argument("target", required=False)
@click.option("--job", default=None, help="only this job's checkpoints (with a directory)")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@SOCKET_OPTION
def list_cmd(target: str | None, job: str | None, as_json: bool, socket_path: str | None) -> None:
    """Checkpoints of a directory (read from the files) or of a job (asked from the daemon)."""
    if target is not None and is_directory(target):
        items = [_info_json(c) for c in scan(target, job)] + ([] if job else _foreign_json(target))
    else:
        rows = ask(socket_path, {"type": "list", "job": target})["checkpoints"]
        items = [{**r, "problem": "" if r["verified"] else (r.get("reason") or "not verified")} for r in rows]
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    now = time.time()
    click.echo(f"{'step':>10}  {'job':<16} {'trigger':<8} {'size':>10}  {'age':>6}  path")
    for c in items:
        pin = " (pinned)" if c["pinned"] else ""
        bad = f"  UNREADABLE: {c['problem']}" if c["problem"] else ""
        click.echo(f"{c['step']:>10}  {c['job']:<16} {c['trigger']:<8} {format_bytes(c['bytes']):>10}  "
                   f"{format_duration(max(0.0, now - c['created'])):>6}  {c['path']}{pin}{bad}")


def _foreign_json(directory: str) -> list[dict[str, Any]]:
    """Checkpoints of other tools under ``directory`` (ckptd's own are listed from their headers)."""
    from ckptd.store import foreign

    ours = {c.path for c in scan(directory)}
    return [{"path": f.path, "job": "", "step": f.step if f.step is not None else -1, "epoch": None,
             "bytes": f.bytes, "created": f.mtime, "trigger": f.kind, "rule": "", "metrics": {},
             "pinned": os.path.exists(pin_path(f.path)), "problem": ""}
            for f in sorted(foreign.find(directory), key=lambda f: (f.step or -1, f.mtime)) if f.path not in ours]


def _info_json(c: Checkpoint) -> dict[str, Any]:
    return {"path": c.path, "job": c.job, "step": c.step, "epoch": c.epoch, "bytes": c.bytes,
            "created": c.created, "trigger": c.trigger, "rule": c.rule, "metrics": c.metrics,
            "pinned": c.pinned, "problem": c.problem}


@main.command()
@click.argument("target")
@click.option("--job", default=None, help="with a directory: only this job")
@click.option("--json", "as_json", is_flag=True, help='print {"path": ...} instead of the bare path')
@SOCKET_OPTION
def latest(target: str, job: str | None, as_json: bool, socket_path: str | None) -> None:
    """Path of the newest checkpoint that verifies now, of a directory or a job (exit 1 if none)."""
    path = ask(socket_path, {"type": "latest", "job": target})["path"] if not is_directory(target) \
        else _newest_in(target, job)
    click.echo(json.dumps({"path": path}) if as_json else path)


def _newest_in(target: str, job: str | None) -> str:
    """ckptd's own first (by step), then other tools' checkpoints (by step, then time)."""
    from ckptd.store import foreign
    from ckptd.store.lifecycle import first_verified, newest_verified

    def check(c: Checkpoint) -> VerifyResult:
        result = verify_file(c.path)
        if not result.ok:
            click.echo(f"skipping {c.path}: {result.reason}", err=True)
        return result

    found = newest_verified(target, job, check=check)
    if found is not None:
        return found.path
    others = sorted((f for f in foreign.find(target) if f.kind not in ("safetensors", "ckptd-sharded")),
                    key=lambda f: (f.step if f.step is not None else -1, f.mtime), reverse=True)
    if job is None and (other := first_verified(others, foreign.verify)) is not None:
        return other.path
    raise click.ClickException(f"no verified checkpoint in {target}")

@main.command()
@click.option("--config", "config_file", default=None, envvar="CKPTD_CONFIG", help="TOML config file")
@click.option("--socket", "socket_path", default=None, help="overrides [daemon] socket")
@click.option("--state-dir", default=None, help="overrides [daemon] state_dir")
@click.option("--metrics-listen", default=None, help="overrides [daemon] metrics_listen (host:port)")
@click.option("--root", "roots", multiple=True, help="overrides [daemon] roots (repeatable)")
@click.option("--log-level", default="INFO", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
def serve(config_file: str | None, socket_path: str | None, state_dir: str | None, metrics_listen: str | None,
          roots: tuple[str, ...], log_level: str) -> None:
    """Run the daemon: trainers hand it their checkpoints over the socket."""
    import logging

    from ckptd.core import config as config_mod
    from ckptd.daemon.app import Daemon

    logging.basicConfig(level=log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    try:
        cfg = config_mod.load(config_file)
        if metrics_listen is not None:
            parse_listen(metrics_listen)
        daemon = Daemon(cfg, socket_path=socket_path, state_dir=state_dir, metrics_listen=metrics_listen,
                        roots=list(roots) or None)
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
@click.option("--abandon-after", default="1h", help="judge a checkpoint that stayed incomplete this long with no writes")
@click.option("--on-corrupt", type=click.Choice(["keep", "quarantine", "delete"]), default="keep", show_default=True,
              help="what retention does with a checkpoint that fails verification (keep: alert only)")
@click.option("--dry-run", is_flag=True, help="log what retention would keep and delete, and why; delete nothing")
@click.option("--state-dir", default=None,
              help="catalogue directory (default: a private one under /var/lib/ckptd or ~/.local/state/ckptd)")
@click.option("--metrics-listen", default="127.0.0.1:9733")
@click.option("--socket", "socket_path", default=None, help="socket for status/list (default: STATE_DIR/ckptd.sock)")
def watch(directory: str, job: str | None, pattern: str | None, expect_every: str | None, settle: str,
          rescan_every: str, abandon_after: str, on_corrupt: str, dry_run: bool, state_dir: str | None,
          metrics_listen: str, socket_path: str | None, **options: Any) -> None:
    """Adopt the checkpoints another tool writes into DIRECTORY: verify, catalogue, retain, alert."""
    import logging

    from ckptd.core import config as config_mod
    from ckptd.daemon.app import Daemon
    from ckptd.store.preflight import TargetError

    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    root = os.path.realpath(directory)
    if not os.path.isdir(root):
        raise click.UsageError(f"{directory} is not a directory (watch mode adopts what another tool writes "
                               "there; it does not create it)")
    state = state_dir or _private_state_dir(root)
    table = {"path": root, "settle": settle, "rescan_every": rescan_every, "abandon_after": abandon_after,
             "on_corrupt": on_corrupt, "dry_run": dry_run, **({"job": job} if job else {}),
             **({"pattern": pattern} if pattern else {}), **({"expect_every": expect_every} if expect_every else {}),
             **{k: v for k, v in options.items() if v is not None}}
    try:
        cfg = config_mod.parse({"watch": [table]}, "command line")
        Daemon(cfg, socket_path=socket_path or os.path.join(state, "ckptd.sock"), state_dir=state,
               metrics_listen=metrics_listen, roots=[root]).serve_forever()
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
    click.echo(f"{'job':<16} {'pid':>7} {'step':>8} {'verified':>8} {'age':>6} {'next':>8} "
               f"{'ckpts':>5} {'bytes':>10} {'missed':>6} {'failed':>6}  directory")
    for j in jobs:
        age = format_duration(j["last_verified_age"]) if j["last_verified_age"] is not None else "-"
        click.echo(f"{j['job']:<16} {j['pid'] or '-':>7} {j['step']:>8} {_dash(j['last_verified_step']):>8} "
                   f"{age:>6} {_dash(j['next_due_step']):>8} {j['checkpoints']:>5} {format_bytes(j['bytes']):>10} "
                   f"{j['missed']:>6} {j['failed']:>6}  {j.get('directory', '')}")


def _dash(v: Any) -> str:
    return "-" if v is None else str(v)


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


def _private_state_dir(root: str) -> str:
    """``ckptd watch``'s catalogue and socket: in the user's own state directory, never in the
    watched tree, where another user could have prepared them."""
    import hashlib

    base = os.environ.get("XDG_STATE_HOME") or (
        "/var/lib" if os.getuid() == 0 else os.path.join(os.path.expanduser("~"), ".local", "state"))
    path = os.path.join(base, "ckptd", "watch-" + hashlib.sha256(root.encode()).hexdigest()[:16])
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if st.st_uid != os.getuid() or not os.path.isdir(path) or os.path.islink(path):
        raise click.UsageError(f"{path} is not a directory of yours; pass --state-dir")
    return path


def _set_pin(path: str, pinned: bool) -> None:
    try:
        set_pinned(path, pinned)
    except OSError as exc:
        raise click.ClickException(f"cannot {'pin' if pinned else 'unpin'} {path}: "
                                   f"{exc.strerror or exc} (the marker .{os.path.basename(path)}.pinned "
                                   "lives beside it)") from None


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
def gc(target: str, job: str | None, dry_run: bool, config_file: str | None, socket_path: str | None,
       as_json: bool, **options: Any) -> None:
    """Apply retention to a directory, or to a job of the daemon: keep/delete and the rule that decided."""
    if not is_directory(target):
        reply = ask(socket_path, {"type": "gc", "job": target, "dry_run": dry_run})
        if as_json:
            click.echo(json.dumps(reply["verdicts"], indent=2))
        else:
            _print_verdicts(target, reply["verdicts"], dry_run, {})
        return
    from ckptd.core import config as config_mod
    from ckptd.store.lifecycle import collect

    try:
        cfg = config_mod.load(config_file)
        cli = parse_table({k: v for k, v in options.items() if k in KEYS}, "command line")
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None
    jobs = [job] if job else sorted({c.job for c in scan(target) if c.job})
    failed, everything = False, []
    for name in jobs:
        try:
            settings = resolve(cli, {}, cfg.job_table(name), cfg.defaults)
        except SettingsError as exc:
            raise click.UsageError(str(exc)) from None
        verdicts, removals = collect(target, name, settings, time.time(), [target], dry_run)
        errors = {r.verdict.item.id: r.error for r in removals if r.error}
        rows = [{"job": name, "path": v.item.id, "step": v.item.step, "keep": v.keep, "reasons": list(v.reasons),
                 "error": errors.get(v.item.id, "")} for v in verdicts]
        everything += rows
        if not as_json:
            _print_verdicts(name, rows, dry_run, errors)
        failed |= bool(errors)
    if as_json:
        click.echo(json.dumps(everything, indent=2))
    if failed:
        sys.exit(1)


def _print_verdicts(job: str, rows: list[dict[str, Any]], dry_run: bool, errors: dict[str, str]) -> None:
    click.secho(f"job {job}: {sum(not r['keep'] for r in rows)} of {len(rows)} to delete"
                + (" (dry run)" if dry_run else ""), bold=True)
    for r in rows:
        action = "keep  " if r["keep"] else ("would delete" if dry_run else "delete")
        note = f"  FAILED: {errors[r['path']]}" if r["path"] in errors else ""
        click.echo(f"  {action:<12} step {r['step']:>10}  {', '.join(r['reasons']):<40} {r['path']}{note}")


@main.command()
@click.option("--dir", "directory", default=None, help="where to put the demo run (default: a temp dir)")
def demo(directory: str | None) -> None:
    """A toy training run with the hook: saves, a crash, a resume, verification."""
    from ckptd.demo import run_demo

    run_demo(directory)


if __name__ == "__main__":
    main()

"""Verbs on checkpoints: verify, plan, list, latest, pin/unpin, gc. They read the files
themselves (ckptd's and other tools'), and ask the daemon only about a job name."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import click

from ckptd.cli.base import SOCKET_OPTION, ask, is_directory, main, setting_options, settings_from
from ckptd.cli.remote import is_remote, job_url, list_remote, remote_options, verify_remote_cmd
from ckptd.core.policy import PolicyError, SavePolicy
from ckptd.core.policy import plan as make_plan
from ckptd.core.settings import KEYS, SettingsError, group, parse_table, resolve
from ckptd.core.units import format_bytes, format_duration, parse_duration
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


@main.command()
@click.option("--total-steps", type=int, required=True, help="steps in the run")
@setting_options("policy", exclude=("total_steps",))
@click.option("--stall", default=None, help="with --every auto: what one save stalls training (0.8s; "
              "ckptd status and ckptd_save_duration_seconds{phase=\"stall\"} show it)")
@click.option("--persist", default=None, help="with --every auto: how long a save takes to be written and verified")
@click.option("--memory-stall", default=None, help="with --every auto: what a memory-only save stalls (default: --stall)")
@click.option("--memory-persist", default=None,
              help="with --every auto: how long the daemon takes to keep a snapshot in memory (default: the stall)")
@click.option("--memory-share", type=click.FloatRange(0.0, 1.0), default=None,
              help="with --every auto: the share of failures the daemon's memory recovers (default 0.75; 0: no memory tier)")
@click.option("--step-time", default=None, help="seconds one step takes, to say the interval in steps too")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def plan(total_steps: int, as_json: bool, stall: str | None, persist: str | None, memory_stall: str | None,
         memory_persist: str | None, memory_share: float | None, step_time: str | None, **options: Any) -> None:
    """The steps that will be saved, with the rule behind each, and warnings about surprises.
    With --every auto, the intervals auto chooses for a measured --stall and --persist, for the
    disk and for the daemon's memory tier, and why."""
    settings = settings_from({**options, "total_steps": total_steps})
    try:
        policy = SavePolicy.from_settings(group(settings, "policy"))
        result = make_plan(policy)
    except PolicyError as exc:
        raise click.UsageError(str(exc)) from None
    memory = {"stall": memory_stall, "persist": memory_persist, "share": memory_share}
    auto = _auto_plan(policy, stall, persist, step_time, memory, settings.get("every_memory"))
    if as_json:
        click.echo(json.dumps({"total_steps": total_steps,
                               "saves": [s.__dict__ for s in result.saves],
                               "auto": auto,
                               "warnings": list(result.warnings)}, indent=2))
        return
    if auto is not None:
        _say_auto(auto, step_time)
    click.echo(f"{len(result.saves)} saves over {total_steps} steps")
    shown = result.saves if len(result.saves) <= 40 else result.saves[:20] + result.saves[-10:]
    for i, s in enumerate(shown):
        if len(result.saves) > 40 and i == 20:
            click.echo(f"  ... {len(result.saves) - 30} more ...")
        click.echo(f"  step {s.step:>10}  {s.trigger:<6} ({s.rule})")
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)


def _auto_plan(policy: SavePolicy, stall: str | None, persist: str | None, step_time: str | None,
               memory: dict[str, Any], every_memory: float | None) -> dict[str, Any] | None:
    """``--every auto``: both tiers' intervals for the given costs, as the daemon would compute them."""
    from ckptd.core.autointerval import CostSamples, estimate_mtbf
    from ckptd.core.multilevel import PRIOR_SHARE, Coverage, multilevel

    if not policy.auto:
        if stall or persist or any(v is not None for v in memory.values()):
            raise click.UsageError("--stall, --persist and --memory-* only mean something with --every auto")
        return None
    if stall is None:
        raise click.UsageError("--every auto needs --stall: what one save stalls training (e.g. 0.8s; "
                               "ckptd status shows the measured stall of a running job)")
    try:
        costs = CostSamples().add(parse_duration(stall), parse_duration(persist) if persist else None)
        mem_stall = parse_duration(memory["stall"]) if memory["stall"] else None
        mem_costs = CostSamples().add(mem_stall, parse_duration(memory["persist"]) if memory["persist"] else None)
        per_step = parse_duration(step_time) if step_time else None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    share = PRIOR_SHARE if memory["share"] is None else memory["share"]
    coverage = Coverage(share, "prior" if memory["share"] is None else "given")
    ml = multilevel(costs, mem_costs, estimate_mtbf(0, 0.0, policy.mtbf), coverage, policy.max_overhead,
                    policy.min_interval, fixed_memory=every_memory)
    out: dict[str, Any] = {**ml.summary(), "cost": ml.disk.cost, "mtbf": ml.disk.mtbf.seconds}
    if per_step:
        out["steps"] = max(1, int(ml.disk.seconds // per_step))
        if ml.memory:
            out["memory"]["steps"] = max(1, int(ml.memory // per_step))
    return out


def _say_auto(auto: dict[str, Any], step_time: str | None) -> None:
    steps = f", about every {auto['steps']} steps at {step_time}/step" if "steps" in auto else ""
    click.echo(f"every=auto: a disk save every {auto['seconds']:.3g}s{steps} (rule {auto['rule']})")
    mem = auto["memory"]
    if mem["seconds"]:
        steps = f", about every {mem['steps']} steps" if "steps" in mem else ""
        click.echo(f"every=auto: a memory-only save every {mem['seconds']:.3g}s{steps} (rule {mem['rule']}), "
                   f"one in {mem['disk_every']} saves to disk")
    else:
        click.echo("every=auto: no memory-only saves (each save may as well go to disk)")
    click.echo(f"  why: {auto['reason']}")


@main.command("list")
@click.argument("target", required=False)
@click.option("--job", default=None, help="only this job's checkpoints (with a directory)")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@click.option("--remote", "remote", is_flag=True,
              help="TARGET's remote tier: a job name (its remote from $CKPTD_*/the config), the hook's remote= URL (every job below it) or s3://bucket/prefix/JOB")
@remote_options
@SOCKET_OPTION
def list_cmd(target: str | None, job: str | None, as_json: bool, remote: bool, endpoint: str | None,
             socket_path: str | None) -> None:
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
        click.echo(f"{step:>10}  {c['job'] or '-':<16} {c['trigger'] or '-':<11} {format_bytes(c['bytes']):>10}  "
                   f"{format_duration(max(0.0, now - c['created'])):>6}  {c['path']}{pin}{bad}")


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
            items.append({"path": f.path, "job": "", "step": f.step, "epoch": None, "bytes": f.bytes,
                          "created": f.mtime, "trigger": f.kind, "rule": "", "metrics": {},
                          "pinned": os.path.exists(pin_path(f.path)), "problem": ""})
    return sorted(items, key=lambda c: (c["step"] if c["step"] is not None else -1, c["created"], c["path"]))


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
    others = sorted((f for f in foreign.find(target) if f.kind not in ("safetensors", "ckptd-sharded")),
                    key=lambda f: (f.step if f.step is not None else -1, f.mtime), reverse=True)
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
    from ckptd.save.keep import collect

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

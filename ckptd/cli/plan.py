"""``ckptd plan``: the saves a run will make, and which of them retention keeps at its end.

The schedule is ``ckptd.core.policy.plan``, the very function the hook and the daemon walk,
and the settings are resolved as the hook resolves them (options > ``CKPTD_*`` variables),
so a plan printed before a run is what that run does when started in the same environment.
"""

from __future__ import annotations

import json
from typing import Any

import click

from ckptd.cli.base import main, setting_options
from ckptd.core import retention
from ckptd.core.policy import Plan, PolicyError, SavePolicy
from ckptd.core.policy import plan as make_plan
from ckptd.core.settings import KEYS, Settings, SettingsError, from_env, parse_table, resolve, unknown_env
from ckptd.core.units import parse_duration

TIME_RULES = ("keep_hourly", "keep_daily", "keep_within")  # they need to know when each save happens


@main.command()
@click.option(
    "--total-steps",
    type=int,
    default=None,
    help="steps in the run (or --epochs with --steps-per-epoch; or $CKPTD_TOTAL_STEPS)",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=None,
    help="epochs in the run: with --steps-per-epoch gives --total-steps, with --total-steps gives --steps-per-epoch",
)
@setting_options("policy", "retention", exclude=("total_steps",))
@click.option(
    "--stall",
    default=None,
    help="with --every auto: what one save stalls training (0.8s; "
    'ckptd status and ckptd_save_duration_seconds{phase="stall"} show it)',
)
@click.option("--persist", default=None, help="with --every auto: how long a save takes to be written and verified")
@click.option(
    "--memory-stall", default=None, help="with --every auto: what a memory-only save stalls (default: --stall)"
)
@click.option(
    "--memory-persist",
    default=None,
    help="with --every auto: how long the daemon takes to keep a snapshot in memory (default: the stall)",
)
@click.option(
    "--memory-share",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="with --every auto: the share of failures the daemon's memory recovers (default 0.75; 0: no memory tier)",
)
@click.option(
    "--step-time",
    default=None,
    help="seconds one step takes, to say the interval in steps too (and to plan keep_hourly/keep_daily/keep_within)",
)
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def plan(
    total_steps: int | None,
    epochs: int | None,
    as_json: bool,
    stall: str | None,
    persist: str | None,
    memory_stall: str | None,
    memory_persist: str | None,
    memory_share: float | None,
    step_time: str | None,
    **options: Any,
) -> None:
    """The steps that will be saved, with the rule behind each, and warnings about surprises.
    Settings come from the options, then from CKPTD_* variables, as in the hook. With retention
    options (--keep-last ...), which planned saves are still kept at the end of the run, and by
    which rule. With --every auto, the intervals auto chooses for a measured --stall and --persist,
    for the disk and for the daemon's memory tier, and why."""
    settings = _settings(options, total_steps, epochs)
    per_step = _seconds(step_time)
    try:
        policy = SavePolicy.from_settings(settings.group("policy"))
        result = make_plan(policy)
    except PolicyError as exc:
        raise click.UsageError(str(exc)) from None
    total = settings.total_steps
    assert total is not None  # (_settings refused a run of no length)
    kept, notes = _retained(result, settings, per_step)
    memory = {"stall": memory_stall, "persist": memory_persist, "share": memory_share}
    auto = _auto_plan(policy, stall, persist, step_time, memory, settings.every_memory)
    warnings = list(result.warnings) + notes
    if as_json:
        saves = [
            {**s.__dict__, **({"kept": bool(kept[s.step]), "kept_by": kept[s.step]} if kept else {})}
            for s in result.saves
        ]
        click.echo(json.dumps({"total_steps": total, "saves": saves, "auto": auto, "warnings": warnings}, indent=2))
        return
    if auto is not None:
        _say_auto(auto, step_time)
    _say_saves(result, total, kept)
    for w in warnings:
        click.echo(f"warning: {w}", err=True)


def _settings(options: dict[str, Any], total_steps: int | None, epochs: int | None) -> Settings:
    """Options over ``CKPTD_*`` variables (a typo in one is said, as the hook says it); the run's
    length from --total-steps, or --epochs x --steps-per-epoch."""
    for problem in unknown_env():
        click.echo(f"warning: environment variable {problem}; ignored", err=True)
    given = {k: v for k, v in options.items() if k in KEYS}
    if total_steps is not None:
        given["total_steps"] = total_steps
    try:
        settings = resolve(parse_table(given, "command line"), from_env(), {}, {})
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None
    if epochs is not None:
        settings = settings.but(**_epochs(epochs, settings.total_steps, settings.steps_per_epoch))
    if settings.total_steps is None:
        raise click.UsageError("how long is the run? give --total-steps (or --epochs with --steps-per-epoch)")
    return settings


def _epochs(epochs: int, total: int | None, per_epoch: int | None) -> dict[str, int]:
    if per_epoch is None and total is None:
        raise click.UsageError("--epochs needs --steps-per-epoch or --total-steps")
    if total is None:
        assert per_epoch is not None
        return {"total_steps": epochs * per_epoch}
    if per_epoch is None:
        if total % epochs:
            raise click.UsageError(
                f"--total-steps {total} is not a whole number of --epochs {epochs}: give --steps-per-epoch"
            )
        return {"steps_per_epoch": total // epochs}
    if total != epochs * per_epoch:
        raise click.UsageError(
            f"--total-steps {total} is not --epochs {epochs} x --steps-per-epoch {per_epoch} ({epochs * per_epoch})"
        )
    return {}


def _seconds(step_time: str | None) -> float | None:
    try:
        return parse_duration(step_time) if step_time else None
    except ValueError as exc:
        raise click.UsageError(f"--step-time: {exc}") from None


def _retained(result: Plan, settings: Settings, per_step: float | None) -> tuple[dict[int, list[str]], list[str]]:
    """Each planned save's keeping rules at the end of the run (empty: deleted by then), by the
    same ``retention.judge`` the daemon applies; {} when no retention key is given."""
    rule_keys = settings.group("retention").items()
    given = {k for k, v in rule_keys if v is not None and k != "quarantine_dir"}
    if not given - {"keep_final"} and settings.keep_final:
        return {}, []
    rules = retention.Rules.from_settings(settings.retention())
    notes = []
    timed = [k for k in TIME_RULES if getattr(settings, k) is not None]
    if timed and per_step is None:
        notes.append(f"{', '.join(timed)} planned as if every save happened at the same time: give --step-time")
    if rules.keep_best:
        notes.append("keep_best depends on the metrics of the run: not planned (each best save is kept too)")
    per = per_step or 0.0
    items = [retention.item_of(str(s.step), s.step, s.step * per, 0, trigger=s.trigger) for s in result.saves]
    verdicts = retention.judge(items, rules, result.saves[-1].step * per if result.saves else 0.0)
    return {int(v.item.id): [str(r.rule) for r in v.reasons] if v.keep else [] for v in verdicts}, notes


def _say_saves(result: Plan, total: int, kept: dict[int, list[str]]) -> None:
    click.echo(f"{len(result.saves)} saves over {total} steps")
    if kept:
        click.echo(f"{sum(1 for v in kept.values() if v)} of them kept at the end of the run")
    shown = result.saves if len(result.saves) <= 40 else result.saves[:20] + result.saves[-10:]
    for i, s in enumerate(shown):
        if len(result.saves) > 40 and i == 20:
            click.echo(f"  ... {len(result.saves) - 30} more ...")
        fate = "" if not kept else f"  kept: {', '.join(kept[s.step])}" if kept[s.step] else "  deleted"
        click.echo(f"  step {s.step:>10}  {s.trigger:<6} ({s.rule}){fate}")


def _auto_plan(
    policy: SavePolicy,
    stall: str | None,
    persist: str | None,
    step_time: str | None,
    memory: dict[str, Any],
    every_memory: float | None,
) -> dict[str, Any] | None:
    """``--every auto``: both tiers' intervals for the given costs, as the daemon would compute them."""
    from ckptd.core.autointerval import CostSamples, estimate_mtbf
    from ckptd.core.multilevel import PRIOR_SHARE, Coverage, multilevel

    if not policy.auto:
        if stall or persist or any(v is not None for v in memory.values()):
            raise click.UsageError("--stall, --persist and --memory-* only mean something with --every auto")
        return None
    if stall is None:
        raise click.UsageError(
            "--every auto needs --stall: what one save stalls training (e.g. 0.8s; "
            "ckptd status shows the measured stall of a running job)"
        )
    try:
        costs = CostSamples().add(parse_duration(stall), parse_duration(persist) if persist else None)
        mem_stall = parse_duration(memory["stall"]) if memory["stall"] else None
        mem_costs = CostSamples().add(mem_stall, parse_duration(memory["persist"]) if memory["persist"] else None)
        per_step = parse_duration(step_time) if step_time else None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    share = PRIOR_SHARE if memory["share"] is None else memory["share"]
    coverage = Coverage(share, "prior" if memory["share"] is None else "given")
    ml = multilevel(
        costs,
        mem_costs,
        estimate_mtbf(0, 0.0, policy.mtbf),
        coverage,
        policy.max_overhead,
        policy.min_interval,
        fixed_memory=every_memory,
    )
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
        click.echo(
            f"every=auto: a memory-only save every {mem['seconds']:.3g}s{steps} (rule {mem['rule']}), "
            f"one in {mem['disk_every']} saves to disk"
        )
    else:
        click.echo("every=auto: no memory-only saves (each save may as well go to disk)")
    click.echo(f"  why: {auto['reason']}")

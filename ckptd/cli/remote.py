"""Verbs on the remote tier: ``ckptd fetch``, and the remote side of ``verify`` and ``list``.

A remote job is named by its URL: the store's URL and the job's key prefix after it,
``s3://bucket/prefix/u1000/DIRTAG/JOB`` (``ckptd.remote.layout``; a version-1 job, keyed by its
name alone, is ``s3://bucket/prefix/JOB``), with ``--endpoint`` (or ``$CKPTD_REMOTE_ENDPOINT``)
for an S3-compatible store; the hook's ``remote=`` URL lists every job below it; or by its name
alone, whose ``remote`` (and ``remote_endpoint``) come from the settings a trainer of that job
would resolve (``$CKPTD_*``, then the config's ``[jobs.JOB]`` and ``[defaults]``): then only the
caller's own jobs of that name (``fetch JOB DIR``: the one saved in DIR). Credentials: the
standard AWS chain, the caller's own.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import click

from ckptd.cli.base import main
from ckptd.core.units import format_bytes, format_duration, parse_remote
from ckptd.disk.scan import SUFFIX
from ckptd.remote.fetch import fetch
from ckptd.remote.layout import PREFIX_RE, job_prefix, owner_of
from ckptd.remote.listing import COMMIT, PART_RE, RemoteCheckpoint, committed
from ckptd.remote.stores import RemoteError, Store, open_store
from ckptd.remote.verify import verify_remote

ENDPOINT = click.option(
    "--endpoint",
    default=None,
    envvar="CKPTD_REMOTE_ENDPOINT",
    help="S3 endpoint URL for S3-compatible stores (default: $CKPTD_REMOTE_ENDPOINT, else AWS)",
)


def is_remote(target: str) -> bool:
    return target.startswith(("s3://", "file://"))


def job_url(job: str, endpoint: str | None, config_file: str | None = None) -> tuple[str, str | None]:
    """A job's name -> its remote tier's URL (the hook's ``remote=``) and endpoint, as its trainer
    would resolve them."""
    from ckptd.core import config as config_mod
    from ckptd.core.settings import from_env
    from ckptd.core.settings import resolve as resolve_settings

    try:
        cfg = config_mod.load(config_file)
        settings = resolve_settings({}, from_env(), cfg.job_table(job), cfg.defaults)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if not settings.remote:
        raise click.UsageError(
            f"job {job} has no remote tier: give its URL (s3://bucket/prefix/{job}), or set "
            f"remote in [jobs.{job}] / [defaults] or $CKPTD_REMOTE"
        )
    return settings.remote.rstrip("/"), endpoint or settings.remote_endpoint


def resolve(url: str, endpoint: str | None) -> tuple[Store, str, str | None]:
    """``s3://bucket/prefix/JOB[/FILE.safetensors]`` -> (the store, JOB, FILE or None)."""
    try:
        parts = parse_remote(url).split("/")
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    name = parts.pop() if parts[-1].endswith(SUFFIX) else None
    if len(parts) < 4 or not parts[-1]:
        raise click.UsageError(f"{url}: name the job after the store's URL (s3://bucket/prefix/u<uid>/DIRTAG/JOB)")
    depth = 3 if len(parts) >= 6 and PREFIX_RE.match("/".join(parts[-3:])) else 1  # version 1: the job name alone
    job = "/".join(parts[-depth:])
    return open_store("/".join(parts[:-depth]), endpoint), job, name


def jobs_at(store: Store, probe: bool = False) -> list[str]:
    """The job prefixes with a commit object (or a part commit) below the store's URL (what a hook's ``remote=``
    holds): ``u<uid>/<directory tag>/<job>``, and version 1's ``<job>``.
    ``probe``: the URL may be a job's own, which need not exist as a store root: none, then."""
    try:
        keys = store.list("")
    except RemoteError as exc:
        if probe:
            return []
        raise click.ClickException(str(exc)) from None
    found = set()
    for k in keys:
        unit, _, name = k.rpartition("/")
        commit = k if k.endswith(COMMIT) else unit if PART_RE.match(name) else ""  # a spread unit's part
        job = commit.rsplit("/", 1)[0]
        if commit and (commit.count("/") == 1 or (commit.count("/") == 3 and PREFIX_RE.match(job))):
            found.add(job)
    return sorted(found)


def targets(url: str, endpoint: str | None) -> list[tuple[Store, str, str | None]]:
    """What ``url`` names: the hook's ``remote=`` URL (every job below it), or one job's URL
    (``.../JOB``, ``.../JOB/FILE``). A job that is not there is named, with those that are."""
    try:
        names_file = parse_remote(url).rstrip("/").endswith(SUFFIX)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if not names_file:
        root = open_store(url.rstrip("/"), endpoint)
        jobs = jobs_at(root, probe=True)
        if jobs:
            return [(root, job, None) for job in jobs]
    store, job, name = resolve(url, endpoint)
    try:
        empty = not committed(store, job)
    except RemoteError as exc:
        raise click.ClickException(str(exc)) from None
    if empty and (others := jobs_at(store, probe=True)):
        raise click.ClickException(f"no job {job} under {store.url}; found: {', '.join(others)}")
    return [(store, job, name)]


def listing(
    url: str,
    endpoint: str | None,
    own_job: str | None = None,
) -> list[tuple[Store, list[RemoteCheckpoint], str | None]]:
    """Per job that ``url`` names: its store, its committed checkpoints (the one FILE if named).
    ``own_job``: ``url`` is a remote tier's, and only the caller's own jobs of that name count."""
    out = []
    jobs = targets(url, endpoint)
    if own_job is not None:
        jobs = [t for t in jobs if t[1].rsplit("/", 1)[-1] == own_job and owner_of(t[1]) == os.getuid()]
        if not jobs:
            raise click.ClickException(f"no job {own_job} of uid {os.getuid()} under {url}")
    for store, job, name in jobs:
        try:
            found = committed(store, job)
        except RemoteError as exc:
            raise click.ClickException(str(exc)) from None
        out.append((store, [c for c in found if name is None or c.name == name], name))
    return out


def verify_remote_cmd(url: str, endpoint: str | None, as_json: bool) -> bool:
    """Every committed checkpoint under ``url`` streamed and every tensor checked; one line each."""
    ok = True
    results = []
    for store, found, name in listing(url, endpoint):
        if not found:
            click.echo(f"MISSING {url}: no committed checkpoint" + (" of that name" if name else ""), err=as_json)
            ok = False
        for c in found:
            r = verify_remote(store, c)
            ok = ok and r.ok
            results.append({**r.to_json(), "step": c.step})
            if not as_json:
                detail = f"{r.tensors} tensors, {format_bytes(r.bytes)}" if r.ok else r.reason
                click.echo(f"{'ok' if r.ok else 'CORRUPT':<7} {r.path}: {detail}")
    if as_json:
        click.echo(json.dumps(results, indent=2))
    return ok


def list_remote(url: str, endpoint: str | None, as_json: bool, own_job: str | None = None) -> None:
    rows = [(store, c) for store, found, _ in listing(url, endpoint, own_job) for c in found]
    if as_json:
        click.echo(json.dumps([{**c.__dict__, "url": f"{store.url}/{c.key}"} for store, c in rows], indent=2))
        return
    now = time.time()
    click.echo(f"{'step':>10}  {'job':<16} {'trigger':<8} {'size':>10}  {'age':>6}  url")
    for store, c in rows:
        click.echo(
            f"{c.step:>10}  {c.job:<16} {c.trigger:<8} {format_bytes(c.bytes):>10}  "
            f"{format_duration(max(0.0, now - c.created)):>6}  {store.url}/{c.key}"
        )


@main.command("fetch")
@click.argument("url")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--step", type=int, default=None, help="this step instead of the newest")
@click.option(
    "--config",
    "config_file",
    default=None,
    envvar="CKPTD_CONFIG",
    help="TOML config whose [jobs.NAME]/[defaults] give a job's remote (when URL is a job name)",
)
@ENDPOINT
def fetch_cmd(url: str, directory: str, step: int | None, config_file: str | None, endpoint: str | None) -> None:
    """Download the newest (or --step) checkpoint of URL (a remote job's URL, or a job's name) that
    verifies into DIRECTORY: streamed to a temp file (a sharded unit: a temp directory), every
    tensor checked, then renamed; a corrupt or uncommitted copy is never taken."""
    if not is_remote(url):  # a job's name: the caller's own job of that name saved in DIRECTORY
        remote, endpoint = job_url(url, endpoint, config_file)
        url = f"{remote}/{job_prefix(url, os.path.realpath(directory), os.getuid())}"
    found = targets(url, endpoint)
    if len(found) > 1:
        raise click.UsageError(
            f"{url} holds several jobs ({', '.join(job for _, job, _ in found)}): name one, {url.rstrip('/')}/JOB"
        )
    store, job, _ = found[0]
    try:
        path = fetch(store, job, directory, step)
    except (RemoteError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    if path is None:
        click.echo(f"{url}: no committed checkpoint{f' of step {step}' if step is not None else ''} verifies", err=True)
        sys.exit(1)
    click.echo(path)


def remote_options(f: Any) -> Any:
    return ENDPOINT(f)

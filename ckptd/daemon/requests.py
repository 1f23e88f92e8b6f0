"""The CLI's requests to the running daemon: status, list, latest, pin/unpin, gc.

Each handler takes the daemon and the asking session and returns the reply's fields;
what a uid may see or touch is ``ckptd.daemon.access``'s rule. A job's files are read and
changed with the job owner's rights (``owner_of_job``), a path the client names is resolved
with the client's own (``ckptd.disk.owner``). A refusal is a reply with ``ok: false``, never a
dropped connection.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from typing import Any, Callable

from ckptd.core.policy import next_due_step
from ckptd.core.retention import verdict_row
from ckptd.core.vocab import NEVER
from ckptd.daemon.jobkey import JobKey
from ckptd.daemon.session import Host, Session
from ckptd.disk.owner import Identity, acting_as
from ckptd.disk.remove import inside
from ckptd.disk.scan import read_info, set_pinned
from ckptd.foreign.deepspeed import verify_ours
from ckptd.save.keep import collect
from ckptd.save.newest import first_verified
from ckptd.wire import protocol

log = logging.getLogger(__name__)
Handler = Callable[[Host, Session, dict[str, Any]], dict[str, Any]]


def handle(d: Host, session: Session, msg: dict[str, Any]) -> None:
    handler = HANDLERS.get(msg["type"])
    if handler is None:
        raise protocol.ProtocolError(f"{msg['type']} needs a hello first")
    try:
        reply = handler(d, session, msg)
    except (PermissionError, ValueError, OSError) as exc:
        session.send({"type": "reply", "ok": False, "error": str(exc)})
        return
    fd = reply.pop("fd", None)  # the memory tier's answer carries its snapshot
    try:
        session.send({"type": "reply", "ok": True, **reply}, fd=fd)
    finally:
        if fd is not None:
            os.close(fd)


def memory(d: Host, session: Session, msg: dict[str, Any]) -> dict[str, Any]:
    """A restarted trainer's resume: the job's newest verified snapshot from the memory tier, only
    when it was kept for the asking uid and for this very directory (the device and inode it had
    then: one removed and recreated is another, finding L9); ``step: null`` otherwise, the same
    answer as when the daemon holds none (nothing says whose it was)."""
    with acting_as(session.identity):
        key = JobKey(msg["job"], d.access.directory(msg["directory"], session.uid))
    held = d.memory.get(key)
    if held is None:
        return {"step": None}
    try:
        st = os.stat(key.directory)
        now = (st.st_dev, st.st_ino)
    except OSError:
        now = None
    if now != held.directory_id:
        os.close(held.fd)
        d.memory.drop(key, kept_at=held.at)  # its directory is gone or recreated: nobody resumes from it
        log.info(
            "job %s: the memory tier's snapshot of %s was dropped: the directory was removed or recreated",
            key.name,
            key.directory,
        )
        return {"step": None}
    if held.owner != session.uid:
        os.close(held.fd)
        return {"step": None}
    return {
        "step": held.step,
        "length": held.length,
        "path": held.path,
        "fd": held.fd,
        "directory_id": list(held.directory_id),
    }


def status(d: Host, session: Session, msg: dict[str, Any]) -> dict[str, Any]:
    """One row per job (name and directory) the asking uid may see."""
    return {"jobs": job_rows(d, session.uid)}


def job_rows(d: Host, uid: int | None) -> list[dict[str, Any]]:
    """``status``'s rows: of the jobs ``uid`` may see, or (None) of every job, for the metrics
    port's read-only ``/status`` (which says no more than ``/metrics`` beside it)."""
    now = time.time()
    rows_by_job: dict[JobKey, list[Any]] = {}
    for r in d.catalog.checkpoints():
        if uid is None or d.access.sees(uid, r):
            rows_by_job.setdefault(r.key, []).append(r)
    with d.registry.lock:
        keys = set(d.registry.jobs) | set(rows_by_job)
    out = []
    lag = d.uploads.lag(now)
    for key in sorted(k for k in keys if uid is None or d.access.visible(uid, k)):
        tally = d.catalog.tally(key)
        with d.registry.lock:
            row = _status_row(
                d, key, d.registry.jobs.get(key), [r for r in rows_by_job.get(key, []) if r.verified], now
            )
        out.append({**row, **_standing(d, key, row, tally, lag.get(key))})
    return out


def _standing(d: Host, key: JobKey, row: dict[str, Any], tally: dict[str, Any], lag: float | None) -> dict[str, Any]:
    """What on-call asks first, and what survives a daemon restart: the run's state, the counts and
    the last error from the catalogue's events, replication and quota."""
    j = d.registry.jobs.get(key)
    settings = j.settings if j is not None else d.catalog.job_settings(key)
    state = "running" if row["connected"] else (tally["run"] if tally["run"] not in (None, "running") else "idle")
    return {
        "state": state,
        "missed_total": tally["missed"],
        "failed_total": tally["failed"],
        "last_error": tally["last_error"],
        "remote": settings.remote,
        "remote_pending": d.uploads.pending_count(key),
        "remote_lag": lag,
        "quota_bytes": settings.max_bytes,
        "quota_used": row["bytes"] / settings.max_bytes if settings.max_bytes else None,
    }


def _status_row(d: Host, key: JobKey, j: Any, rows: list[Any], now: float) -> dict[str, Any]:
    nxt = next_due_step(j.policy, j.last_saved_step) if j is not None else None
    return {
        "job": key.name,
        "directory": key.directory,
        "pid": j.pid if j and j.connected else None,
        "connected": bool(j and j.connected),
        "step": j.step if j else (rows[-1].step if rows else 0),
        "last_verified_step": rows[-1].step if rows else None,
        "last_verified_age": now - rows[-1].created if rows else None,
        "next_due_step": nxt if nxt is not None and nxt < NEVER else None,
        "checkpoints": len(rows),
        "bytes": sum(r.bytes for r in rows),
        "missed": j.missed if j else 0,
        "failed": j.failed if j else 0,
        "world_size": j.world_size if j else None,
        "stall": statistics.median(j.costs.stalls) if j and j.costs.stalls else None,
        "auto": _auto(j, now),
        "memory_bytes": d.memory.held(key),
    }


def _auto(j: Any, now: float) -> dict[str, Any] | None:
    plan = j.plan(now) if j is not None else None
    return plan.summary() if plan is not None else None


def list_checkpoints(d: Host, session: Session, msg: dict[str, Any]) -> dict[str, Any]:
    job = msg.get("job")
    rows = [r for r in d.catalog.checkpoints(job if isinstance(job, str) else None) if d.access.sees(session.uid, r)]
    return {"checkpoints": [r.__dict__ for r in rows]}


def latest(d: Host, session: Session, msg: dict[str, Any]) -> dict[str, Any]:
    """The newest verified checkpoint of a job name; a name used in several directories is
    ambiguous (two jobs), and the reply says which directories to ask for instead."""
    job = msg.get("job")
    rows = (
        [r for r in d.catalog.checkpoints(job) if r.verified and d.access.sees(session.uid, r)]
        if isinstance(job, str)
        else []
    )
    if not rows:
        raise ValueError(f"job {job!r} has no verified checkpoint that uid {session.uid} may see")
    directories = sorted({r.directory for r in rows})
    if len(directories) > 1:
        raise ValueError(
            f"{len(directories)} jobs are named {job}: ask for one by its directory "
            f"(ckptd latest DIR): {', '.join(directories)}"
        )
    owners = {r.path: d.catalog.owner(r.key, r.path) for r in rows}

    def verify_as_owner(r: Any) -> Any:
        with acting_as(owners[r.path]):
            return verify_ours(r.path)  # a file, a sharded unit or an engine job's DeepSpeed tag

    found = first_verified(reversed(rows), verify_as_owner)
    if found is None:
        raise ValueError(f"job {job} has no checkpoint that verifies now")
    return {"path": found.path}


def pin(d: Host, session: Session, msg: dict[str, Any]) -> dict[str, Any]:
    with acting_as(session.identity):  # the client's path, resolved as the client would
        path = os.path.realpath(msg["path"])
    if not inside(path, d.roots):
        raise PermissionError(f"{path} is outside the daemon's roots")
    row = d.catalog.row(path)
    who = d.catalog.owner(row.key, path) if row is not None else session.identity  # a catalogued job's: its owner's
    with acting_as(who):
        info = read_info(path)
    if not info.ok or not d.access.visible(session.uid, JobKey(info.job, os.path.dirname(path))):
        raise PermissionError(f"{path} is not a checkpoint of a job of uid {session.uid}")
    pinned = msg["type"] == "pin"
    with acting_as(who):
        set_pinned(path, pinned, d.roots)
    d.catalog.set_pinned(path, pinned)
    return {"path": path, "pinned": pinned}


def gc(d: Host, session: Session, msg: dict[str, Any]) -> dict[str, Any]:
    """Retention now, for the asker's jobs (by name, or all of those in ``directory``: ``ckptd gc DIR``
    comes here when the daemon has a job there, since only the daemon knows what is not yet remote)."""
    dry = bool(msg.get("dry_run"))
    want, where = msg.get("job"), msg.get("directory")
    with d.registry.lock:
        jobs = [j for j in d.registry.jobs.values() if want in (None, j.name) and where in (None, j.directory)]
    jobs = [j for j in jobs if d.access.visible(session.uid, j.key)]
    out = []
    for j in jobs:
        with acting_as(Identity.of(j.uid)):
            verdicts, removals = collect(j.directory, j.name, j.settings, time.time(), d.roots, dry)
        if not dry:
            d.ledger.removed(j.key, removals)
        out += [verdict_row(v, j.name, directory=j.directory) for v in verdicts]
    return {"verdicts": out, "dry_run": dry, "jobs": len(jobs)}


HANDLERS: dict[str, Handler] = {
    "status": status,
    "list": list_checkpoints,
    "latest": latest,
    "pin": pin,
    "unpin": pin,
    "gc": gc,
    "memory": memory,
}

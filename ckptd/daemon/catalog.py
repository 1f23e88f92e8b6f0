"""The SQLite catalogue (WAL) under ``state_dir``: jobs, checkpoints and events.

It is a cache of what the files say, never the only record: every ckptd checkpoint
carries its job, step, trigger, metrics and digests in its own header, so
``rebuild`` can recreate the catalogue from the roots alone. A missing or damaged
database file is moved aside and rebuilt at start (SPEC §7).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from ckptd.core.settings import Settings
from ckptd.core.vocab import Outcome
from ckptd.daemon.jobkey import JobKey
from ckptd.disk.manifest import MANIFEST, SHARD_RE
from ckptd.disk.owner import NOBODY, Identity, acting_as, owner_of, uid_of
from ckptd.disk.persist import TEMP_MARK
from ckptd.disk.scan import SUFFIX, Checkpoint, read_info
from ckptd.foreign import deepspeed as dsfmt

log = logging.getLogger(__name__)
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    name TEXT NOT NULL, directory TEXT NOT NULL, uid INTEGER NOT NULL,
    settings TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL, PRIMARY KEY (name, directory));
CREATE TABLE IF NOT EXISTS checkpoints (
    path TEXT PRIMARY KEY, job TEXT NOT NULL, step INTEGER NOT NULL, epoch REAL, created REAL NOT NULL,
    trigger TEXT NOT NULL DEFAULT '', rule TEXT NOT NULL DEFAULT '', bytes INTEGER NOT NULL,
    verified INTEGER NOT NULL, metrics TEXT NOT NULL DEFAULT '{}', pinned INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '', digests TEXT NOT NULL DEFAULT '{}', outcome TEXT NOT NULL DEFAULT 'ok',
    directory TEXT NOT NULL DEFAULT '', uid INTEGER);
CREATE INDEX IF NOT EXISTS checkpoints_job ON checkpoints(job, directory, step);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, job TEXT, kind TEXT NOT NULL, detail TEXT NOT NULL);
"""
SCHEMA_VERSION = 4  # PRAGMA user_version; a catalogue of another version is rebuilt from the files


@dataclass(frozen=True)
class Row:
    path: str
    job: str
    step: int
    created: float
    bytes: int
    verified: bool
    trigger: str
    pinned: bool
    metrics: dict[str, Any]
    reason: str = ""
    outcome: Outcome = Outcome.OK
    directory: str = ""  # the job's directory (a watched tree's root for what watch mode adopted)
    digests: dict[str, str] = field(default_factory=dict)  # per tensor (ours) or per file (adopted foreign ones)
    uid: int | None = None  # whose: the job's owner when it saved it, else its file's owner when catalogued

    @property
    def key(self) -> JobKey:
        return JobKey(self.job, self.directory)


class Catalog:
    """A thread-safe handle; every write is one short transaction."""

    def __init__(self, state_dir: str) -> None:
        os.makedirs(state_dir, exist_ok=True)
        self.path = os.path.join(state_dir, "catalog.sqlite")
        self.rebuilt = False
        self._lock = threading.Lock()
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        fresh = not os.path.exists(self.path)
        try:
            db = self._connect()
            db.execute("SELECT count(*) FROM checkpoints").fetchone()
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
            if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                if not fresh:
                    raise sqlite3.DatabaseError("schema version differs")
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError:
            self._move_aside()
            db, fresh = self._connect(), True
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self.rebuilt = fresh
        return db

    def _connect(self) -> sqlite3.Connection:
        """The catalogue names every user's jobs and paths: readable by the daemon alone (0600)."""
        for suffix in ("", "-wal", "-shm"):
            os.close(os.open(self.path + suffix, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
            os.chmod(self.path + suffix, 0o600)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        return db

    def _move_aside(self) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(self.path + suffix):
                os.replace(self.path + suffix, f"{self.path}.damaged-{stamp}{suffix}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def healthy(self) -> bool:
        try:
            with self._lock:
                self._db.execute("SELECT 1").fetchone()
            return True
        except sqlite3.Error:
            return False

    # -- jobs ----------------------------------------------------------------------

    def job_owner(self, key: JobKey) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT uid FROM jobs WHERE name = ? AND directory = ?", key).fetchone()
        return None if row is None else int(row[0])

    def owner(self, key: JobKey, path: str) -> Identity:
        """Whose rights a catalogued file is touched with (``ckptd.disk.owner``): the uid that
        registered its job, or (a watched tree's, or nobody's) the owner of the file itself."""
        uid = self.job_owner(key)
        if uid is not None:
            return Identity.of(uid)
        try:
            return owner_of(path)
        except OSError:  # gone, or out of the daemon's sight: nobody's rights, and it fails as it would for them
            return Identity.of(NOBODY)

    def upsert_job(self, key: JobKey, uid: int, settings: Settings) -> None:
        """The job is ``uid``'s from now on: the uid whose directory it is now (``Access.job``), not
        whoever first registered that name there (finding L2)."""
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs(name, directory, uid, settings, created) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(name, directory) DO UPDATE SET settings = excluded.settings, uid = excluded.uid",
                (*key, uid, json.dumps(settings.given(), default=str), time.time()),
            )

    def job_settings(self, key: JobKey) -> Settings:
        """The settings a job last registered with (what a restarted daemon resumes replication with)."""
        with self._lock:
            row = self._db.execute("SELECT settings FROM jobs WHERE name = ? AND directory = ?", key).fetchone()
        return Settings.stored({} if row is None else json.loads(row[0]))

    def jobs(self) -> list[tuple[JobKey, int]]:
        with self._lock:
            return [(JobKey(r[0], r[1]), int(r[2])) for r in self._db.execute("SELECT name, directory, uid FROM jobs")]

    # -- checkpoints -----------------------------------------------------------------

    def record(
        self,
        c: Checkpoint,
        verified: bool,
        reason: str = "",
        outcome: Outcome | None = None,
        directory: str | None = None,
        uid: int | None = None,
    ) -> None:
        """``directory``: the job's (default: the checkpoint's own parent). ``uid``: whose it is (the
        job's owner for a save it made; default: the owner of the file, not followed if a link),
        who alone (with privileged uids) sees the row (finding L6)."""
        outcome = outcome or (Outcome.OK if verified else Outcome.CORRUPT)
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO checkpoints(path, job, step, epoch, created, trigger, rule, bytes, "
                "verified, metrics, pinned, reason, digests, outcome, directory, uid) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    c.path,
                    c.job,
                    c.step,
                    c.epoch,
                    c.created,
                    c.trigger,
                    c.rule,
                    c.bytes,
                    int(verified),
                    json.dumps(c.metrics, default=str),
                    int(c.pinned),
                    reason,
                    json.dumps(c.digests),
                    outcome,
                    directory or os.path.dirname(c.path),
                    uid_of(c.path) if uid is None else uid,
                ),
            )

    def forget(self, paths: Iterable[str]) -> None:
        with self._lock:
            self._db.executemany("DELETE FROM checkpoints WHERE path = ?", [(p,) for p in paths])

    def mark_unverified(self, path: str, reason: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE checkpoints SET verified = 0, reason = ?, outcome = ? WHERE path = ?",
                (reason, Outcome.CORRUPT, path),
            )

    def set_pinned(self, path: str, pinned: bool) -> None:
        with self._lock:
            self._db.execute("UPDATE checkpoints SET pinned = ? WHERE path = ?", (int(pinned), path))

    def checkpoints(self, job: str | None = None, directory: str | None = None) -> list[Row]:
        """Oldest first; of one job name (in every directory), or of one job (``directory`` too)."""
        where = [(c, v) for c, v in (("job", job), ("directory", directory)) if v is not None]
        clause = (" WHERE " + " AND ".join(f"{c} = ?" for c, _ in where)) if where else ""
        return self._rows(clause + " ORDER BY job, directory, step, created", [v for _, v in where])

    def _rows(self, clause: str, args: list[Any]) -> list[Row]:
        sql = (
            "SELECT path, job, step, created, bytes, verified, trigger, pinned, metrics, reason, outcome, "
            "directory, digests, uid FROM checkpoints"
        )
        with self._lock:
            rows = self._db.execute(sql + clause, args).fetchall()
        return [
            Row(
                r[0],
                r[1],
                int(r[2]),
                float(r[3]),
                int(r[4]),
                bool(r[5]),
                r[6],
                bool(r[7]),
                json.loads(r[8]),
                r[9],
                Outcome(r[10]),
                r[11],
                json.loads(r[12] or "{}"),
                None if r[13] is None else int(r[13]),
            )
            for r in rows
        ]

    def row(self, path: str) -> Row | None:
        found = [r for r in self._rows(" WHERE path = ?", [path])]
        return found[0] if found else None

    def event(self, job: JobKey | str | None, kind: str, **detail: Any) -> None:
        name = job
        if isinstance(job, JobKey):
            name, detail = job.name, {"directory": job.directory, **detail}
        with self._lock:
            self._db.execute(
                "INSERT INTO events(time, job, kind, detail) VALUES (?, ?, ?, ?)",
                (time.time(), name, kind, json.dumps(detail, default=str)),
            )

    def events(self, job: str | None = None, limit: int = 100) -> list[tuple[float, str, str, dict[str, Any]]]:
        sql = "SELECT time, job, kind, detail FROM events"
        args: tuple[str, ...] = ()
        if job is not None:
            sql, args = sql + " WHERE job = ?", (job,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [(r[0], r[1], r[2], json.loads(r[3])) for r in rows]

    def history(self, key: JobKey) -> tuple[float, int, int]:
        """(seconds the job's earlier runs ran, trainer crashes, runs lost with the daemon): what
        ``every="auto"`` estimates the job's MTBF and the memory tier's share of recoveries from
        (``ckptd.core.multilevel``). A crash is a run that ended without saying ``end``; a run
        left open (the daemon died under it) counts up to its last event, and as lost when the
        next run started at or before its newest saved step (a new process, resumed from disk: the
        host or the daemon took the memory tier with it), not when it carried on (the daemon alone
        restarted and the trainer reconnected)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT time, kind, detail FROM events WHERE job = ? ORDER BY id", (key.name,)
            ).fetchall()
        ran, crashes, losses, start, last, step = 0.0, 0, 0, None, 0.0, 0
        for t, kind, detail in rows:
            fields = json.loads(detail)
            if fields.get("directory") != key.directory:
                continue
            at = fields.get("step") if isinstance(fields.get("step"), int) else 0
            if kind == "start":
                if start is not None:  # the previous run never ended: the daemon went down under it
                    ran, losses = ran + (last - start), losses + (at <= step)
                start, step = t, at
            elif kind in ("end", "disconnect") and start is not None:
                ran, crashes, start = ran + (t - start), crashes + (kind == "disconnect"), None
            elif start is not None:
                step = max(step, at)
            last = t
        return ran + ((last - start) if start is not None else 0.0), crashes, losses

    def tally(self, key: JobKey) -> dict[str, Any]:
        """What ``ckptd status`` says of a job across daemon restarts, from its events: missed and
        failed saves counted since the catalogue began, the newest failure, and how its newest run
        stands (``running``, ``ended``, ``disconnected``: went away without saying ``end``,
        ``detached``: connected when the daemon stopped)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT time, kind, detail FROM events WHERE job = ? AND kind IN "
                "('start', 'end', 'disconnect', 'detached', 'missed', 'failed') ORDER BY id",
                (key.name,),
            ).fetchall()
        out: dict[str, Any] = {"missed": 0, "failed": 0, "last_error": None, "run": None}
        for t, kind, detail in rows:
            fields = json.loads(detail)
            if fields.get("directory") != key.directory:
                continue
            if kind in ("missed", "failed"):
                out[kind] += 1
            if kind == "failed":
                out["last_error"] = {"time": t, "reason": fields.get("reason"), "error": fields.get("error")}
            elif kind in ("start", "end", "disconnect", "detached"):
                out["run"] = {"start": "running", "end": "ended", "disconnect": "disconnected", "detached": "detached"}[
                    kind
                ]
        return out

    # -- reconciling with the disk -------------------------------------------------------

    def reconcile(self, roots: Sequence[str]) -> dict[str, int]:
        """Make the catalogue match the files: add what is on disk, drop what is gone.

        Files under a final name were verified when written; the header is re-read,
        and a file whose header is unreadable is recorded as not verified.
        """
        on_disk = _checkpoint_files(roots)
        known = self._paths()
        vanished = {p for p in known if gone(p)}
        self.forget(vanished)
        return {"added": len(self._record_new(on_disk, known)), "removed": len(vanished), "files": len(on_disk)}

    def adopt(self, directory: str) -> int:
        """Catalogue what a job's directory holds that the catalogue does not: the saves its
        trainer wrote itself (embedded mode) after the daemon's start-up reconcile, while it
        could not reach the daemon. Asked when the trainer says hello again."""
        try:
            with acting_as(owner_of(directory)):
                paths = _checkpoint_files([directory])
        except OSError:
            return 0
        return len(self._record_new(paths, self._paths(under=directory)))

    def sweep(self, roots: Sequence[str], skip: Callable[[str], bool]) -> list[Checkpoint]:
        """Catalogue the checkpoints under ``roots`` that it does not hold, but for those in the
        directories ``skip`` names (a connected trainer's: its session records them): what
        trainers saved on their own, since the start-up reconcile or the last sweep."""
        paths = [p for p in _checkpoint_files(roots) if not skip(os.path.dirname(p))]
        return self._record_new(paths, self._paths())

    def _paths(self, under: str | None = None) -> set[str]:
        """The catalogued paths (those under a directory): what the disk is compared with, without
        reading and decoding whole rows of every job on the host."""
        sql, args = "SELECT path FROM checkpoints", []
        if under is not None:
            prefix = under.rstrip("/") + "/"
            sql, args = sql + " WHERE substr(path, 1, ?) = ?", [len(prefix), prefix]
        with self._lock:
            return {r[0] for r in self._db.execute(sql, args).fetchall()}

    def _record_new(self, paths: Sequence[str], known: set[str]) -> list[Checkpoint]:
        added = []
        for path in paths:
            if path in known:
                continue
            try:  # read as the file's owner: what the daemon catalogues is what its owner could read
                with acting_as(owner_of(path)):
                    info = dsfmt.committed_info(path) if dsfmt.is_committed(path) else read_info(path)
            except OSError:  # its owner cannot read it, or the daemon may not act as its owner
                continue
            if info.ok and not info.job:
                continue  # a foreign safetensors file: watch mode's business, not ours
            self.record(info, verified=info.ok, reason=info.problem)
            added.append(info)
        return added


def gone(path: str) -> bool:
    """Gone for sure: a path the daemon cannot reach (another uid's 0700 directory, for a service
    user) is not gone, it is checked as its owner when its job comes back."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False


def _utf8(dirpath: str, name: str) -> bool:
    """A name the catalogue (UTF-8 text) can hold: one that is not (its bytes not UTF-8, the
    surrogate escapes ``os`` decodes them to) is skipped with a line naming it, never a crash of
    the hello or the start-up that met it (finding L8)."""
    try:
        os.path.join(dirpath, name).encode("utf-8")
        return True
    except UnicodeEncodeError:
        log.warning("catalogue: skipped %s: its name is not UTF-8", ascii(os.path.join(dirpath, name)))
        return False


def _checkpoint_files(roots: Sequence[str]) -> list[str]:
    out = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and _utf8(dirpath, d)]
            marker = _unit_marker(filenames) if dirpath != root else ""
            if marker and _owned_alike(dirpath, marker):
                dirnames[:] = []  # one checkpoint (or a partial one): its files are not checkpoints of their own
                if marker in (dsfmt.COMMIT, MANIFEST):
                    out.append(dirpath)
                continue
            for name in filenames:
                full = os.path.join(dirpath, name)
                if (
                    name.endswith(SUFFIX)
                    and TEMP_MARK not in name
                    and not name.startswith(".")
                    and not os.path.islink(full)
                    and _utf8(dirpath, name)
                ):
                    out.append(full)
    return out


def _unit_marker(filenames: Sequence[str]) -> str:
    """The file that makes a directory one checkpoint, not walked into: an engine job's committed
    tag (``ckptd-commit.json``), a sharded unit's manifest, or a shard (a unit without its
    manifest: not one yet, nothing to catalogue). A root is never asked, and the marker counts
    only when its directory owner's (``_owned_alike``): one planted in a directory others may
    write (the 1777 root, a shared scratch) must not hide the tree below it from the catalogue."""
    if dsfmt.COMMIT in filenames:
        return dsfmt.COMMIT
    if MANIFEST in filenames:
        return MANIFEST
    return next((n for n in sorted(filenames) if SHARD_RE.match(n)), "")


def _owned_alike(dirpath: str, marker: str) -> bool:
    """The marker is the directory owner's (its writer's), not planted there by another uid."""
    try:
        return os.lstat(dirpath).st_uid == os.lstat(os.path.join(dirpath, marker)).st_uid
    except OSError:
        return False

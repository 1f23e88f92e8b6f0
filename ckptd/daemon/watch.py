"""Watch mode: adopt the checkpoints of trainers that cannot be changed.

A ``Watcher`` per ``[[watch]]`` table (or ``ckptd watch DIR``). watchdog delivers
close-after-write, move, create and delete events; each event only marks the
checkpoint *unit* it belongs to (a file, or its HF/DCP directory) as pending. The
daemon's scheduler calls ``tick`` every second: a unit with no events for ``settle``
seconds whose format says it is complete is verified once, catalogued, counted and
handed to retention. inotify drops events when its queue overflows and watchdog
does not say so, hence ``rescan`` every ``rescan_every`` seconds walks the tree and
re-marks whatever changed behind our back.

A unit still being written is never verified, counted corrupt or deleted: it is
``in_flight`` for retention until it settles and verifies. Only a unit that stayed
incomplete with no writes for ``abandon_after`` (default 1 h) is judged as it is.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import threading
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)

from ckptd.core import missed
from ckptd.core.config import WatchSpec
from ckptd.core.vocab import MissedReason, Trigger
from ckptd.daemon import history, watchkeep
from ckptd.daemon.catalog import Catalog
from ckptd.daemon.jobkey import JobKey
from ckptd.daemon.ledger import Ledger
from ckptd.daemon.metrics import Metrics
from ckptd.disk.owner import OwnerError, acting_as, as_daemon, owner_of
from ckptd.disk.scan import Checkpoint, is_pinned
from ckptd.disk.verify import VerifyResult
from ckptd.foreign import formats as foreign

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    """What a watcher needs of the daemon, and no more."""

    catalog: Catalog
    ledger: Ledger
    roots: Sequence[str]
    started_at: float  # a tree that never saw a new unit is overdue counting from here
    clock: Callable[[], float]


class Watching:
    """The ``[[watch]]`` tables: one watchdog observer, a ``Watcher`` per tree, periodic rescans."""

    def __init__(self, specs: Sequence[WatchSpec], ctx: Context) -> None:
        from watchdog.observers import Observer

        self.watchers = [Watcher(spec, ctx, self.rewatch) for spec in specs]
        self.observer = Observer()

    def start(self, metrics: Metrics, every: Callable[[Callable[[], Any], float, str], None]) -> None:
        """Schedule each tree's watch and its rescans (``every(fn, seconds, id)``), then the observer."""
        for i, w in enumerate(self.watchers):
            os.makedirs(w.root, exist_ok=True)
            w.handle = self.observer.schedule(w, w.root, recursive=True)
            metrics.init_job(w.key)
            every(w.rescan, w.spec.rescan_every, f"rescan:{i}")
            log.info("watching %s as job %s (%d units to look at)", w.root, w.job, w.rescan())
        self.observer.start()

    def rewatch(self, w: "Watcher") -> None:
        """A watched root came back: its old inotify watch died with it; make a new one."""
        try:
            if w.handle is not None:
                self.observer.unschedule(w.handle)
        except (KeyError, OSError):
            pass
        w.handle = self.observer.schedule(w, w.root, recursive=True)

    def gauges(self) -> list[tuple[JobKey, dict[str, float]]]:
        """A watched tree is a job that is always up; its interval is the one it was told to expect."""
        return [
            (
                w.key,
                {
                    "ckptd_job_up": 1.0,
                    **({"ckptd_expected_save_interval_seconds": w.spec.expect_every} if w.spec.expect_every else {}),
                },
            )
            for w in self.watchers
        ]

    def tick(self, now: float) -> None:
        for w in self.watchers:
            w.tick(now)

    def stop(self) -> None:
        if self.observer.is_alive():
            self.observer.stop()
            self.observer.join(10)


class Watcher(FileSystemEventHandler):
    """One watched tree; events mark units, ``tick`` adopts the settled ones."""

    def __init__(self, spec: WatchSpec, ctx: Context, rewatch: Callable[["Watcher"], None]) -> None:
        super().__init__()
        self.spec, self.ctx, self._rewatch = spec, ctx, rewatch
        self.pending: dict[str, float] = {}
        self.incomplete_since: dict[str, float] = {}
        self.handle: Any = None  # the observer's watch; re-made when the root comes back
        self.gone = False
        self.last_new_at = 0.0
        self.overdue_flagged = False
        self._lock = threading.Lock()
        self.root = os.path.realpath(self.spec.path)
        self.job = self.spec.job or os.path.basename(self.root.rstrip("/")) or "watch"
        self.key = JobKey(self.job, self.root)
        self.settle = self.spec.settle
        self.abandon_after = self.spec.abandon_after
        self.pattern = self.spec.pattern
        self.dry_run = self.spec.dry_run

    # -- events (watchdog's thread) ----------------------------------------------------------

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, (FileClosedEvent, DirCreatedEvent)):
            self._mark(str(event.src_path))
        elif isinstance(event, (FileMovedEvent, DirMovedEvent)):
            self._mark(str(event.dest_path))
            self._gone(str(event.src_path))
        elif isinstance(event, (FileDeletedEvent, DirDeletedEvent)):
            self._gone(str(event.src_path))
            self._mark(os.path.dirname(str(event.src_path)))  # a marker file removed: its dir may be done

    def _unit_of(self, path: str) -> str:
        """The outermost checkpoint directory holding ``path`` (an HF ``checkpoint-N/`` over the
        DeepSpeed ``global_stepN/`` inside it), else ``path`` itself."""
        unit, parent = path, os.path.dirname(path)
        while parent.startswith(self.root) and parent != self.root:
            if foreign.dir_kind(parent) is not None:
                unit = parent
            parent = os.path.dirname(parent)
        return unit

    def _mark(self, path: str) -> None:
        unit = self._unit_of(path)
        if unit == self.root:
            return
        with self._lock:
            self.pending[unit] = self.ctx.clock()

    def _gone(self, path: str) -> None:
        known = {r.path for r in self.ctx.catalog.checkpoints(*self.key)}
        doomed = [p for p in known if p == path or p.startswith(path.rstrip("/") + "/")]
        if doomed:
            self.ctx.catalog.forget(doomed)

    # -- the scheduler's thread --------------------------------------------------------------------

    def rescan(self) -> int:
        """Walk the tree; mark every unit that is new or changed since it was catalogued.

        A root that disappeared is noted (its checkpoints leave the catalogue); when it
        comes back, its inotify watch is made again, since the old one died with it.
        """
        if not os.path.isdir(self.root):
            if not self.gone:
                log.warning("watched root %s disappeared", self.root)
            self.gone = True
        elif self.gone:
            log.info("watched root %s is back", self.root)
            self.gone = False
            self._rewatch(self)
        known = {r.path: r for r in self.ctx.catalog.checkpoints(*self.key)}
        marked, now = 0, self.ctx.clock()
        for unit in self._units():
            row = known.pop(unit.path, None)
            if row is None or abs(row.created - unit.mtime) > 1e-3 or row.bytes != unit.bytes:
                # settled counting from its last write, not from now, nor at once: a unit found at
                # start-up long untouched is judged at the next tick, one still being written (an
                # event lost, or not handled yet) waits ``settle`` like any other
                with self._lock:
                    self.pending.setdefault(unit.path, min(unit.mtime, now))
                marked += 1
        self.ctx.catalog.forget(known)  # catalogued but gone from the disk
        return marked

    def _units(self) -> list[foreign.Found]:
        units = foreign.units_under(self.root)
        return [f for f in units if self.pattern is None or fnmatch.fnmatch(os.path.basename(f.path), self.pattern)]

    def tick(self, now: float) -> None:
        with self._lock:
            ready = [p for p, t in self.pending.items() if now - t >= self.settle]
        adopted = False
        kinds: dict[str, str | None] = {}
        for path in ready:
            adopted |= self._adopt(path, now, kinds)
        if adopted:
            with self._lock:
                busy = set(self.pending)
            removals = watchkeep.apply(
                self.spec, self.root, self.key, self._units(), busy, now, self.ctx.catalog, self.ctx.roots
            )
            self.ctx.ledger.removed(self.key, removals)
            self.ctx.ledger.refresh(self.key)
        self._check_expected(now)

    def _adopt(self, path: str, now: float, kinds: dict[str, str | None]) -> bool:
        """A settled unit judged with the rights of its owner (``st_uid`` of the file or directory,
        with that uid's groups): a link to a file its owner may not read fails as it would for them."""
        try:
            who = owner_of(path)
        except OSError:  # gone meanwhile
            with self._lock:
                self.pending.pop(path, None)
            return False
        try:
            with acting_as(who):
                judged = self._judge(path, now, kinds)
        except OwnerError as exc:
            log.error("watch %s: %s not adopted: %s", self.root, path, exc)
            judged = None
        if judged is None:
            with self._lock:
                self.pending.pop(path, None)
            return False
        if isinstance(judged, str):  # "later": not complete yet
            return False
        found, info, result = judged
        self.ctx.catalog.record(
            info, verified=result.ok, reason=result.reason, outcome=result.outcome, directory=self.root
        )
        self.ctx.ledger.adopted(self.key, info, result.outcome)
        if result.ok:
            self.last_new_at = max(self.last_new_at, now)
            self.overdue_flagged = False
            with acting_as(who):  # a version it keeps is a file of the owner's, made with their rights
                self._adopted(found)
        else:
            log.error("watched checkpoint %s failed verification: %s", path, result.reason)
        return True

    def _adopted(self, found: foreign.Found) -> None:
        """Say what was adopted; a file its trainer overwrites in place gets this version kept
        (``ckptd.daemon.history``), adopted in its turn as a checkpoint of its own."""
        step = "no step recorded" if found.step is None else f"step {found.step}"
        kept = None
        if history.overwritten_in_place(found) and not self.dry_run:
            try:
                kept = history.keep_version(found)
            except OSError as exc:
                log.error("watch %s: could not keep this version of %s: %s", self.root, found.path, exc)
        log.info(
            "watch %s: adopted %s (%s, %s), verified%s",
            self.root,
            found.path,
            found.kind,
            step,
            f"; this version kept as {kept}" if kept else "",
        )
        if kept is not None:
            self._mark(kept)

    def _judge(
        self, path: str, now: float, kinds: dict[str, str | None]
    ) -> tuple[foreign.Found, Checkpoint, VerifyResult] | str | None:
        """As the unit's owner: None, not a unit (any more); "later", not complete yet (looked at
        again after another settle period); else what to catalogue."""
        parent = os.path.dirname(path)
        if parent not in kinds:  # once per directory per tick: listing it per file was quadratic
            kinds[parent] = foreign.dir_kind(parent)
        found = foreign.classify(path, parent_is_plain=kinds[parent] is None)
        if found is None or (self.pattern and not fnmatch.fnmatch(os.path.basename(path), self.pattern)):
            return None
        reason = foreign.incomplete(found)
        first = self.incomplete_since.setdefault(path, now) if reason is not None else now
        if reason is not None and now - first < self.abandon_after:
            log.debug("%s not complete yet: %s", path, reason)
            with self._lock:
                self.pending[path] = now  # look again after another settle period
            return "later"
        if reason is not None:
            log.warning("%s has been incomplete for %.0fs with no writes: judging it as it is", path, now - first)
        self.incomplete_since.pop(path, None)
        with self._lock:
            self.pending.pop(path, None)
        with as_daemon():
            row = self.ctx.catalog.row(found.path)
        result = self._unchanged(found, foreign.verify(found), row)
        info = Checkpoint(
            found.path,
            self.job,
            found.step if found.step is not None else -1,
            found.bytes,
            found.mtime,
            trigger=Trigger.WATCH,
            rule=found.kind,
            pinned=is_pinned(found.path),
            problem="" if result.ok else result.reason,
            digests=_digests(found) if result.ok else {},
        )
        return found, info, result

    def _unchanged(self, found: foreign.Found, result: VerifyResult, row: Any) -> VerifyResult:
        """A unit judged again with its mtime and size as catalogued must still have the bytes
        it had at adoption: other formats store no digests, so this is how rot shows."""
        if (
            not result.ok
            or row is None
            or not row.digests
            or row.bytes != found.bytes
            or abs(row.created - found.mtime) > 1e-3
        ):
            return result
        changed = foreign.changed_since(found, row.digests)
        return replace(result, ok=False, reason=changed) if changed else result

    def _check_expected(self, now: float) -> None:
        expect = self.spec.expect_every
        if expect is None:
            return
        since = self.last_new_at or self.ctx.started_at
        if not self.overdue_flagged and missed.time_overdue(expect, since, now, grace=0.0):
            self.overdue_flagged = True
            log.warning("watch %s: no new checkpoint for %.0fs (expect_every=%.0fs)", self.root, now - since, expect)
            self.ctx.ledger.missed(self.key, MissedReason.TIME_OVERDUE)


def _digests(found: foreign.Found) -> dict[str, str]:
    try:
        return foreign.file_digests(found)
    except OSError:
        return {}

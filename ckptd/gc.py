"""Applying retention and quota to real directories: the I/O edge of both policies.

Deletion is the one dangerous thing ckptd does, so it is narrow: only paths whose
real parent directory lies inside a configured root; the entry is removed through
its parent's directory fd, never following a symlink (a planted link is unlinked
itself, its target untouched); a checkpoint directory goes as one unit via
``shutil.rmtree``'s fd-based, symlink-safe walk; with ``quarantine_dir`` set, entries
are moved there instead of deleted.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ckptd import quota as quota_mod
from ckptd import retention
from ckptd.preflight import free_bytes, min_free_bytes
from ckptd.scan import ABANDONED, Checkpoint, pin_path, read_info, scan


class RemovalError(Exception):
    """A deletion refused or failed; the checkpoint is still there."""


@dataclass(frozen=True)
class Removal:
    verdict: retention.Verdict
    done: bool
    error: str = ""


def items_from(checkpoints: Sequence[Checkpoint], best_metric: str | None) -> list[retention.Item]:
    """Header facts -> retention items. A final name means verified at write time."""
    out = []
    for c in checkpoints:
        metric = c.metrics.get(best_metric) if best_metric else None
        out.append(retention.Item(c.path, c.step, c.created, c.bytes, verified=c.ok and not c.pending,
                                  corrupt=not c.ok and c.problem != ABANDONED, partial=c.problem == ABANDONED,
                                  in_flight=c.pending,
                                  pinned=c.pinned, final=c.trigger == "final",
                                  metric=float(metric) if isinstance(metric, (int, float)) else None))
    return out


def evaluate(directory: str, job: str | None, settings: Mapping[str, Any], now: float) -> list[retention.Verdict]:
    rules = retention.Rules.from_settings(settings)
    return retention.plan(items_from(scan(directory, job), rules.best_metric), rules, now)


def inside(path: str, roots: Sequence[str]) -> bool:
    real = os.path.realpath(path)
    return any(real == r or real.startswith(r.rstrip("/") + "/") for r in map(os.path.realpath, roots))


def remove(path: str, roots: Sequence[str], quarantine_dir: str | None = None) -> None:
    """Delete (or quarantine) one checkpoint file or directory, safely."""
    parent, name = os.path.split(os.path.abspath(path))
    if not name or name in (".", ".."):
        raise RemovalError(f"refusing to remove {path!r}: not a checkpoint entry")
    if not inside(parent, roots):
        raise RemovalError(f"refusing to remove {path}: outside the configured roots")
    dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if quarantine_dir:
            _quarantine(dfd, name, quarantine_dir)
        elif stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=dfd)
        else:
            os.unlink(name, dir_fd=dfd)
        _drop_pin(dfd, name)
        os.fsync(dfd)
    except OSError as exc:
        raise RemovalError(f"could not remove {path}: {exc.strerror or exc}") from None
    finally:
        os.close(dfd)


def _quarantine(dfd: int, name: str, quarantine_dir: str) -> None:
    os.makedirs(quarantine_dir, exist_ok=True)
    qfd = os.open(quarantine_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        target = f"{name}.{time.strftime('%Y%m%dT%H%M%S')}" if _exists(qfd, name) else name
        os.rename(name, target, src_dir_fd=dfd, dst_dir_fd=qfd)
    finally:
        os.close(qfd)


def _exists(dfd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def _drop_pin(dfd: int, name: str) -> None:
    try:
        os.unlink(os.path.basename(pin_path(name)), dir_fd=dfd)
    except FileNotFoundError:
        pass


def apply(verdicts: Sequence[retention.Verdict], roots: Sequence[str], quarantine_dir: str | None = None,
          dry_run: bool = False, rule: str | None = None) -> list[Removal]:
    """Carry out the deletions of a plan; a failure is reported, never raised."""
    out = []
    for v in verdicts:
        if v.keep:
            continue
        if dry_run:
            out.append(Removal(v, False))
            continue
        if v.item.partial and _touched_since(v.item):
            continue  # an abandoned sharded unit that ranks started writing (or committed) since the scan
        try:
            remove(v.item.id, roots, quarantine_dir)
            out.append(Removal(v, True))
        except RemovalError as exc:
            out.append(Removal(v, False, str(exc)))
    return out


def _touched_since(item: retention.Item) -> bool:
    if not os.path.isdir(item.id):
        return False
    now = read_info(item.id)
    return not now.pending or now.created > item.created


def collect(directory: str, job: str | None, settings: Mapping[str, Any], now: float,
            roots: Sequence[str], dry_run: bool = False) -> tuple[list[retention.Verdict], list[Removal]]:
    """Retention for one job (or every checkpoint in a directory): plan, then act."""
    verdicts = evaluate(directory, job, settings, now)
    return verdicts, apply(verdicts, roots, settings.get("quarantine_dir"), dry_run)


def make_room(directory: str, job: str, settings: Mapping[str, Any], reserve: int, now: float,
              roots: Sequence[str]) -> tuple[quota_mod.QuotaPlan, list[Removal]]:
    """Before a save: retention's own deletions (due anyway), then quota, oldest first.

    If the save cannot fit even after every deletion quota may make, quota deletes
    nothing and the plan says why: the caller fails the save with ``no_space``.
    """
    verdicts, removals = collect(directory, job, settings, now, roots)
    kept = [v for v in verdicts if v.keep]
    budget = quota_mod.Budget(reserve=reserve, used=sum(v.item.bytes for v in kept),
                              max_bytes=settings.get("max_bytes"), free=free_bytes(directory),
                              min_free=min_free_bytes(directory, settings.get("min_free")))
    decision = quota_mod.plan(kept, budget)
    if decision.ok and decision.delete:
        doomed = [retention.Verdict(i, False, ("quota",)) for i in decision.delete]
        removals += apply(doomed, roots, settings.get("quarantine_dir"))
    return decision, removals


def metric_rule(removal: Removal) -> str:
    """The ``rule`` label of ``ckptd_deleted_total``: retention, corrupt, partial or quota."""
    rule = removal.verdict.rule
    return "retention" if rule == "no rule keeps it" else rule

"""What checkpoints a directory holds, from the files alone (headers only, cheap).

The catalogue can always be rebuilt from this: every ckptd file carries its job,
step, epoch, creation time, trigger and metrics in its own header.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from ckptd.core.format import FormatError, read_header
from ckptd.core.meta import parse_time
from ckptd.core.vocab import Problem
from ckptd.disk import manifest as mf
from ckptd.disk.persist import TEMP_MARK
from ckptd.disk.refs import holders
from ckptd.disk.safepath import DIR_FLAGS, open_dir, open_regular

__all__ = ["SUFFIX", "Checkpoint", "is_pinned", "parse_time", "pin_path", "read_info", "scan", "set_pinned"]

SUFFIX = ".safetensors"
ABANDONED = "abandoned sharded save: no manifest, and a later save committed"


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint file as its header describes it (not yet re-verified)."""

    path: str
    job: str
    step: int
    bytes: int
    created: float = 0.0
    epoch: float | None = None
    trigger: str = ""
    rule: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    pinned: bool = False
    problem: str = ""  # in words, non-empty when the header is unreadable or the unit abandoned
    fault: Problem = Problem.NONE  # the same, as a value to decide on
    digests: dict[str, str] = field(default_factory=dict)
    shards: int = 0  # a sharded unit (a directory): how many rank files it commits
    pending: bool = False  # a sharded unit without a manifest that may still be committing
    spread: bool = False  # a unit whose other hosts hold some of its shards (node-local directories)
    refs: tuple[str, ...] = ()  # files beside it that hold tensors it refers to instead of storing (§13)

    @property
    def ok(self) -> bool:
        return not self.problem


def read_info(path: str) -> Checkpoint:
    """Header-level facts about one file or sharded unit; a bad header gives ``problem``, never an exception."""
    if mf.is_unit(path):
        return read_unit(path)
    try:
        with open_regular(path) as f:
            st = os.fstat(f.fileno())
            header = read_header(f, st.st_size)
        meta = header.metadata
        metrics = header.meta_json("ckptd.metrics", {}) or {}
        epoch = meta.get("ckptd.epoch")
        return Checkpoint(
            path,
            meta.get("ckptd.job", ""),
            int(meta.get("ckptd.step", "0") or 0),
            st.st_size,
            parse_time(meta.get("ckptd.created", "")) or st.st_mtime,
            float(epoch) if epoch not in (None, "", "null") else None,
            meta.get("ckptd.trigger", ""),
            meta.get("ckptd.rule", ""),
            metrics if isinstance(metrics, dict) else {},
            is_pinned(path),
            digests=header.meta_json("ckptd.digests", {}) or {},
            refs=holders(meta),
        )
    except (OSError, FormatError, ValueError, json.JSONDecodeError) as exc:
        size = _size(path)
        return Checkpoint(
            path, "", -1, size, _mtime(path), problem=str(exc) or type(exc).__name__, fault=Problem.UNREADABLE
        )


def read_unit(unit: str) -> Checkpoint:
    """A sharded unit from its manifest (cheap: sizes only; ``verify_unit`` reads the shards).

    Without a manifest the unit is reported ``pending`` with its first shard's job and
    step; ``scan`` decides whether it is still committing or abandoned.
    """
    try:
        m = mf.read(unit)
    except mf.NotCommitted:
        return _uncommitted(unit)
    except (mf.ManifestError, OSError) as exc:
        return Checkpoint(unit, "", -1, _tree_size(unit), _mtime(unit), problem=str(exc), fault=Problem.UNREADABLE)
    sizes = [_size(os.path.join(unit, s.file)) for s in m.shards]
    away = mf.away(m, _listdir(unit))  # on their own hosts' disks
    missing = [s.file for s, n in zip(m.shards, sizes) if n != s.bytes and s.rank not in away]
    return Checkpoint(
        unit,
        m.job,
        m.step,
        sum(sizes) + _size(os.path.join(unit, mf.MANIFEST)),
        parse_time(m.created) or _mtime(unit),
        m.epoch,
        m.trigger,
        m.rule,
        m.metrics,
        is_pinned(unit),
        problem=f"shard {missing[0]} is missing or has the wrong size" if missing else "",
        fault=Problem.UNREADABLE if missing else Problem.NONE,
        shards=len(m.shards),
        spread=bool(away),
    )


def _uncommitted(unit: str) -> Checkpoint:
    shards = sorted(n for n in _listdir(unit) if mf.SHARD_RE.match(n))
    first = read_info(os.path.join(unit, shards[0])) if shards else None
    job, step = (first.job, first.step) if first is not None and first.ok else ("", -1)
    return Checkpoint(unit, job, step, _tree_size(unit), _newest_mtime(unit), pending=True, shards=len(shards))


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _tree_size(unit: str) -> int:
    return sum(_size(os.path.join(unit, n)) for n in _listdir(unit))


def _newest_mtime(unit: str) -> float:
    """When the unit's files were last written (the directory's own mtime moves on any unlink)."""
    files = [_mtime(os.path.join(unit, n)) for n in _listdir(unit)]
    return max(files) if files else _mtime(unit)


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def pin_path(path: str) -> str:
    """Pins are marker files next to the checkpoint, so they survive a catalogue rebuild."""
    d, name = os.path.split(path)
    return os.path.join(d, f".{name}.pinned")


def is_pinned(path: str) -> bool:
    return os.path.exists(pin_path(path))


def set_pinned(path: str, pinned: bool, roots: Sequence[str] = ()) -> None:
    """Create or remove the pin marker through its directory's fd, never following a link:
    a symlink planted under the marker's name makes this fail instead of creating a file
    wherever it points (with ``roots``, the directory is reached from them as well)."""
    parent, name = os.path.split(os.path.abspath(path))
    dfd = open_dir(parent, roots) if roots else os.open(parent, DIR_FLAGS)
    marker = os.path.basename(pin_path(name))
    try:
        if pinned:
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dfd))
        else:
            try:
                os.unlink(marker, dir_fd=dfd)
            except FileNotFoundError:
                pass
    finally:
        os.close(dfd)


def scan(directory: str, job: str | None = None) -> list[Checkpoint]:
    """Every ``.safetensors`` checkpoint in ``directory`` (of ``job`` if given), oldest step first.

    Files whose header cannot be read are included with ``problem`` set when no job
    filter is given, so ``gc`` and ``verify`` can see them.
    """
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    out = []
    for name in names:
        full = os.path.join(directory, name)
        if name.startswith(".") or os.path.islink(full):
            continue  # a planted link is never one of our checkpoints (nor something to follow)
        if not (name.endswith(SUFFIX) and TEMP_MARK not in name) and not mf.is_unit(full):
            continue
        info = read_info(full)
        if job is None or info.job == job or (not info.ok and _name_matches(name, job)):
            out.append(info)
    return sorted(_settle_pending(out), key=lambda c: (c.step, c.created, c.path))


def _settle_pending(found: list[Checkpoint]) -> list[Checkpoint]:
    """An uncommitted unit is abandoned once a checkpoint of its job committed after it was
    last written (a later save went through, so nobody is still writing it); until then it
    may be a save in progress on other ranks and is left alone."""
    newest: dict[str, float] = {}  # job -> creation time of its newest committed checkpoint
    for c in found:
        if c.ok and not c.pending:
            newest[c.job] = max(newest.get(c.job, c.created), c.created)
    return [
        replace(c, pending=False, problem=ABANDONED, fault=Problem.ABANDONED)
        if c.pending and (not c.job or newest.get(c.job, float("-inf")) >= c.created)
        else c
        for c in found
    ]


def _name_matches(name: str, job: str) -> bool:
    return name.startswith(job + "-")

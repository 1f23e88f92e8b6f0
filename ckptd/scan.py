"""What checkpoints a directory holds, from the files alone (headers only, cheap).

The catalogue can always be rebuilt from this: every ckptd file carries its job,
step, epoch, creation time, trigger and metrics in its own header.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ckptd.format import FormatError, read_header
from ckptd.persist import TEMP_MARK

SUFFIX = ".safetensors"


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
    problem: str = ""  # non-empty when the header itself is unreadable
    digests: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problem


def parse_time(text: str) -> float:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def read_info(path: str) -> Checkpoint:
    """Header-level facts about one file; a bad header gives ``problem``, never an exception."""
    try:
        with open(path, "rb", buffering=0) as f:
            st = os.fstat(f.fileno())
            header = read_header(f, st.st_size)
        meta = header.metadata
        metrics = header.meta_json("ckptd.metrics", {}) or {}
        epoch = meta.get("ckptd.epoch")
        return Checkpoint(path, meta.get("ckptd.job", ""), int(meta.get("ckptd.step", "0") or 0), st.st_size,
                          parse_time(meta.get("ckptd.created", "")) or st.st_mtime,
                          float(epoch) if epoch not in (None, "", "null") else None,
                          meta.get("ckptd.trigger", ""), meta.get("ckptd.rule", ""),
                          metrics if isinstance(metrics, dict) else {}, is_pinned(path),
                          digests=header.meta_json("ckptd.digests", {}) or {})
    except (OSError, FormatError, ValueError, json.JSONDecodeError) as exc:
        size = _size(path)
        return Checkpoint(path, "", -1, size, _mtime(path), problem=str(exc) or type(exc).__name__)


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
        if not name.endswith(SUFFIX) or TEMP_MARK in name or name.startswith("."):
            continue
        if os.path.islink(os.path.join(directory, name)):
            continue  # a planted link is never one of our checkpoints (nor something to follow)
        info = read_info(os.path.join(directory, name))
        if job is None or info.job == job or (not info.ok and _name_matches(name, job)):
            out.append(info)
    return sorted(out, key=lambda c: (c.step, c.created, c.path))


def _name_matches(name: str, job: str) -> bool:
    return name.startswith(job + "-")

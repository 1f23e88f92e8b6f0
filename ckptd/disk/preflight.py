"""Checks at ``Checkpointer(...)`` time, so a bad target fails in the first second.

A run that can only discover at its end that its target is a file, is read-only or
is on a full disk has wasted the whole run (SPEC §1.3). Each error names the path
and what to do about it.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import time
from pathlib import Path

from ckptd.core.units import format_bytes

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_JOB = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class TargetError(ValueError):
    """The checkpoint target cannot work; the message names the path and the fix."""


def check_job(job: str) -> str:
    if not isinstance(job, str) or not _JOB.match(job):
        raise TargetError(
            f"job name {job!r} must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return job


def resolve_target(path: str | os.PathLike[str], template: str) -> tuple[str, str]:
    """(directory, file name template) from what the user passed.

    A directory (existing, or a path without a checkpoint suffix) gets generated file
    names from the template; a path that looks like a file name becomes the template
    ``<stem>-step{step:08d}.safetensors`` in its parent directory.
    """
    p = Path(path).expanduser()
    mode = _mode(p)
    if mode is not None and stat.S_ISDIR(mode):
        return str(p), template
    if mode is not None:
        raise TargetError(
            f"checkpoint target {p} is an existing file; pass the directory checkpoints should go in (e.g. {p.parent})"
        )
    if p.suffix in CHECKPOINT_SUFFIXES:
        return str(p.parent), p.stem + "-step{step:08d}.safetensors"
    return str(p), template


def _mode(p: Path) -> int | None:
    """What is at ``p`` (None: nothing), from ONE stat: asked twice (is it a directory? does it
    exist?), another rank creating the directory in between made a run's second rank see "an
    existing file" and fail at start-up (seen under load in CI)."""
    try:
        return p.stat().st_mode
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EBADF):  # as pathlib's exists()
            return None
        raise


def render(template: str, job: str, step: int, epoch: float | None, when: float) -> str:
    """The file name of one checkpoint; fields: job, step, epoch, timestamp."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when))
    name = template.format(job=job, step=step, epoch=epoch if epoch is not None else 0, timestamp=stamp)
    if "/" in name or not name.endswith(".safetensors"):
        raise TargetError(f"template {template!r} renders {name!r}: it must be a file name ending in .safetensors")
    return name


def check_template(template: str, job: str) -> None:
    try:
        render(template, job, 0, 0.0, 0.0)
    except (KeyError, IndexError, ValueError) as exc:
        raise TargetError(
            f"template {template!r} does not render: {exc}; fields are {{job}}, {{step}}, {{epoch}}, {{timestamp}}"
        ) from None


def check_directory(directory: str, expected_bytes: int, min_free: int | float | None, reclaimable: int = 0) -> None:
    """Create the directory, prove it is writable, and that one checkpoint fits.

    ``reclaimable`` is what quota could free by deleting the job's older checkpoints,
    so a resumed run on a disk full of its own checkpoints is not refused.
    """
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise TargetError(
            f"cannot create checkpoint directory {directory}: {exc.strerror}; choose a writable location"
        ) from None
    probe = os.path.join(directory, f".ckptd-write-test.{os.getpid()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise TargetError(
            f"checkpoint directory {directory} is not writable: {exc.strerror}; "
            "fix its permissions or choose another directory"
        ) from None
    free = free_bytes(directory)
    reserve = min_free_bytes(directory, min_free)
    if free + reclaimable - reserve < expected_bytes:
        raise TargetError(
            f"not enough space in {directory}: one checkpoint needs about "
            f"{format_bytes(expected_bytes)}, {format_bytes(free)} free"
            + (f" of which min_free keeps {format_bytes(reserve)}" if reserve else "")
            + "; free space, lower min_free or choose another filesystem"
        )


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fs_size(path: str) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def min_free_bytes(path: str, min_free: int | float | None) -> int:
    """``min_free`` in bytes: a float is a fraction of the filesystem's size."""
    if min_free is None:
        return 0
    if isinstance(min_free, float):
        return int(fs_size(path) * min_free)
    return int(min_free)

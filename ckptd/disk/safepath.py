"""Reaching a directory under a root without following a link anyone else could plant.

A path that was checked ("inside the roots") and then reopened by name can be
redirected in between: swap any middle component for a symlink and the second open
lands elsewhere. ``open_dir`` closes that race by walking from the root's own fd one
component at a time, each opened with ``O_NOFOLLOW | O_DIRECTORY``: a symlink at any
depth fails the walk (``ELOOP``/``ENOTDIR``) instead of being followed. Every write and
deletion the daemon makes on behalf of a client goes through a directory fd from here.
"""

from __future__ import annotations

import os
from typing import BinaryIO, Sequence

from ckptd.disk.opened import regular

__all__ = ["DIR_FLAGS", "OutsideRoots", "fsync_dir", "open_dir", "open_regular", "relative_to_root"]

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class OutsideRoots(PermissionError):
    """The path is not (textually) below any configured root, or it climbs with '..'."""


def relative_to_root(path: str, roots: Sequence[str]) -> tuple[str, list[str]]:
    """(root, components below it) for ``path``; roots may be given as links, ``path`` may not."""
    target = os.path.abspath(path)
    for root in roots:
        for base in dict.fromkeys((os.path.abspath(root), os.path.realpath(root))):
            prefix = base.rstrip("/") + "/"
            if target == base or target.startswith(prefix):
                parts = [p for p in target[len(base) :].split("/") if p]
                if any(p in (".", "..") for p in parts):
                    break
                return base, parts
    raise OutsideRoots(f"{path} is outside the configured roots ({', '.join(roots)})")


def open_dir(path: str, roots: Sequence[str]) -> int:
    """An fd of the directory ``path``, reached from its root without following any link."""
    root, parts = relative_to_root(path, roots)
    fd = os.open(root, DIR_FLAGS)
    try:
        for part in parts:
            nxt = os.open(part, DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except OSError:
        os.close(fd)
        raise
    return fd


def fsync_dir(path: str) -> None:
    """Make a rename or a new entry in ``path`` durable (the directory's own fsync)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_regular(path: str) -> BinaryIO:
    """Open a file for reading only if it is a regular file.

    ``O_NONBLOCK`` makes the open itself return at once on a FIFO or a device (a plain
    ``open`` of a FIFO named ``x.safetensors`` blocks until someone writes to it, and
    with it the daemon's shared workers); the file type is then checked on the open fd.
    """
    return os.fdopen(regular(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), path), "rb", buffering=0)

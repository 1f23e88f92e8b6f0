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
from typing import Sequence

from ckptd.core import retention
from ckptd.disk.safepath import DIR_FLAGS, OutsideRoots, open_dir
from ckptd.disk.scan import pin_path, read_info

__all__ = ["Removal", "RemovalError", "apply", "inside", "remove"]
Removal = retention.Removal


class RemovalError(Exception):
    """A deletion refused or failed; the checkpoint is still there."""


def inside(path: str, roots: Sequence[str]) -> bool:
    real = os.path.realpath(path)
    return any(real == r or real.startswith(r.rstrip("/") + "/") for r in map(os.path.realpath, roots))


def remove(path: str, roots: Sequence[str], quarantine_dir: str | None = None) -> None:
    """Delete (or quarantine) one checkpoint file or directory, safely.

    The parent is reached from its root through ``safepath.open_dir``: a directory on
    the way that was swapped for a symlink after the scan fails the walk, so nothing
    outside the roots is ever deleted, however the tree changes meanwhile.
    """
    parent, name = os.path.split(os.path.abspath(path))
    if not name or name in (".", ".."):
        raise RemovalError(f"refusing to remove {path!r}: not a checkpoint entry")
    try:
        dfd = open_dir(parent, roots)
    except OutsideRoots:
        raise RemovalError(f"refusing to remove {path}: outside the configured roots") from None
    except OSError as exc:
        raise RemovalError(
            f"refusing to remove {path}: outside the configured roots, or reached through a "
            f"link ({parent}: {exc.strerror or exc})"
        ) from None
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if quarantine_dir:
            _quarantine(dfd, name, quarantine_dir, roots)
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


def _quarantine(dfd: int, name: str, quarantine_dir: str, roots: Sequence[str]) -> None:
    """Move into ``quarantine_dir``, which must lie inside the roots like everything else."""
    try:
        qfd = open_dir(quarantine_dir, roots)
    except FileNotFoundError:
        parent, leaf = os.path.split(os.path.abspath(quarantine_dir))
        pfd = open_dir(parent, roots)
        try:
            os.mkdir(leaf, 0o700, dir_fd=pfd)
            qfd = os.open(leaf, DIR_FLAGS | os.O_NOFOLLOW, dir_fd=pfd)
        finally:
            os.close(pfd)
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


def apply(
    verdicts: Sequence[retention.Verdict],
    roots: Sequence[str],
    quarantine_dir: str | None = None,
    dry_run: bool = False,
) -> list[Removal]:
    """A plan's deletions in a local tree (``retention.carry_out`` with ``remove`` as its edge)."""
    return retention.carry_out(
        verdicts,
        lambda item: remove(item.id, roots, quarantine_dir),
        dry_run,
        skip=lambda item: item.partial and _touched_since(item),
    )


def _touched_since(item: retention.Item) -> bool:
    if not os.path.isdir(item.id):
        return False
    now = read_info(item.id)
    return not now.pending or now.created > item.created

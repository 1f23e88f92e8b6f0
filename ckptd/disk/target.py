"""Where one job's checkpoints go, and the guard every write into it passes.

A client names its directory at ``hello``; between then and a save it could swap that
directory (or one above it) for a symlink, or hand it to another user. So no save opens
its directory by name: ``open_target`` walks from a root (the daemon's roots, or for the
hook the directory itself) one component at a time without following a link
(``safepath.open_dir``), then checks that the directory is still owned by the job's uid;
a sharded unit's directory is made and opened below that fd the same way
(``open_unit``; ``opened_unit`` holds both for a ``with`` block). Everything the save writes, the temp file, the rename, the manifest,
is relative to the fds these return. The daemon's single-file saves, its commits of
sharded units and every rank of a sharded save all go through here.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from ckptd.core.settings import Settings
from ckptd.core.vocab import FailReason
from ckptd.disk.persist import PersistError, reason_for
from ckptd.disk.safepath import DIR_FLAGS, OutsideRoots, open_dir

__all__ = ["Target", "open_target", "open_unit", "opened_unit"]


@dataclass(frozen=True)
class Target:
    """Where one job's checkpoints live and the settings retention and quota read."""

    directory: str
    job: str
    settings: Settings
    roots: Sequence[str] = field(default_factory=tuple)
    owner: int | None = None  # the uid that must still own the directory at each save (unprivileged clients)

    @property
    def guard(self) -> Sequence[str]:
        """Writes and deletions never leave these: the daemon's roots, or the job's own directory."""
        return self.roots or (self.directory,)


def open_target(t: Target) -> int:
    """The job directory, reached from its root without following links, still owned as at hello.

    A client that swaps its directory (or one above it) for a symlink after ``hello``
    gets a refused save, not a file written wherever the link points.
    """
    try:
        dfd = open_dir(t.directory, t.guard)
    except OutsideRoots as exc:
        raise PersistError(FailReason.PERMISSION, str(exc)) from None
    except OSError as exc:
        raise _refused(exc, t.directory) from None
    _check_owner(dfd, t, t.directory)
    return dfd


def open_unit(t: Target, dfd: int, name: str, create: bool) -> int:
    """A sharded unit's directory ``name`` below the job directory's fd ``dfd`` (made if
    ``create``), opened without following a link and owned like the job directory: a link
    planted under the unit's name is refused, not written through."""
    if "/" in name or name in ("", ".", ".."):
        raise PersistError(FailReason.INVALID_TARGET, f"invalid unit name {name!r}")
    path = os.path.join(t.directory, name)
    try:
        if create:
            try:
                os.mkdir(name, 0o755, dir_fd=dfd)
            except FileExistsError:
                pass  # another rank made it, or a stale attempt the prepare stage cleared
        ufd = os.open(name, DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dfd)
    except OSError as exc:
        raise _refused(exc, path) from None
    _check_owner(ufd, t, path)
    return ufd


@contextlib.contextmanager
def opened_unit(t: Target, name: str, create: bool = False) -> Iterator[tuple[int, int]]:
    """The job directory and the unit ``name`` below it, both through the guard (``open_target``
    then ``open_unit``), as ``(directory fd, unit fd)``; both closed when the block ends."""
    dfd = open_target(t)
    try:
        ufd = open_unit(t, dfd, name, create)
        try:
            yield dfd, ufd
        finally:
            os.close(ufd)
    finally:
        os.close(dfd)


def _check_owner(fd: int, t: Target, path: str) -> None:
    owner = os.fstat(fd).st_uid
    if t.owner is not None and owner != t.owner:
        os.close(fd)
        raise PersistError(
            FailReason.PERMISSION,
            f"checkpoint directory {path} is owned by uid {owner}, not by the job's uid {t.owner}",
        )


def _refused(exc: OSError, path: str) -> PersistError:
    linked = exc.errno in (errno.ELOOP, errno.ENOTDIR)
    return PersistError(
        FailReason.PERMISSION if linked else reason_for(exc),
        f"cannot open checkpoint directory {path} (no links are followed under the roots): {exc.strerror or exc}",
    )

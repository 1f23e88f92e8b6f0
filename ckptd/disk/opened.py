"""Files opened once, without following a link, and read only from those fds.

What is verified must be what is read next (an export's copy, a save kept as it is): a
reader that checks a file and then opens it again by name reads whatever the name points to
by then, a symlink to another user's checkpoint included. ``Opened`` holds one directory fd
and opens each file below it at most once, relative to that fd, with ``O_NOFOLLOW`` (a link
is refused, never followed) and ``O_NONBLOCK`` (a FIFO does not hang the open), and requires a
regular file. Every later reader of that name (the verifier, the references' check, the
copy) gets a duplicate of the same fd: the same inode, whatever happens to the name.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

__all__ = ["FILE_FLAGS", "Opened", "open_file_at", "regular", "unreadable"]

FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def open_file_at(dir_fd: int, name: str) -> int:
    """An fd of the regular file ``name`` directly below ``dir_fd`` (no link, no other type)."""
    if not name or "/" in name or name in (".", ".."):
        raise OSError(errno.EINVAL, f"{name!r} is not a file name")
    return regular(os.open(name, FILE_FLAGS, dir_fd=dir_fd), name)


def regular(fd: int, label: str) -> int:
    """``fd`` (opened ``O_NONBLOCK``) made blocking if it is a regular file; else closed, and an error."""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{label} is not a regular file")
        os.set_blocking(fd, True)
    except OSError:
        os.close(fd)
        raise
    return fd


def unreadable(exc: OSError, name: str) -> str:
    """Why ``name`` could not be opened, in words; a link says so (it is never followed)."""
    if exc.errno == errno.ELOOP:
        return f"{name} is a symbolic link (ckptd never follows one to read a checkpoint: give the file's own path)"
    return f"cannot read: {exc.strerror or exc}"


class Opened:
    """A directory and the files opened below it, each opened once (see the module's docstring)."""

    def __init__(self, dir_fd: int, label: str = "") -> None:
        self.dir_fd = dir_fd
        self.label = label
        self._fds: dict[str, int] = {}

    @classmethod
    def at(cls, directory: str, nofollow: bool = False) -> "Opened":
        """The directory ``directory`` (as the caller's path names it; ``nofollow``: its last
        component must not be a link either)."""
        fd = os.open(directory or ".", _DIR_FLAGS | (os.O_NOFOLLOW if nofollow else 0))
        return cls(fd, directory)

    @classmethod
    def beside(cls, path: str) -> "Opened":
        """The directory that holds the file ``path``."""
        return cls.at(os.path.dirname(path) or ".")

    @property
    def proc_path(self) -> str:
        """A path to the opened directory itself (``/proc/PID/fd/N``, a link the kernel resolves to
        this directory, not to the name it was opened by), for readers that only take paths."""
        return f"/proc/{os.getpid()}/fd/{self.dir_fd}"

    def fd(self, name: str) -> int:
        """The one fd of ``name`` (opened now if it was not yet)."""
        if name not in self._fds:
            self._fds[name] = open_file_at(self.dir_fd, name)
        return self._fds[name]

    def open(self, name: str) -> tuple[BinaryIO, int]:
        """A file object over a duplicate of ``name``'s fd, and its size (the ``refs.Opener`` shape).
        Duplicates share the file offset: readers seek before they read, and take turns."""
        fd = os.dup(self.fd(name))
        f = os.fdopen(fd, "rb", buffering=0)
        return f, os.fstat(fd).st_size

    def names(self) -> list[str]:
        return list(self._fds)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1

    def __enter__(self) -> "Opened":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""An export's output directory: reached without a link, its caller's own, written only by new files.

``ckptd export`` is run by root on paths that users control. Root writing ``OUT_DIR/config.json.tmp``
with a plain ``open`` follows a link the unit's author planted there, and overwrites whatever
root file it names with JSON the author chose. So, here:

- OUT_DIR is walked from ``/`` (or the working directory) one component at a time with
  ``O_NOFOLLOW``: a symbolic link anywhere on the path is refused, not followed, and every
  file is then reached from the one directory fd the walk ends with (a name swapped later
  changes nothing);
- OUT_DIR must be owned by the caller: root does not write into a user's directory (whose
  owner may rename, link and swap entries in it), nor a user into another's;
- every output is created ``O_CREAT | O_EXCL | O_NOFOLLOW`` under a random temp name relative to
  that fd, fsynced, then renamed onto its name (a rename replaces the entry, it never follows it);
- missing directories of the path are created (as ``makedirs`` would), and removed again when
  the export fails before it wrote anything (a refused export leaves no empty OUT_DIR).
"""

from __future__ import annotations

import errno
import os
import pwd
import secrets
import stat
from typing import Callable, NoReturn

__all__ = ["OutDir", "OutputError"]

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class OutputError(Exception):
    """OUT_DIR cannot be written safely; the message says why and what would work."""


class OutDir:
    """The open output directory (``open``), what was created to reach it, and what was written."""

    def __init__(self, path: str, fd: int, created: list[tuple[int, str]]) -> None:
        self.path, self.fd = path, fd
        self._created = created  # (parent fd, name) of each directory this export made, outermost first
        self.written: list[str] = []

    @classmethod
    def open(cls, path: str) -> "OutDir":
        created: list[tuple[int, str]] = []
        fd = os.open("/" if os.path.isabs(path) else ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in [p for p in path.split("/") if p not in ("", ".")]:
                fd = _step(fd, part, path, created)
            _check_owner(fd, path)
        except BaseException:
            _undo(created)
            parents = {p for p, _ in created}
            for p in parents:
                os.close(p)
            if fd not in parents:
                os.close(fd)
            raise
        return cls(path, fd, created)

    def write(self, name: str, fill: Callable[[int], None], mode: int = 0o644) -> str:
        """``name`` in OUT_DIR, all or nothing: ``fill`` writes into a new temp file's fd, which
        is fsynced and renamed onto ``name``. Returns the output's path."""
        tmp = f".{name}.ckptd-tmp.{os.getpid()}.{secrets.token_hex(8)}"
        out = os.open(tmp, _NEW, mode, dir_fd=self.fd)
        try:
            try:
                fill(out)
                os.fsync(out)
            finally:
                os.close(out)
            os.rename(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            _unlink_quietly(self.fd, tmp)
            raise
        self.written.append(name)
        return os.path.join(self.path, name)

    def close(self, ok: bool) -> None:
        """Make the renames durable; on failure with nothing written, remove what ``open`` created."""
        try:
            if ok:
                os.fsync(self.fd)
            elif not self.written:
                _undo(self._created)
        finally:
            os.close(self.fd)
            for parent, _ in self._created:
                os.close(parent)
            self._created.clear()


def _step(fd: int, part: str, path: str, created: list[tuple[int, str]]) -> int:
    """From ``fd`` one component down (made when missing); a link is refused. Closes ``fd``
    unless it is kept as the parent of a directory made here."""
    try:
        nxt = os.open(part, _DIR, dir_fd=fd)
    except FileNotFoundError:
        try:
            os.mkdir(part, 0o755, dir_fd=fd)
            created.append((fd, part))
        except FileExistsError:
            pass  # made meanwhile by someone else: opened (and checked) like any other
        try:
            nxt = os.open(part, _DIR, dir_fd=fd)
        except OSError as exc:
            _refuse(exc, fd, part, path)
    except OSError as exc:
        _refuse(exc, fd, part, path)
    if not created or created[-1][0] != fd:
        os.close(fd)
    return nxt


def _refuse(exc: OSError, fd: int, part: str, path: str) -> NoReturn:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        try:
            link = stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode)
        except OSError:
            link = exc.errno == errno.ELOOP
        what = "a symbolic link" if link else "not a directory"
        raise OutputError(
            f"OUT_DIR {path}: {part} is {what}; an export never writes through a link (give the directory's real path)"
        ) from None
    raise exc


def _check_owner(fd: int, path: str) -> None:
    st = os.fstat(fd)
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"OUT_DIR {path} is not a directory")
    me = os.geteuid()
    if st.st_uid != me:
        raise OutputError(
            f"OUT_DIR {path} is owned by {_user(st.st_uid)}, not by you ({_user(me)}): an export "
            "writes only into its caller's own directory (choose or create one of yours)"
        )


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _undo(created: list[tuple[int, str]]) -> None:
    for parent, name in reversed(created):
        try:
            os.rmdir(name, dir_fd=parent)
        except OSError:
            pass  # not empty, or gone: what is there now is not this export's to remove


def _unlink_quietly(fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=fd)
    except OSError:
        pass

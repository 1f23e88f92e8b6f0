"""A job's files are touched with the job owner's rights: per-thread filesystem identity.

The daemon (root, or the service user ``ckptd`` holding only CAP_SETUID and CAP_SETGID)
opens, creates, renames, reads and unlinks files in directories that its users control.
Doing that with its own rights would give a user, through the daemon, what the kernel
refuses them: another user's 0700 file behind a symlink, a directory they could not write.
So every piece of a job's file work runs *as the job's owner*, and the kernel checks it
exactly as it would check the owner's own process. This is what NFS and Samba servers do.

Lifecycle of one piece of work (one thread, nothing else in the process is affected):

1. **enter** (``acting_as(who)``): the thread's supplementary groups (the raw ``setgroups``
   syscall: glibc's ``setgroups``, and so ``os.setgroups``, would change *every* thread of the
   process through its setxid broadcast), then ``setfsgid`` and ``setfsuid`` (per-thread
   syscalls that fail silently, so each is read back). When the fsuid leaves 0 the kernel
   drops the filesystem capabilities (CAP_DAC_OVERRIDE, CAP_FOWNER, ...) from this thread's
   effective set; a service user has none to drop.
2. **work**: every open, create, rename, unlink and read of the job's files. The catalogue,
   the socket, the metrics and the state directory are the daemon's: code that needs them
   in the middle of a job's work steps back with ``as_daemon()``.
3. **leave** (always, in ``finally``): ``setfsuid``, ``setfsgid`` and the groups back to the
   daemon's own; a root daemon's filesystem capabilities come back with fsuid 0.

A module imported for the first time inside the switch is found and loaded with the daemon's
rights (a meta path finder, installed at the first switch). A thread started inside the switch
would inherit it for good: never start one there
(``acting_as`` refuses to nest a second owner, which is how a leaked switch would show).
The owner's uid being the daemon's own is a no-op. A daemon that may not switch (no
CAP_SETUID/CAP_SETGID) refuses another uid's work with ``OwnerError``: it never does it
with its own rights instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.abc
import importlib.machinery
import os
import platform
import pwd
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

__all__ = [
    "NOBODY",
    "Identity",
    "OwnerError",
    "acting_as",
    "as_daemon",
    "current_fs_ids",
    "owner_of",
    "start_thread",
    "uid_of",
]

NOBODY = NOBODY_GID = 65534  # the overflow ids: whose rights a file nobody can be found to own is read with

# setgroups(2) by number: the per-thread system call, not glibc's process-wide wrapper
_SYS_SETGROUPS = {"x86_64": 116, "aarch64": 159, "riscv64": 159, "ppc64le": 81, "s390x": 206}


class OwnerError(PermissionError):
    """The daemon may not act as a job's owner: the work is refused, not done with its own rights."""


@dataclass(frozen=True)
class Identity:
    """Whose rights a piece of file work runs with: uid, primary gid, supplementary groups."""

    uid: int
    gid: int
    groups: tuple[int, ...]

    @classmethod
    def of(cls, uid: int, gid: int = NOBODY_GID) -> "Identity":
        """A uid's identity from the passwd and group databases (its real memberships, not a gid
        a process happens to run with); ``gid`` alone for a uid the database does not know."""
        try:
            user = pwd.getpwuid(uid)
        except KeyError:
            return cls(uid, gid, (gid,))
        return cls(uid, user.pw_gid, tuple(sorted(set(os.getgrouplist(user.pw_name, user.pw_gid)))))


def uid_of(path: str) -> int | None:
    """The uid owning ``path`` itself (a symlink's, not its target's); None when it cannot be seen."""
    try:
        return os.lstat(path).st_uid
    except OSError:
        return None


def owner_of(path: str) -> Identity:
    """The identity of whoever owns ``path`` itself (a symlink's owner, not its target's): whose
    rights a watched unit, or a file with no catalogued job, is handled with."""
    st = os.lstat(path)
    return Identity.of(st.st_uid, st.st_gid)


_DAEMON = Identity(os.geteuid(), os.getegid(), tuple(sorted(set(os.getgroups()))))  # at import, before any switch
_local = threading.local()  # .who: the identity this thread acts as, None for the daemon's own


def current_fs_ids() -> tuple[int, int]:
    """This thread's (fsuid, fsgid), read back without changing them (an invalid -1 changes nothing)."""
    libc = _libc()
    return libc.setfsuid(-1) & 0xFFFFFFFF, libc.setfsgid(-1) & 0xFFFFFFFF


@contextmanager
def acting_as(who: Identity) -> Iterator[None]:
    """Run the body with ``who``'s filesystem rights, in this thread only (see the module's lifecycle)."""
    prev = getattr(_local, "who", None)
    if prev == who or (prev is None and who.uid == _DAEMON.uid):
        yield
        return
    if prev is not None:
        raise RuntimeError(f"acting as uid {prev.uid} already: uid {who.uid}'s work must not nest in it")
    if not isinstance(sys.meta_path[0], _ImportsAsDaemon):
        sys.meta_path.insert(0, _ImportsAsDaemon())
    _switch(who)
    _local.who = who
    try:
        yield
    finally:
        _local.who = None
        _switch(_DAEMON, leaving=True)


@contextmanager
def as_daemon() -> Iterator[None]:
    """Inside ``acting_as``: the daemon's own rights for its own files (the catalogue, the state dir)."""
    prev = getattr(_local, "who", None)
    if prev is None:
        yield
        return
    _local.who = None
    _switch(_DAEMON, leaving=True)
    try:
        yield
    finally:
        _switch(prev)
        _local.who = prev


def start_thread(thread: threading.Thread) -> None:
    """Start ``thread`` with the daemon's own rights, wherever it is started from. A new thread
    inherits its creator's credentials from the kernel, not this module's record of them: one
    started inside ``acting_as`` (a background refresher a reader wakes up during retention)
    would run as the job's owner for good, and fail to import what only the daemon may read."""
    with as_daemon():
        thread.start()


class _ImportsAsDaemon(importlib.abc.MetaPathFinder):
    """A module first imported inside the switch (a lazy ``import torch``) is found and loaded with
    the daemon's rights: the interpreter's files are the daemon's business, and may be where the
    job's owner cannot read (a python under a 0700 home)."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if getattr(_local, "who", None) is None:
            return None
        with as_daemon():
            for finder in sys.meta_path:
                find = getattr(finder, "find_spec", None)
                spec: importlib.machinery.ModuleSpec | None = (
                    find(name, path, target) if finder is not self and find is not None else None
                )
                if spec is not None:
                    break
            else:
                return None
        if spec.loader is not None:
            spec.loader = _LoaderAsDaemon(spec.loader)
        return spec


class _LoaderAsDaemon(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        with as_daemon():
            return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # the module keeps its own loader
        with as_daemon():
            self.loader.exec_module(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


def _switch(to: Identity, leaving: bool = False) -> None:
    libc = _libc()
    try:
        if leaving:  # uid first: a root daemon gets its filesystem capabilities back before the rest
            _set_id(libc.setfsuid, to.uid, "fsuid")
        _setgroups(libc, to.groups)
        _set_id(libc.setfsgid, to.gid, "fsgid")
        if not leaving:
            _set_id(libc.setfsuid, to.uid, "fsuid")
    except OwnerError:
        if leaving:  # the thread would keep a user's rights: nothing may run on it any more
            os.abort()
        _switch(_DAEMON, leaving=True)
        raise OwnerError(
            f"ckptd (uid {_DAEMON.uid}) cannot act as uid {to.uid}, whose files these are: it needs "
            "CAP_SETUID and CAP_SETGID (the shipped unit grants them: AmbientCapabilities=CAP_SETUID "
            f"CAP_SETGID), or to run as uid {to.uid} itself"
        ) from None


def _set_id(call: Callable[[int], int], value: int, what: str) -> None:
    if call(-1) & 0xFFFFFFFF == value:
        return
    call(value)
    if call(-1) & 0xFFFFFFFF != value:  # setfsuid/setfsgid say nothing when refused: read it back
        raise OwnerError(f"{what} {value} refused")


def _setgroups(libc: ctypes.CDLL, groups: tuple[int, ...]) -> None:
    nr = _SYS_SETGROUPS.get(platform.machine())
    if nr is None:
        raise OwnerError(f"no per-thread setgroups syscall number known for {platform.machine()}")
    if tuple(sorted(set(os.getgroups()))) == groups:  # getgroups(2) is this thread's: nothing to change
        return
    arr = (ctypes.c_uint * max(1, len(groups)))(*groups)
    if libc.syscall(ctypes.c_long(nr), ctypes.c_size_t(len(groups)), arr) != 0:
        raise OwnerError(f"setgroups: {os.strerror(ctypes.get_errno())}")


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _LIBC

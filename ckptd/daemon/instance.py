"""One daemon per socket and per state directory.

A second ``ckptd serve`` on the same socket used to unlink the live daemon's socket, bind its
own, and on stopping unlink that too: trainers then found no daemon at all while the first
one still ran. Two daemons on one state directory would write one catalogue from two
processes. So, before the catalogue is opened or the socket bound, the daemon takes an
exclusive ``flock`` on ``STATE_DIR/ckptd.lock`` and on ``SOCKET.lock`` beside the socket,
and holds both until it exits (the kernel drops them when the process dies, however it
dies: no stale lock to clean up). A daemon that cannot take one refuses to start and names
the holder's pid. The lock files are never unlinked: a lock on an unlinked file would let
the next daemon lock a new file beside a running one.
"""

from __future__ import annotations

import errno
import fcntl
import os

from ckptd.disk.preflight import TargetError

__all__ = ["AlreadyServing", "InstanceLock"]


class AlreadyServing(TargetError):
    """Another daemon holds the socket or the state directory."""


class InstanceLock:
    def __init__(self, socket_path: str, state_dir: str) -> None:
        self._fds: list[int] = []
        try:
            for path, what in (
                (os.path.join(state_dir, "ckptd.lock"), f"state_dir {state_dir}"),
                (socket_path + ".lock", f"socket {socket_path}"),
            ):
                self._fds.append(_take(path, what))
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)  # closing the last fd drops the flock
        self._fds.clear()


def _take(path: str, what: str) -> int:
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        key = what.split()[0]
        raise TargetError(
            f"{what}: cannot lock {path} ({exc.strerror or exc}); set [daemon] {key} (or --{key.replace('_', '-')}) "
            f"to a place uid {os.getuid()} may write"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise AlreadyServing(
                f"another ckptd (pid {holder}) is already serving {what}; "
                "stop it first, or give this one its own socket and state_dir"
            ) from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd

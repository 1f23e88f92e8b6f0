"""The Unix socket trainers and the CLI connect to, and the thread that accepts on it.

Bound mode 0660 (group ``[daemon] group``); accept() blocks, and ``close`` wakes it at once
by shutting the socket down. No exception ends the accept loop but ``close``: running out of
descriptors (EMFILE), of threads (``RuntimeError: can't start new thread``) or of memory is a
state to report (once per change), back off from and wait out, never a reason to stop
accepting: the socket would be dead for good while the process lives on. A connection that
could not be handed on is closed, never leaked.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import threading
from typing import Callable

from ckptd.wire import protocol

log = logging.getLogger(__name__)
BACKOFF_FIRST, BACKOFF_MAX = 0.05, 1.0  # seconds between tries while accepting keeps failing


class Listener:
    def __init__(self, path: str, group_gid: int | None, on_connection: Callable[[socket.socket], None]) -> None:
        self.path, self._group_gid, self._on_connection = path, group_gid, on_connection
        self._closed = threading.Event()
        self._sock = self._bind()
        self._ino = os.stat(self.path).st_ino  # the socket file clients reach: the one we bound
        self._thread = threading.Thread(target=self._accept_loop, name="ckptd-accept", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Accepting, and reachable: the accept thread runs, and the socket's path is still the
        socket it accepts on (a path unlinked or replaced reaches no one; a restart rebinds it)."""
        return not self._closed.is_set() and self._sock.fileno() >= 0 and self._thread.is_alive() and self._reachable()

    def _reachable(self) -> bool:
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        return stat.S_ISSOCK(st.st_mode) and st.st_ino == self._ino

    def close(self, timeout: float = 10.0) -> None:
        self._closed.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes accept() at once (EINVAL)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout)
        if self._reachable():  # never another daemon's socket bound at our path since
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def _bind(self) -> socket.socket:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.path)
        os.chmod(self.path, 0o660)
        if self._group_gid is not None:
            os.chown(self.path, -1, self._group_gid)
        s.listen(512)
        return s

    def _accept_loop(self) -> None:
        trouble = Trouble(f"accepting on {self.path}")
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError as exc:
                if self._closed.is_set() or exc.errno in (errno.EBADF, errno.EINVAL):
                    break
                self._closed.wait(
                    trouble.failed(
                        f"failed: {exc.strerror or exc} (is a client holding "
                        "many connections? LimitNOFILE= raises the limit)"
                    )
                )
                continue
            except Exception as exc:  # noqa: BLE001 (MemoryError and kin: the loop outlives them all)
                self._closed.wait(trouble.failed(f"failed: {exc!r}"))
                continue
            try:
                self._on_connection(conn)
            except Exception as exc:  # noqa: BLE001 (RuntimeError: can't start new thread, MemoryError...)
                _refuse(conn, f"the daemon cannot serve this connection now ({exc}); try again")
                self._closed.wait(
                    trouble.failed(
                        f"failed to serve a connection: {exc!r} (TasksMax=, "
                        "RLIMIT_NPROC or memory; connections are refused meanwhile)"
                    )
                )
                continue
            trouble.ok()


class Trouble:
    """A loop's failures, logged once per change of problem with the pause before the next try
    (doubling, up to ``BACKOFF_MAX``), and its recovery logged once."""

    def __init__(self, what: str) -> None:
        self._what, self._problem, self._pause = what, "", 0.0

    def failed(self, problem: str) -> float:
        """The seconds to wait before trying again."""
        if problem != self._problem:
            log.error("%s %s; retrying", self._what, problem)
            self._problem = problem
        self._pause = min(BACKOFF_MAX, max(BACKOFF_FIRST, self._pause * 2))
        return self._pause

    def ok(self) -> None:
        if self._problem:
            log.info("%s again", self._what)
        self._problem, self._pause = "", 0.0


def _refuse(conn: socket.socket, error: str) -> None:
    """Best effort, never blocking: tell the client why, then close its connection."""
    try:
        conn.setblocking(False)
        protocol.send(conn, {"type": "error", "error": error})
    except Exception:  # noqa: BLE001 (a full buffer, a vanished client: it is closed either way)
        pass
    finally:
        conn.close()

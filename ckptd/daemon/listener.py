"""The Unix socket trainers and the CLI connect to, and the thread that accepts on it.

Bound mode 0660 (group ``[daemon] group``); accept() blocks, and ``close`` wakes it at once
by shutting the socket down. Running out of descriptors (EMFILE) is a state to report and
wait out, never a reason to stop accepting: the socket would be dead for good while the
process lives on.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import threading
from typing import Callable

log = logging.getLogger("ckptd.daemon")


class Listener:
    def __init__(self, path: str, group_gid: int | None, on_connection: Callable[[socket.socket], None]) -> None:
        self.path, self._group_gid, self._on_connection = path, group_gid, on_connection
        self._closed = threading.Event()
        self._sock = self._bind()
        self._inode = os.lstat(path).st_ino  # close() unlinks this socket, never one bound after it
        self._thread = threading.Thread(target=self._accept_loop, name="ckptd-accept", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return not self._closed.is_set() and self._sock.fileno() >= 0 and self._thread.is_alive()

    def close(self, timeout: float = 10.0) -> None:
        self._closed.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes accept() at once (EINVAL)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout)
        try:
            if os.lstat(self.path).st_ino == self._inode:
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
        trouble = False
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError as exc:
                if self._closed.is_set() or exc.errno in (errno.EBADF, errno.EINVAL):
                    break
                if not trouble:
                    log.error("accepting on %s failed: %s; retrying (is a client holding many connections? "
                              "LimitNOFILE= raises the limit)", self.path, exc.strerror or exc)
                trouble = True
                self._closed.wait(0.1)
                continue
            if trouble:
                log.info("accepting on %s again", self.path)
                trouble = False
            self._on_connection(conn)

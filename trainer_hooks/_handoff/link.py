"""The hook's connection to the daemon, owned by one background thread.

The thread connects (and reconnects every ``retry_every`` seconds while there is no
daemon), reads the daemon's replies and events, and sends batched heartbeats (at
most one a second, only when the step moved). The trainer thread itself sends only
``save`` messages, right after staging, so that the snapshot's fd is in the daemon's
hands when ``step()`` returns (see ``ckptd.wire.protocol`` for the whole lifecycle).

If the connection breaks, every save still in flight is handed back through
``on_lost``: its snapshot is still in the staging buffer (it is only reused after a
``saved`` reply), so the embedded worker persists it instead. Nothing is lost and
training never waits on the socket.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from typing import Any, Callable

from ckptd import __version__
from ckptd.wire import protocol
from trainer_hooks._handoff.worker import StagedSave

log = logging.getLogger(__name__)
HEARTBEAT_EVERY = 1.0


def socket_path(socket: str | bool | None) -> str | None:
    """The hook's ``socket=``: False for none, None/True for the default, else the path given."""
    return None if socket is False else protocol.default_socket_path() if socket in (None, True) else str(socket)


class Link:
    def __init__(
        self,
        path: str,
        hello: Callable[[], dict[str, Any]],
        progress: Callable[[], dict[str, Any]],
        on_saved: Callable[[StagedSave, dict[str, Any]], None],
        on_lost: Callable[[list[StagedSave]], None],
        retry_every: float = 5.0,
        on_due: Callable[[str], None] | None = None,
    ) -> None:
        self.path = path
        self._hello, self._progress = hello, progress
        self._on_saved, self._on_lost, self._on_due = on_saved, on_lost, on_due
        self._retry_every = retry_every
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._inflight: dict[int, StagedSave] = {}
        self._next_id = 1
        self._idle = threading.Event()
        self._idle.set()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()  # close() wakes the reader's select at once
        self._bye = threading.Event()
        self._last_beat_step = -1
        self._last_beat_at = 0.0
        self.refused: str | None = None
        self._connect()  # first attempt inline: the log says at once which mode the run is in
        self._thread = threading.Thread(target=self._run, name="ckptd-link", daemon=True)
        self._thread.start()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    @property
    def busy(self) -> bool:
        return not self._idle.is_set()

    def holds(self, fd: int) -> bool:
        """Is a save staged in the buffer ``fd`` still in flight (so the buffer is not free)?"""
        with self._lock:
            return any(staged.fd == fd for staged in self._inflight.values())

    def wait_idle(self, timeout: float | None = None) -> bool:
        return self._idle.wait(timeout)

    # -- trainer thread -------------------------------------------------------------------

    def submit(self, staged: StagedSave, msg: dict[str, Any]) -> bool:
        """Hand a staged snapshot to the daemon; False means "persist it yourself"."""
        with self._lock:
            if self._sock is None:
                return False
            ident = self._next_id
            self._next_id += 1
            try:
                protocol.send(self._sock, {**msg, "type": "save", "id": ident}, fd=staged.fd)
            except (OSError, protocol.ProtocolError):
                return False  # the reader thread notices the broken socket and reconnects later
            self._inflight[ident] = staged
            self._idle.clear()
            return True

    def notify(self, msg: dict[str, Any]) -> None:
        """Best-effort message from the trainer thread (e.g. a skipped save)."""
        with self._lock:
            if self._sock is not None:
                try:
                    protocol.send(self._sock, msg)
                except (OSError, protocol.ProtocolError):
                    pass

    def close(self, end_step: int | None, timeout: float = 10.0) -> None:
        if end_step is not None and self.connected:
            self.notify({"type": "end", "step": end_step})
            self._bye.wait(timeout)
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join(timeout)
        self._drop(handback=False)
        self._wake_r.close()
        self._wake_w.close()

    # -- background thread ---------------------------------------------------------------

    def _connect(self) -> bool:
        if not os.path.exists(self.path):
            return False
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(5.0)
            s.connect(self.path)
            protocol.send(s, {"type": "hello", "version": __version__, **self._hello()})  # ckptd_hook_info
            reply, fds = protocol.recv(s)
            protocol.close_fds(fds)
        except (OSError, EOFError, protocol.ProtocolError):
            s.close()
            return False
        if reply.get("type") != "welcome":
            self.refused = str(reply.get("error", reply))
            log.warning("ckptd: daemon at %s refused this job: %s; saving in embedded mode", self.path, self.refused)
            s.close()
            return False
        s.settimeout(None)
        with self._lock:
            self._sock = s
        log.info("ckptd: connected to the daemon at %s", self.path)
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._sock is None:
                if self.refused or not self._connect():
                    self._stop.wait(self._retry_every)
                continue
            try:
                ready, _, _ = select.select([self._sock, self._wake_r], [], [], HEARTBEAT_EVERY)
                if self._stop.is_set():
                    break
                if self._sock in ready:
                    msg, fds = protocol.recv(self._sock, limit=protocol.MAX_REPLY)
                    protocol.close_fds(fds)
                    self._handle(msg)
                self._heartbeat()
            except (OSError, EOFError, protocol.ProtocolError, ValueError):
                if not self._stop.is_set():
                    log.warning("ckptd: lost the daemon at %s; continuing in embedded mode", self.path)
                self._drop(handback=True)

    def _heartbeat(self) -> None:
        """At most one a second, and only when the step moved: never one per step."""
        now = time.monotonic()
        if now - self._last_beat_at < HEARTBEAT_EVERY:
            return
        beat = self._progress()
        if beat["step"] != self._last_beat_step:
            self._last_beat_step, self._last_beat_at = beat["step"], now
            self.notify({"type": "heartbeat", **beat})

    def _handle(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "saved":
            with self._lock:
                staged = self._inflight.pop(int(msg.get("id", -1)), None)
            if staged is not None:
                self._on_saved(staged, msg)
            with self._lock:
                if not self._inflight:
                    self._idle.set()
        elif kind == "due" and self._on_due is not None:
            self._on_due(str(msg.get("rule", "every")))
        elif kind == "bye":
            self._bye.set()
        elif kind == "error":
            log.warning("ckptd: daemon error: %s", msg.get("error"))

    def _drop(self, handback: bool) -> None:
        """Forget the connection; in-flight saves go back before the buffer counts as free."""
        with self._lock:
            sock, self._sock = self._sock, None
            lost = list(self._inflight.values())
            self._inflight.clear()
        if sock is not None:
            sock.close()
        if handback and lost:
            self._on_lost(lost)
        self._idle.set()

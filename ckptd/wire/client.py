"""The CLI's side of the socket: one request, one reply."""

from __future__ import annotations

import socket
from typing import Any

from ckptd.wire import protocol


class DaemonUnavailable(Exception):
    pass


def request(path: str, msg: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    reply, fds = _exchange(path, msg, timeout, hint="; is `ckptd serve` running?")
    protocol.close_fds(fds)
    return reply


def request_fd(path: str, msg: dict[str, Any], timeout: float = 30.0) -> tuple[dict[str, Any], int | None]:
    """One request whose reply may carry a file descriptor (the memory tier's snapshot): the
    caller owns and closes it."""
    reply, fds = _exchange(path, msg, timeout)
    protocol.close_fds(fds[1:])
    return reply, fds[0] if fds else None


def _exchange(path: str, msg: dict[str, Any], timeout: float, hint: str = "") -> tuple[dict[str, Any], list[int]]:
    """Connect, send ``msg``, read one reply and the descriptors it carries (the caller closes
    them). ``hint`` ends the message of a failed connect (the CLI tells its user what to start)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except OSError as exc:
            raise DaemonUnavailable(f"no ckptd daemon at {path} ({exc.strerror}){hint}") from None
        protocol.send(s, msg)
        return protocol.recv(s, limit=protocol.MAX_REPLY)
    except (EOFError, protocol.ProtocolError, OSError) as exc:
        raise DaemonUnavailable(f"the daemon at {path} did not answer: {exc}") from None
    finally:
        s.close()

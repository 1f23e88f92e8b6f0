"""sd_notify without libsystemd: one datagram to ``$NOTIFY_SOCKET`` (SPEC §9).

A no-op when not started by systemd. Abstract sockets (``@...``) are supported.

Never blocking: a datagram socket queues only a few unread messages (``max_dgram_qlen``,
10 by default), and a supervisor that stops reading must cost a watchdog beat, not the
scheduler thread that sends it, nor the shutdown that says STOPPING=1.
"""

from __future__ import annotations

import os
import socket


def notify(*lines: str) -> bool:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    addr = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            s.connect(addr)
            s.send("\n".join(lines).encode())
        return True
    except OSError:
        return False


def watchdog_interval() -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds, when the watchdog is meant for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6

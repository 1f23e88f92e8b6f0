"""A user outside the socket's group against the metrics port (tests/security/test_resources.py).

    python http_flood.py UID GID PORT N

Starts as root (the interpreter lives where only root may read), then becomes UID:GID with no
supplementary groups. Opens N idle TCP connections to 127.0.0.1:PORT and prints ``ready``; then
feeds one request a byte every half second (slowloris) until the daemon cuts it, and prints one
JSON line: the seconds that took, and how each idle connection ended.
"""

from __future__ import annotations

import encodings.idna  # noqa: F401 (loaded before the uid changes: the interpreter is root-only)
import json
import os
import select
import socket
import sys
import time

uid, gid, port, n = (int(a) for a in sys.argv[1:5])
os.setgroups([])
os.setgid(gid)
os.setuid(uid)

held, failed = [], 0
for _ in range(n):
    try:
        held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
    except OSError:
        failed += 1
print(json.dumps({"ready": True, "held": len(held), "failed": failed}), flush=True)


def ended(s: socket.socket) -> str:
    """How the daemon answered a connection so far: refused (a 503), closed, or still open."""
    s.setblocking(False)
    try:
        data = s.recv(4096)
    except BlockingIOError:
        return "open"
    except OSError:
        return "closed"
    return "refused" if data.startswith(b"HTTP/1.0 503") else "closed"


def slowloris() -> float | None:
    """Seconds until a request fed a byte every half second is cut (None: never, in 30 s);
    a connection refused at once (the flood's still hold this peer's share) is tried again
    half a second later, for 30 s."""
    for _ in range(60):
        with socket.create_connection(("127.0.0.1", port)) as slow:
            outcome = feed(slow, time.monotonic())
        if outcome != "refused":
            return outcome
        time.sleep(0.5)
    return None


def feed(slow: socket.socket, started: float) -> float | str | None:
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-a: b\r\n" * 200
    try:
        for i in range(60):
            slow.send(request[i : i + 1])
            if select.select([slow], [], [], 0.5)[0]:
                if slow.recv(4096).startswith(b"HTTP/1.0 503"):
                    return "refused"
                return time.monotonic() - started
    except OSError:
        return time.monotonic() - started
    return None


cut = slowloris()
counts = {"refused": 0, "closed": 0, "open": 0}
for s in held:
    counts[ended(s)] += 1
    s.close()
print(json.dumps({"cut_after": cut, **counts}), flush=True)

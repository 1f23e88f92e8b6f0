"""A trainer without torch: a snapshot image built from bytes, and a client that speaks the protocol.

With the in-process daemon (``inproc_daemon`` in conftest) this tests the daemon's logic in
milliseconds; the real-process tests keep one path each end to end.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from ckptd.core.format import DIGEST_PLACEHOLDER, encode_header, layout
from ckptd.core.meta import CheckpointMeta
from ckptd.wire import protocol


def snapshot(
    job: str, step: int, tensors: dict[str, bytes], trigger: str = "step", rule: str = "every_steps"
) -> tuple[int, int]:
    """A sealed memfd holding a ckptd safetensors image of F32 tensors given as raw bytes; (fd, length)."""
    entries = layout([(name, "F32", (len(data) // 4,)) for name, data in tensors.items()])
    meta = CheckpointMeta(job, step, 1_700_000_000.0, trigger, rule).encode(None, {}, "1")
    meta["ckptd.digests"] = json.dumps({e.name: DIGEST_PLACEHOLDER for e in entries}, separators=(",", ":"))
    meta["ckptd.meta_digest"] = DIGEST_PLACEHOLDER
    header = encode_header(entries, meta)
    fd = protocol.snapshot_memfd(f"{job}-{step}")
    os.write(fd, header)
    for e in entries:
        os.pwrite(fd, tensors[e.name], len(header) + e.begin)
    length = len(header) + (entries[-1].end if entries else 0)
    os.ftruncate(fd, length)
    return fd, length


class Client:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)

    def ask(self, msg: dict[str, Any], fd: int | None = None) -> dict[str, Any]:
        protocol.send(self.sock, msg, fd=fd)
        return protocol.recv(self.sock, limit=protocol.MAX_REPLY)[0]

    def recv(self) -> dict[str, Any]:
        return protocol.recv(self.sock, limit=protocol.MAX_REPLY)[0]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

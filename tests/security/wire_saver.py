"""A trainer without torch, as a subprocess (run as a test's unix user): hello, then saves.

``WIRE_AS=UID:GID python -m tests.security.wire_saver SOCKET JOB DIRECTORY SETTINGS_JSON STEP...`` (started
as root, it becomes that user once its imports are done) prints one
JSON line: the hello reply, then each save's outcome. A ``gate:PATH`` among the steps waits
(connected) until PATH exists: the test says when to go on; ``pause:SECONDS`` trains a while. A checkpoint's ``ckptd.created`` is now
(the replication lag counts from it), and its one tensor holds the step and the job's name.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from ckptd.core.format import DIGEST_PLACEHOLDER, encode_header, layout
from ckptd.core.meta import CheckpointMeta
from ckptd.wire import protocol
from tests.wire_client import Client


def snapshot(job: str, step: int, payload: bytes) -> tuple[int, int]:
    """A sealed memfd with a ckptd image of one F32 tensor (``payload``, padded to 4 bytes)."""
    payload += b"\0" * (-len(payload) % 4)
    entries = layout([("w", "F32", (len(payload) // 4,))])
    meta = CheckpointMeta(job, step, time.time(), "step", "every_steps").encode(None, {}, "1")
    meta["ckptd.digests"] = json.dumps({"w": DIGEST_PLACEHOLDER}, separators=(",", ":"))
    meta["ckptd.meta_digest"] = DIGEST_PLACEHOLDER
    header = encode_header(entries, meta)
    fd = protocol.snapshot_memfd(f"{job}-{step}")
    os.write(fd, header + payload)
    return fd, len(header) + len(payload)


def become(spec: str) -> None:
    """``UID:GID``: drop root after every import (the interpreter may live under a 0700 home)."""
    uid, gid = (int(x) for x in spec.split(":"))
    os.setgroups([gid])
    os.setgid(gid)
    os.setuid(uid)


def main(argv: list[str]) -> int:
    if os.environ.get("WIRE_AS"):
        become(os.environ["WIRE_AS"])
    sock, job, directory, settings = argv[0], argv[1], argv[2], json.loads(argv[3])
    out: list[Any] = []
    with Client(sock) as c:
        c.sock.settimeout(60)
        reply = c.ask(
            {"type": "hello", "job": job, "directory": directory, "settings": settings, "pid": os.getpid(), "step": 0}
        )
        out.append(reply)
        if reply.get("type") == "welcome":
            for arg in argv[4:]:
                if arg.startswith("gate:"):
                    while not os.path.exists(arg[5:]):
                        time.sleep(0.05)
                    continue
                if arg.startswith("pause:"):  # a trainer between saves
                    time.sleep(float(arg[6:]))
                    continue
                step = int(arg)
                fd, length = snapshot(job, step, f"{job}:{os.getuid()}:{step}".encode() * 64)
                try:
                    c.ask(
                        {
                            "type": "save",
                            "id": step,
                            "step": step,
                            "trigger": "step",
                            "rule": "every_steps",
                            "filename": f"{job}-step{step:08d}.safetensors",
                            "length": length,
                        },
                        fd=fd,
                    )
                    out.append(c.recv())
                finally:
                    os.close(fd)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

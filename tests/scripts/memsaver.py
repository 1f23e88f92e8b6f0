"""A socket user's memory-only saves (tests/security/test_resources.py).

    python memsaver.py UID GID SOCKET JSON-JOBS

Starts as root (the interpreter lives where only root may read), becomes UID:GID with the
supplementary groups of that user, then for each ``{"job", "dir", "mib"}`` in order: connects,
says hello, hands over one memory-only save of ``mib`` MiB and waits for its reply. Prints the
replies as one JSON line.
"""

from __future__ import annotations

import json
import os
import pwd
import struct
import sys

from tests.wire_client import Client, snapshot

uid, gid = int(sys.argv[1]), int(sys.argv[2])
os.initgroups(pwd.getpwuid(uid).pw_name, gid)
os.setgid(gid)
os.setuid(uid)

replies = []
for n, job in enumerate(json.loads(sys.argv[4]), 1):
    fd, length = snapshot(job["job"], n, {"w": struct.pack("<f", n) * (job["mib"] << 18)})
    with Client(sys.argv[3]) as c:
        welcome = c.ask(
            {"type": "hello", "job": job["job"], "directory": job["dir"], "settings": {}, "pid": os.getpid(), "step": 0}
        )
        assert welcome["type"] == "welcome", welcome
        assert (
            c.ask(
                {
                    "type": "save",
                    "id": n,
                    "step": n,
                    "trigger": "step",
                    "rule": "r",
                    "memory_only": True,
                    "filename": f"{job['job']}-step{n:08d}.safetensors",
                    "length": length,
                },
                fd=fd,
            )["type"]
            == "accepted"
        )
        replies.append(c.recv())
    os.close(fd)
print(json.dumps(replies))

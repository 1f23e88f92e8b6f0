"""A hostile local client for the security tests: imports as root, then becomes another user.

    python hostile.py ATTACK SOCKET JSON-ARGS

Prints one JSON line with what it saw. Every attack is a thing a member of the socket's
group could do by hand; each returns what the daemon answered.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from typing import Any

import torch

from ckptd.wire import protocol
from trainer_hooks._snapshot.staging import StagingBuffer


def snapshot(job: str, step: int, mib: int = 1) -> StagingBuffer:
    buf = StagingBuffer(job)
    meta = {
        "ckptd.format": "1",
        "ckptd.job": job,
        "ckptd.step": str(step),
        "ckptd.epoch": "",
        "ckptd.created": "2026-01-01T00:00:00.000Z",
        "ckptd.trigger": "step",
        "ckptd.rule": "every_steps",
        "ckptd.metrics": "{}",
        "ckptd.state": "null",
        "ckptd.aliases": "{}",
    }
    buf.length = buf.stage({"w": torch.ones(mib << 18)}, meta)  # type: ignore[attr-defined]
    return buf


def connect(path: str, timeout: float = 30) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def hello(s: socket.socket, job: str, directory: str, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    protocol.send(
        s,
        {
            "type": "hello",
            "job": job,
            "directory": directory,
            "settings": settings or {},
            "pid": os.getpid(),
            "step": 0,
        },
    )
    return protocol.recv(s)[0]


def request(path: str, msg: dict[str, Any]) -> dict[str, Any]:
    with connect(path) as s:
        protocol.send(s, msg)
        return protocol.recv(s, limit=protocol.MAX_REPLY)[0]


def swap_dir(path: str, sock: str, args: dict[str, Any], buf: StagingBuffer) -> dict[str, Any]:
    """hello with my own directory, then make it a symlink to somewhere else, then save."""
    s = connect(sock)
    welcome = hello(s, args["job"], args["dir"])
    os.rename(args["dir"], args["dir"] + ".moved")
    os.symlink(args["target"], args["dir"])
    protocol.send(
        s,
        {
            "type": "save",
            "id": 1,
            "step": 5,
            "trigger": "step",
            "rule": "r",
            "filename": f"{args['job']}-step00000005.safetensors",
            "length": buf.length,
        },
        fd=buf.fd,
    )
    replies = [protocol.recv(s)[0] for _ in range(2)]
    return {"welcome": welcome["type"], "replies": replies}


def shrink(path: str, sock: str, args: dict[str, Any], buf: StagingBuffer) -> dict[str, Any]:
    """An unsealed memfd, shrunk while the daemon hashes it (SIGBUS in the daemon, before)."""
    fd = os.memfd_create("evil", os.MFD_CLOEXEC)
    os.ftruncate(fd, buf.length)
    os.sendfile(fd, buf.fd, 0, buf.length)
    s = connect(sock)
    hello(s, args["job"], args["dir"])
    protocol.send(
        s,
        {
            "type": "save",
            "id": 1,
            "step": 5,
            "trigger": "step",
            "rule": "r",
            "filename": f"{args['job']}-step00000005.safetensors",
            "length": buf.length,
        },
        fd=fd,
    )
    time.sleep(args.get("delay", 0.0))
    os.ftruncate(fd, 0)
    try:
        reply = protocol.recv(s)[0]
    except (EOFError, OSError, protocol.ProtocolError) as exc:
        reply = {"type": "gone", "error": str(exc)}
    sealed = protocol.snapshot_memfd("sealed")
    os.ftruncate(sealed, 4096)
    try:
        os.ftruncate(sealed, 0)
        shrinkable = True
    except PermissionError:
        shrinkable = False
    return {"reply": reply, "sealed_shrinkable": shrinkable, "seals": fcntl.fcntl(sealed, fcntl.F_GET_SEALS)}


def admin(path: str, sock: str, args: dict[str, Any], buf: StagingBuffer) -> dict[str, Any]:
    """What a member of a group sees and may do to another user's job."""
    return {
        "status": [j["job"] for j in request(sock, {"type": "status"})["jobs"]],
        "gc": request(sock, {"type": "gc", "job": args["victim"]}),
        "pin": request(sock, {"type": "pin", "path": args["victim_file"]}),
    }


def many_jobs(path: str, sock: str, args: dict[str, Any], buf: StagingBuffer) -> dict[str, Any]:
    """A new job name per connection: each is a set of metric series."""
    refused, conns = [], []
    for i in range(args["n"]):
        s = connect(sock)
        conns.append(s)
        reply = hello(s, f"j{i}", args["dir"])
        if reply.get("type") != "welcome":
            refused.append((i, reply.get("error", "")))
    for s in conns:
        s.close()
    return {"refused": refused}


def connections(path: str, sock: str, args: dict[str, Any], buf: StagingBuffer) -> dict[str, Any]:
    """Idle connections, as many as asked: past the per-uid cap each is answered and closed."""
    conns, errors = [], []
    for _ in range(args["n"]):
        s = connect(sock, timeout=5)
        conns.append(s)
    for s in conns[-3:]:
        try:
            errors.append(protocol.recv(s)[0].get("error", ""))
        except (OSError, EOFError, protocol.ProtocolError) as exc:
            errors.append(f"no reply: {exc}")
    for s in conns:
        s.close()
    return {"last_three": errors}


def commit_later(path: str, sock: str, args: dict[str, Any], buf: StagingBuffer) -> dict[str, Any]:
    """hello with my own directory; once told (a line on stdin: the directory has changed under
    the session meanwhile), announce a sharded unit in it as committed, as rank 0 does."""
    s = connect(sock)
    welcome = hello(s, args["job"], args["dir"], args.get("settings"))
    print("ready", flush=True)
    sys.stdin.readline()
    protocol.send(
        s,
        {
            "type": "committed",
            "step": args["step"],
            "path": os.path.join(args["dir"], args["unit"]),
            "trigger": "step",
            "ok": True,
            "reason": "",
            "error": "",
            "stall": 0.0,
        },
    )
    protocol.send(s, {"type": "status"})  # answered after the commit was handled: the session reads in order
    return {"welcome": welcome["type"], "status": protocol.recv(s, limit=protocol.MAX_REPLY)[0]["type"]}


def memory_of(path: str, sock: str, args: dict[str, Any], buf: StagingBuffer) -> dict[str, Any]:
    """Ask for another user's job's snapshot from the memory tier."""
    with connect(sock) as s:
        protocol.send(s, {"type": "memory", "job": args["job"], "directory": args["dir"]})
        reply, fds = protocol.recv(s, limit=protocol.MAX_REPLY)
        protocol.close_fds(fds)
    return {"reply": reply, "fds": len(fds)}


ATTACKS = {
    "swap_dir": swap_dir,
    "commit_later": commit_later,
    "memory_of": memory_of,
    "shrink": shrink,
    "admin": admin,
    "many_jobs": many_jobs,
    "connections": connections,
}

if __name__ == "__main__":
    attack, sock, raw = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    staged = snapshot(raw.get("job", "evil"), 5, raw.get("mib", 1))
    os.setgroups([raw.get("egid", 65534)])
    os.setgid(raw.get("egid", 65534))
    os.setuid(raw.get("uid", 65534))
    print(json.dumps(ATTACKS[attack](attack, sock, raw, staged), default=str))

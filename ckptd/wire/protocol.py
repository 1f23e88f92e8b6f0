"""The hook ⇄ daemon protocol: framed JSON over a Unix stream socket, snapshots by fd.

Framing: every message is a 4-byte big-endian length, then that many bytes of UTF-8
JSON (an object with a ``"type"``). Messages over ``MAX_MESSAGE`` (1 MiB) are refused
before they are read. A ``save`` message carries one file descriptor as
``SCM_RIGHTS`` ancillary data on its first byte. Any malformed, oversized or
ill-typed message gets an ``error`` reply and the connection is closed; the daemon
and its other clients carry on.

Lifecycle of one training run, in order:

1. **connect**: the hook connects to the socket (``$CKPTD_SOCKET``, else
   ``$XDG_RUNTIME_DIR/ckptd.sock``, else ``/run/ckptd/ckptd.sock``). The daemon reads
   the peer's pid/uid/gid with ``SO_PEERCRED``; that, not anything the client says,
   is its identity.
2. **hello** ``{job, directory, template, settings, pid, rank, world_size, step, state_bytes, version}`` →
   ``{ok, job}``: the daemon checks that the uid may act on the job and the
   directory (inside the roots, owned by the uid), registers the run and its policy
   (``state_bytes``, optional, seeds ``every="auto"``'s cost guess until a save is measured)
   and catalogues the directory's checkpoints it does not know (those the hook wrote
   embedded while it could not reach the daemon). Refused: the hook runs embedded.
3. **heartbeat** ``{step, epoch, metrics}``: batched by the hook's background thread
   (at most one a second), never one per step. The daemon uses them for
   ``ckptd status``, ``unsaved_steps`` and ``step_skipped`` detection.
4. **save** ``{id, step, epoch, trigger, rule, filename, length, stall, memory_only,
   cost}`` + memfd: sent by the trainer thread itself right after the copy into the
   memfd, so when ``step()`` returns the fd is in the daemon's socket queue: killing
   the trainer now cannot lose the checkpoint (with ``snapshot="overlap"``: sent by the
   copy thread once the copy is done, and ``cost``, the stall plus that thread's time,
   is what every="auto" weighs instead of ``stall``). The daemon replies **accepted** ``{id}`` and persists it
   (hash → temp → fsync → verify → rename → fsync dir, ``ckptd.disk.persist``).
5. **saved** ``{id, ok, path, reason, error}`` (daemon → hook, unsolicited): the
   buffer is released; the hook may overwrite it for the next save. Until then a
   new save waits (or is skipped with ``on_busy="skip"``, counted as
   ``missed{reason="backpressure"}``).
6. **due** ``{rule}`` (daemon → hook, unsolicited): a time rule (``every``/``cron``)
   of the daemon's scheduler fired, or ``memory``: every="auto"'s memory tier wants a
   memory-only save (``save`` with ``memory_only``, staged in the hook's second buffer, so
   it may be in flight beside one disk save); the hook saves at its next ``step()``.
   Sharded jobs (``sharded=True``) send no ``save``: every rank writes its own shard
   and the ranks commit together (``trainer_hooks._ranks.shards``); rank 0, the only rank
   connected, then reports **committed** ``{step, path, trigger, ok, reason, error,
   stall, persist, verify}``. The daemon checks the unit against its manifest,
   catalogues it, counts it like a save and applies retention to whole units.
7. **end** ``{step}``: after the final save is verified. A connection that closes
   without ``end`` counts ``missed{reason="trainer_exit_unsaved"}`` when steps were
   left unsaved; an ``end`` whose step has no verified checkpoint counts
   ``final_missing``.

CLI requests use the same framing on a fresh connection: ``status``, ``list``,
``latest``, ``pin``, ``unpin``, ``gc``; each gets one reply. So does a restarted trainer's
**memory** ``{job, directory}`` (SPEC §14): the reply ``{step, length, path}`` carries the
job's newest verified snapshot as a sealed memfd (``SCM_RIGHTS``), or ``step: null``;
only the job's owner (or a privileged uid) gets it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
from typing import Any

from ckptd.core.format import untrusted_json

MAX_MESSAGE = 1 << 20  # what a client may send the daemon
MAX_REPLY = 256 << 20  # what the daemon may answer (``list`` of a job with 100k checkpoints)
HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer sent something that is not a valid message; the connection ends."""


def default_socket_path(environ: dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    if env.get("CKPTD_SOCKET"):
        return env["CKPTD_SOCKET"]
    if env.get("XDG_RUNTIME_DIR"):
        return os.path.join(env["XDG_RUNTIME_DIR"], "ckptd.sock")
    return "/run/ckptd/ckptd.sock"


def encode(msg: dict[str, Any], limit: int = MAX_MESSAGE) -> bytes:
    body = json.dumps(msg, separators=(",", ":")).encode()
    if len(body) > limit:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {limit}")
    return HEADER.pack(len(body)) + body


def send(sock: socket.socket, msg: dict[str, Any], fd: int | None = None, limit: int = MAX_MESSAGE) -> None:
    data = encode(msg, limit)
    if fd is None:
        sock.sendall(data)
        return
    sent = socket.send_fds(sock, [data[:1]], [fd])
    if sent != 1:
        raise ProtocolError("could not send the file descriptor")
    sock.sendall(data[1:])


def _recv_exact(sock: socket.socket, n: int, fds: list[int]) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk, got, _flags, _addr = socket.recv_fds(sock, n - len(buf), 4)
        fds.extend(got)
        if not chunk:
            if buf:
                raise ProtocolError("connection closed inside a message")
            raise EOFError
        buf += chunk
    return bytes(buf)


def recv(sock: socket.socket, limit: int = MAX_MESSAGE) -> tuple[dict[str, Any], list[int]]:
    """One message and the fds that came with it; EOFError at a clean end of stream."""
    fds: list[int] = []
    try:
        (n,) = HEADER.unpack(_recv_exact(sock, HEADER.size, fds))
        if n > limit:
            raise ProtocolError(f"message of {n} bytes exceeds the {limit}-byte limit")
        body = _recv_exact(sock, n, fds)
        try:
            msg = untrusted_json(body)
        except ValueError as exc:
            raise ProtocolError(f"message {exc}") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            raise ProtocolError("message must be a JSON object with a string 'type'")
        return msg, fds
    except BaseException:
        close_fds(fds)
        raise


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer, from the kernel (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


# --- message validation --------------------------------------------------------------

NUMBER = (int, float)
MAYBE_STR = (str, type(None))
MAYBE_INT = (int, type(None))
MAYBE_NUMBER = (int, float, type(None))

# Each message type: the fields it must have, and their types.
SCHEMAS: dict[str, dict[str, tuple[type, ...]]] = {
    "hello": {"job": (str,), "directory": (str,), "settings": (dict,), "pid": (int,), "step": (int,)},
    "heartbeat": {"step": (int,)},
    "save": {"id": (int,), "step": (int,), "trigger": (str,), "rule": (str,), "filename": (str,), "length": (int,)},
    "committed": {"step": (int,), "path": (str,), "trigger": (str,)},
    "end": {"step": (int,)},
    "skipped": {"step": (int,), "reason": (str,)},
    "status": {},
    "list": {},
    "latest": {},
    "pin": {"path": (str,)},
    "unpin": {"path": (str,)},
    "gc": {},
    "memory": {"job": (str,), "directory": (str,)},
}

# The fields it may have, and their types when present. Fields named nowhere are ignored (a
# newer hook may send more); a named one of the wrong type is refused like a missing one.
OPTIONAL: dict[str, dict[str, tuple[type, ...]]] = {
    "hello": {
        "version": (str,),
        "template": MAYBE_STR,
        "rank": (int,),
        "world_size": (int,),
        "sharded": (bool,),
        "state_bytes": MAYBE_INT,
    },
    "heartbeat": {"epoch": MAYBE_NUMBER},
    "save": {"epoch": MAYBE_NUMBER, "stall": NUMBER, "cost": NUMBER, "memory_only": (bool,)},
    "committed": {"ok": (bool,), "reason": (str,), "error": MAYBE_STR, "stall": NUMBER},
    "list": {"job": MAYBE_STR},
    "latest": {"job": MAYBE_STR},
    "gc": {"job": MAYBE_STR, "directory": MAYBE_STR, "dry_run": (bool,)},
}


def validate(msg: dict[str, Any]) -> dict[str, Any]:
    """Check the type, the required fields and the optional ones present; bools are not numbers
    here, and a count is never negative."""
    kind = msg["type"]
    if kind not in SCHEMAS:
        raise ProtocolError(f"unknown message type {kind!r}")
    for key, types in SCHEMAS[kind].items():
        _check(kind, key, msg.get(key), types)
    for key, types in OPTIONAL.get(kind, {}).items():
        if key in msg:
            _check(kind, key, msg[key], types)
    for key in ("step", "length", "id", "pid", "rank", "world_size", "state_bytes", "stall", "cost"):
        if isinstance(msg.get(key), NUMBER) and not isinstance(msg[key], bool) and msg[key] < 0:
            raise ProtocolError(f"{kind}: field {key!r} must not be negative")
    return msg


def _check(kind: str, key: str, value: Any, types: tuple[type, ...]) -> None:
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise ProtocolError(f"{kind}: field {key!r} must be {' or '.join(_name(t) for t in types)}")


def _name(t: type) -> str:
    return "null" if t is type(None) else t.__name__


def snapshot_memfd(name: str) -> int:
    """A memfd a daemon will accept as a snapshot: sealed against shrinking (it may grow).

    The daemon maps and hashes what it receives; a client that could shrink the file
    under it would kill it with SIGBUS, so ``F_SEAL_SHRINK`` is part of the protocol.
    """
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


SLACK = 1 << 20  # bytes of a snapshot that may be unbacked (page rounding, alignment gaps)


def snapshot_problem(fd: int, length: int) -> str:
    """Why ``fd`` cannot be taken as a snapshot of ``length`` bytes ("" when it can).

    Only shared-memory files sealed against shrinking (no SIGBUS while hashing) whose
    pages are really there (a sparse memfd would make the daemon allocate, for a few
    bytes of the client's memory, as much as it claims) are accepted.
    """
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return "save must carry a memfd (memfd_create), not another kind of file"
    if not seals & fcntl.F_SEAL_SHRINK:
        return "the snapshot memfd must be sealed against shrinking (F_ADD_SEALS F_SEAL_SHRINK)"
    st = os.fstat(fd)
    if st.st_size < length:
        return "the memfd is shorter than the stated length"
    if st.st_blocks * 512 + SLACK < length:
        return f"the memfd is sparse: {st.st_blocks * 512} of the stated {length} bytes are backed"
    return ""

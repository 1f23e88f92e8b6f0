"""Who is at the other end of a TCP connection from this host: the owner's uid, from the
kernel (``sock_diag``, what ``ss -e`` reads), so that local users who all connect from
``127.0.0.1`` are told apart.

The client's own socket is looked up by its exact address pair; a peer on another host (or in
another network namespace) has none here, and the caller falls back to its address.
"""

from __future__ import annotations

import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
NO_COOKIE = 0xFFFFFFFF
_HEADER = struct.Struct("=IHHII")  # nlmsghdr
_UID_AT = 4 + 48 + 12  # inet_diag_msg: family/state/timer/retrans, sockid, expires/rqueue/wqueue, then uid


def local_uid(conn: socket.socket) -> int | None:
    """The uid owning the client end of ``conn`` (an accepted TCP connection) when that end is a
    socket of this host's network namespace; None otherwise, or when the kernel cannot say."""
    try:
        ours, theirs = conn.getsockname(), conn.getpeername()
        request = _request(conn.family, theirs, ours)
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(1.0)
            nl.sendto(request, (0, 0))
            reply = nl.recv(4096)
    except (OSError, ValueError):
        return None
    if len(reply) < _HEADER.size + _UID_AT + 4:
        return None
    kind = _HEADER.unpack_from(reply)[1]
    if kind != SOCK_DIAG_BY_FAMILY:  # NLMSG_ERROR: no such socket here (a remote peer)
        return None
    return int(struct.unpack_from("=I", reply, _HEADER.size + _UID_AT)[0])


def _request(family: int, local: tuple, remote: tuple) -> bytes:  # type: ignore[type-arg]
    """``SOCK_DIAG_BY_FAMILY`` for the TCP socket whose own address is ``local`` and whose
    peer is ``remote`` (an ``inet_diag_req_v2`` with an exact ``inet_diag_sockid``)."""
    sockid = (
        struct.pack("!HH", local[1], remote[1])
        + _address(family, local[0])
        + _address(family, remote[0])
        + struct.pack("=III", 0, NO_COOKIE, NO_COOKIE)
    )
    body = struct.pack("=BBBxI", family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF) + sockid
    return _HEADER.pack(_HEADER.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0) + body


def _address(family: int, host: str) -> bytes:
    raw = socket.inet_pton(family, host.split("%", 1)[0])
    return raw + bytes(16 - len(raw))

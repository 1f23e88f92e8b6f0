"""Logging for the daemon: plain lines on a terminal, priorities and fields under journald.

Under systemd the daemon's stderr is a journald stream, which stores every line at the
unit's default priority unless the line says otherwise: ``journalctl -u ckptd -p err``
then finds nothing, and on-call cannot ask for the errors alone. So, when ``$JOURNAL_STREAM``
names our stderr (systemd sets it to the stream's ``device:inode``), each record is sent
to journald's native socket as fields (``MESSAGE``, ``PRIORITY``, ``SYSLOG_IDENTIFIER``,
``CKPTD_LOGGER``, ``CODE_FILE``/``CODE_LINE``/``CODE_FUNC``) and, should that socket refuse,
written to stderr with the ``<N>`` priority prefix journald reads from a stream. Anywhere
else, the usual timestamped lines. ``$CKPTD_JOURNAL_SOCKET`` names another journal socket
(containers that bind-mount it elsewhere).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys

__all__ = ["configure", "under_journald"]

JOURNAL_SOCKET = "/run/systemd/journal/socket"
# syslog(3) priorities for Python's levels: what `journalctl -p` filters on
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def under_journald(environ: dict[str, str] | None = None) -> bool:
    """Whether stderr is the journald stream systemd connected (``JOURNAL_STREAM`` = its dev:ino)."""
    stream = (environ if environ is not None else os.environ).get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def priority(levelno: int) -> int:
    return next((p for level, p in sorted(_PRIORITY.items(), reverse=True) if levelno >= level), 7)


class JournalHandler(logging.Handler):
    """Each record as one datagram of journald's native protocol; ``<N>``-prefixed stderr if it fails."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.fallback = logging.StreamHandler(sys.stderr)
        self.fallback.setFormatter(logging.Formatter("<%(priority)d>%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        level = priority(record.levelno)
        record.__dict__["priority"] = level  # for the fallback's "<N>" prefix
        message = self.format(record)
        fields = {
            "MESSAGE": message,
            "PRIORITY": str(level),
            "SYSLOG_IDENTIFIER": "ckptd",
            "CKPTD_LOGGER": record.name,
            "CODE_FILE": record.pathname,
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": record.funcName,
        }
        try:
            self.sock.sendto(b"".join(_field(k, v) for k, v in fields.items()), self.path)
        except OSError:
            self.fallback.emit(record)

    def close(self) -> None:
        self.sock.close()
        super().close()


def _field(key: str, value: str) -> bytes:
    """One field: ``KEY=value\\n``, or, for a value with a newline (a traceback), the binary form."""
    data = value.encode("utf-8", "replace")
    if b"\n" not in data:
        return key.encode() + b"=" + data + b"\n"
    return key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"


def configure(level: str) -> None:
    """The daemon's logging: journald fields under systemd, timestamped lines elsewhere."""
    if under_journald():
        handler: logging.Handler = JournalHandler(os.environ.get("CKPTD_JOURNAL_SOCKET", JOURNAL_SOCKET))
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.basicConfig(level=level, handlers=[handler])
    else:
        logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("apscheduler").setLevel(logging.ERROR)

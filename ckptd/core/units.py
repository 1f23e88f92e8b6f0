"""Durations ("90s", "30m", "2h") and sizes ("500MiB", "2TB", "10%") as users write them."""

from __future__ import annotations

import math
import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*((?:[kmgtp]i?b?)|b)?\s*$", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_duration(value: str | int | float) -> float:
    """Seconds from a number (seconds) or a string with a unit: ms, s, m, h, d, w."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like '90s', '30m' or '2h', got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise ValueError(f"a duration must be finite, got {value!r}")
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise ValueError(f"expected a duration like '90s', '30m' or '2h', got {value!r}")
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    return seconds


def parse_size(value: str | int) -> int:
    """Bytes from a number or "500MiB" (binary), "2TB"/"2GB" (decimal), "10k"."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like '500MiB' or '2TB', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value}")
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"expected a size like '500MiB' or '2TB', got {value!r}")
    unit = (m.group(2) or "").lower()
    base = 1024 if unit.endswith("ib") or unit in ("ki", "mi", "gi", "ti", "pi") else 1000
    return int(float(m.group(1)) * base ** _SIZE_POWERS[unit[:1] if unit[:1] in "kmgtp" else ""])


def parse_size_or_percent(value: str | int) -> int | float:
    """Bytes (int), or a fraction of the filesystem (float in (0, 1)) from "10%"."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            pct = float(value.strip()[:-1])
        except ValueError:
            raise ValueError(f"expected a percentage like '10%', got {value!r}") from None
        if not 0 <= pct < 100:
            raise ValueError(f"a percentage must be between 0 and 100, got {value!r}")
        return pct / 100.0
    return parse_size(value)


def format_bytes(n: int) -> str:
    """Human-readable binary size for tables and logs."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def format_duration(seconds: float) -> str:
    """Short duration for tables: 45s, 12m, 3.5h."""
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def parse_remote(value: object) -> str:
    """A remote tier URL: ``s3://bucket[/prefix]`` or ``file:///absolute/path``."""
    from urllib.parse import urlparse

    u = urlparse(value) if isinstance(value, str) else None
    if u is not None and (
        (u.scheme == "s3" and u.netloc) or (u.scheme == "file" and u.path.startswith("/") and not u.netloc)
    ):
        return str(value).rstrip("/")
    raise ValueError(f"expected a URL like s3://bucket/prefix or file:///mnt/ckpt, got {value!r}")


def parse_listen(value: str) -> tuple[str, int]:
    """(host, port) from "host:port", "[v6addr]:port" or ":port"; the error says what is expected."""
    text = str(value).strip()
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"expected host:port (e.g. 127.0.0.1:9733 or [::1]:9733), got {value!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be between 0 and 65535, got {port} in {value!r}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"an IPv6 address is written in brackets ([::1]:9733), got {value!r}")
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets ([{host}]:{port}), got {value!r}")
    return host or "127.0.0.1", port

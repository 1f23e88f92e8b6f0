"""Where a job's objects live on its remote tier: a key prefix naming its owner and its directory.

``u<uid>/<directory tag>/<job>/NAME`` (a sharded unit: ``.../<job>/UNIT/rankR-of-W...``). The
directory tag is the job directory's real path made key-safe (its last 48 characters) and a
SHA-256 prefix of the whole path: two jobs of one name, of two users or in two directories,
never share a prefix, so neither lists, fetches nor prunes what the other wrote. A new host
resuming the same job (the same user, the same directory) finds the same prefix.

Version 1 of the remote tier keyed objects by the job name alone (``<job>/NAME``). Such a
prefix names no owner, so nothing reads it implicitly: the daemon never lists or prunes it
and ``resume()`` never fetches from it; a user reads it with an explicit URL
(``ckptd list --remote URL/JOB``, ``ckptd fetch URL/JOB DIR``), with their own credentials.
"""

from __future__ import annotations

import hashlib
import os
import re

from ckptd.core.settings import Settings

__all__ = ["job_prefix", "owner_of", "prefix_in", "PREFIX_RE"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
TAIL = 48
PREFIX_RE = re.compile(r"^u(\d+)/([A-Za-z0-9._-]+-[0-9a-f]{16})/([^/]+)$")


def directory_tag(directory: str) -> str:
    """The job directory as one key component: readable tail, then a hash of the whole path."""
    digest = hashlib.sha256(directory.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    tail = _UNSAFE.sub("_", directory.strip("/"))[-TAIL:].lstrip(".") or "root"
    return f"{tail}-{digest}"


def job_prefix(job: str, directory: str, uid: int) -> str:
    """The key prefix (no trailing slash) of the job ``job`` of ``uid`` in ``directory`` (a real path)."""
    if not job or "/" in job or job in (".", ".."):
        raise ValueError(f"invalid job name {job!r}")
    return f"u{int(uid)}/{directory_tag(directory)}/{job}"


def owner_of(prefix: str) -> int | None:
    """The uid a prefix names (None: a version-1 prefix, the job name alone)."""
    m = PREFIX_RE.match(prefix)
    return int(m.group(1)) if m else None


def prefix_in(settings: Settings, job: str, directory: str) -> str:
    """A job's prefix as its settings carry it (``remote_prefix``: the daemon sets it at hello
    from the client's uid; no client may send it), else this process's own (the hook, the CLI)."""
    given = settings.remote_prefix
    return str(given) if given else job_prefix(job, os.path.realpath(directory), os.getuid())

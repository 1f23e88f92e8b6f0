"""Real unix users for the trust-boundary tests (docs/security.md).

A test that plays a hostile local user needs a real one: the kernel, not ckptd, must be what
says no. ``users`` (a fixture in ``tests/conftest.py``) makes fresh users with ``useradd``,
each with its own primary group, and removes them after the test; ``as_user`` runs a
command as one of them (uid, gid and supplementary groups, as a login would).
Both need root; tests that use them are skipped, visibly, without it.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from dataclasses import dataclass, field
from typing import Sequence

import pytest

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create real users")


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...] = field(default_factory=tuple)

    def preexec(self) -> None:
        """For ``subprocess``'s ``preexec_fn``: become this user (groups first, uid last)."""
        os.setgroups([self.gid, *self.groups])
        os.setgid(self.gid)
        os.setuid(self.uid)

    def env(self, base: dict[str, str]) -> dict[str, str]:
        return {**base, "HOME": "/nonexistent", "USER": self.name, "LOGNAME": self.name}


class Users:
    """Makes real users (``useradd``) and groups (``groupadd``); removes them all in ``close``."""

    def __init__(self) -> None:
        self._users: list[str] = []
        self._groups: list[str] = []

    def group(self, prefix: str = "ckg") -> tuple[str, int]:
        name = f"{prefix}{secrets.token_hex(3)}"
        subprocess.run(["groupadd", name], check=True, capture_output=True)
        self._groups.append(name)
        return name, int(
            subprocess.run(["getent", "group", name], check=True, capture_output=True, text=True).stdout.split(":")[2]
        )

    def user(self, prefix: str = "cku", groups: Sequence[str] = ()) -> User:
        name = f"{prefix}{secrets.token_hex(3)}"
        cmd = [
            "useradd",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "--user-group",
            name,
        ]
        if groups:
            cmd[1:1] = ["--groups", ",".join(groups)]
        subprocess.run(cmd, check=True, capture_output=True)
        self._users.append(name)
        ids = subprocess.run(["id", "-u", name], check=True, capture_output=True, text=True).stdout
        gid = subprocess.run(["id", "-g", name], check=True, capture_output=True, text=True).stdout
        extra = subprocess.run(["id", "-G", name], check=True, capture_output=True, text=True).stdout.split()
        g = int(gid)
        return User(name, int(ids), g, tuple(int(x) for x in extra if int(x) != g))

    def close(self) -> None:
        for name in reversed(self._users):
            subprocess.run(["userdel", name], capture_output=True)
        for name in reversed(self._groups):
            subprocess.run(["groupdel", name], capture_output=True)

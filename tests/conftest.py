"""Shared fixtures. The autouse ``no_leaks`` fixture fails any test that leaves a
thread or a child process behind: a daemon that leaks is a daemon that dies in
production (the same idea as watchdog's conftest)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def _children() -> set[int]:
    me = str(os.getpid())
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            out.add(int(entry))
    return out


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    threads_before = set(threading.enumerate())
    children_before = _children()
    yield
    deadline = time.monotonic() + 5.0
    while True:
        threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        children = _children() - children_before
        if not threads and not children:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for pid in children:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    pytest.fail(f"test leaked threads {[t.name for t in threads]} and child processes {sorted(children)}")


def run_py(*args: str, timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run a Python script of the project in a subprocess, capturing output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([PYTHON, *args], capture_output=True, text=True, timeout=timeout, env=env, **kw)  # type: ignore[call-overload]


def ckptd_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_py("-m", "ckptd.cli", *args, timeout=timeout)

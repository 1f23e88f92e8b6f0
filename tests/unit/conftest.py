"""The unit tier: ckptd's logic with no torch (where the code under test has none), no
subprocess, no daemon and no root; the whole tier runs in well under a minute, first in
``make test``. The two fixtures below make those rules fail loudly instead of eroding."""

from __future__ import annotations

import subprocess
import sys
from typing import Any, Iterator

import pytest


@pytest.fixture(autouse=True)
def no_subprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    """A unit test that starts a process belongs with the real-process tests in tests/."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"the unit tier starts no process (tried {args[:1]}); move this test out of tests/unit/")

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)


@pytest.fixture(autouse=True)
def no_torch() -> Iterator[None]:
    """torch costs seconds to import; the unit tier's code needs none (skipped where another
    tier in the same session imported it first)."""
    before = "torch" in sys.modules
    yield
    if not before and "torch" in sys.modules:
        raise AssertionError(
            "this unit test imported torch; move it to tests/ or keep torch out of the code under test"
        )

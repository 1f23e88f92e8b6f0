"""The README's first command must keep working."""

from __future__ import annotations

import re

import pytest

from tests.conftest import ckptd_cli


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path) -> None:  # type: ignore[no-untyped-def]
    r = ckptd_cli("demo", "--dir", str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "bit-identical" in r.stdout
    assert "the hook handed its saves to the daemon" in r.stdout
    assert re.search(
        r'ckptd_saves_total\{directory="[^"]+",outcome="ok",training_job="toy",trigger="final"(,user="[^"]+")?\} 1\.0',
        r.stdout,
    ), r.stdout
    assert "daemon stopped (exit 0)" in r.stdout

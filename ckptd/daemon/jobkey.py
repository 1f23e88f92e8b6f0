"""What identifies a job: its name and its directory (SPEC §3), never the name alone.

Two runs named alike in different directories are two jobs in ``ckptd status``, the
catalogue, the metrics (``training_job`` and ``directory`` labels) and missed-save
accounting. Watch mode's jobs are keyed by their watched tree's root.
"""

from __future__ import annotations

from typing import NamedTuple


class JobKey(NamedTuple):
    name: str
    directory: str

    def __str__(self) -> str:
        return f"{self.name} ({self.directory})"

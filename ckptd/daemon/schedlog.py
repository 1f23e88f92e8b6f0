"""APScheduler's "skipped: maximum number of running instances reached", said once in a while.

The daemon's jobs run with ``max_instances=1`` and ``coalesce=True``: when a tick (a watched
tree being verified under load, a rescan of a big tree) is still running at its next time, that
run is skipped and the next one catches up, which is what we want. APScheduler warns at every
such skip, once a second for the tick, and under load the watch log was nothing else. This
filter lets one line per job through every ``every`` seconds, saying how many runs were skipped
since the last one.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

LOGGER = "apscheduler.scheduler"
_SKIPPED = "maximum number of running"


class SkippedRuns(logging.Filter):
    def __init__(self, every: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.every, self.clock = every, clock
        self.said: dict[str, float] = {}
        self.skipped: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if _SKIPPED not in str(record.msg):
            return True
        job = record.args[0] if isinstance(record.args, tuple) and record.args else None
        name = str(getattr(job, "id", None) or job)
        now, count = self.clock(), self.skipped.get(name, 0) + 1
        last = self.said.get(name)
        if last is not None and now - last < self.every:
            self.skipped[name] = count
            return False
        self.said[name], self.skipped[name] = now, 0
        record.msg = (
            "job %s was still running at its next time: %d run(s) skipped since the last such line "
            "(a busy host or a slow tree; the next run catches up; said at most every %.0fs)"
        )
        record.args = (name, count, self.every)
        return True


def install(every: float = 300.0) -> SkippedRuns:
    """On APScheduler's logger, once per process (an in-process daemon may start several times)."""
    logger = logging.getLogger(LOGGER)
    for f in logger.filters:
        if isinstance(f, SkippedRuns):
            return f
    f = SkippedRuns(every)
    logger.addFilter(f)
    return f

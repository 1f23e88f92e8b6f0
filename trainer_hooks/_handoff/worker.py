"""Embedded mode: the persist pipeline in a background thread of the trainer.

Used when no daemon answers. The trainer thread stages a snapshot into shared
memory and hands it here; this thread hashes, writes, fsyncs, verifies and renames
it (``ckptd.disk.persist``), then applies retention. One snapshot is in flight at a time
because the staging buffer is reused: ``wait_idle`` is the backpressure point.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ckptd.disk.persist import Persisted, PersistError
from ckptd.save.pipeline import failure

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagedSave:
    """A snapshot staged in the reused buffer, as the persist side needs it; the buffer is not
    touched again until this save's outcome is reported (``wait_idle``), so the fd is enough."""

    fd: int
    length: int
    directory: str
    filename: str
    step: int
    trigger: str
    stall: float = 0.0  # seconds the trainer spent staging it
    submitted: float = field(default_factory=time.monotonic)  # handed over: persist time counts from here


Done = Callable[[StagedSave, "Persisted | None", "PersistError | None"], None]
Pipeline = Callable[[StagedSave], Persisted]


class Worker:
    """One thread, one save at a time: ``pipeline`` persists, ``on_done`` reports."""

    def __init__(self, pipeline: Pipeline, on_done: Done, name: str = "ckptd-persist") -> None:
        self._pipeline = pipeline
        self._on_done = on_done
        self._queue: queue.Queue[StagedSave | None] = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return not self._idle.is_set()

    def submit(self, staged: StagedSave) -> None:
        self._idle.clear()
        self._queue.put(staged)

    def wait_idle(self, timeout: float | None = None) -> bool:
        return self._idle.wait(timeout)

    def close(self, timeout: float | None = None) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (staged := self._queue.get()) is not None:
            try:
                result = self._pipeline(staged)
                self._finish(staged, result, None)
            except Exception as exc:  # never let the thread die: training must go on
                self._finish(staged, None, failure(exc, staged.step))
            finally:
                self._idle.set()

    def _finish(self, staged: StagedSave, result: Persisted | None, error: PersistError | None) -> None:
        try:
            self._on_done(staged, result, error)
        except Exception:
            log.exception("ckptd: error after persisting step %d", staged.step)

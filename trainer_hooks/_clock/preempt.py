"""Preemption: SIGTERM, SIGINT or SIGUSR1 become one checkpoint, then the original handler.

In order: the signal arrives (``signum`` set, the Checkpointer's attention flag raised);
the next ``step()`` saves with trigger ``preempt``, or, if the trainer is stuck between
steps, the save happens on a timer after ``grace`` seconds; ``finish`` waits until that
save is verified and re-sends the signal to the process (``signum`` negative while it is
in flight), and this time the handler passes it to the handler that was there before
(Python's default or the trainer's own), so the process ends as it would have.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def uncaught_exception() -> BaseException | None:
    """The exception that is ending the interpreter, seen from an ``atexit`` handler (None: a normal end).

    CPython records an exception that reached the top level in ``sys.last_value`` before it runs the
    ``atexit`` handlers, whoever's ``sys.excepthook`` prints it (a ``SystemExit`` is not recorded: ``sys.exit``
    is an ordinary end). Such an exit is not the end of the run (SPEC §3): its state is never saved as final.
    """
    return getattr(sys, "last_value", None)


class Preemption:
    def __init__(
        self, grace: float, raised: Callable[[], None], between_steps: Callable[[int], None], dying: Callable[[], None]
    ) -> None:
        self.grace = grace
        self.signum: int | None = None  # > 0: a save is due for it; < 0: re-delivered to the original handler
        self._raised, self._between_steps, self._dying = raised, between_steps, dying
        self._handlers: dict[int, Any] = {}
        self._timer: threading.Timer | None = None

    @property
    def pending(self) -> bool:
        return self.signum is not None

    def install(self, signals: tuple[int, ...]) -> None:
        """Main thread only (Python's rule): from another thread the trainer keeps its handlers."""
        if threading.current_thread() is threading.main_thread():
            self._handlers = {s: signal.signal(s, self._handle) for s in signals}

    def restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for s, h in self._handlers.items():
                signal.signal(s, h)
        self._handlers = {}

    def finish(self, wait: Callable[[], object]) -> None:
        """After the preemption save was handed over: wait for it, then the original handler."""
        signum = self.signum
        if signum is None or signum < 0:
            return
        if self._timer is not None:
            self._timer.cancel()
        wait()
        self.redeliver(signum)

    def redeliver(self, signum: int) -> None:
        self.signum = -signum
        os.kill(os.getpid(), signum)  # runs our handler again, in the main thread, which chains

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum == -signum:  # our own re-delivery after the preemption save
            self._chain(signum, frame)
            return
        log.warning("ckptd: signal %d: preemption save at the next step (or in %.0fs)", signum, self.grace)
        self.signum = signum
        self._raised()
        self._arm(signum)

    def rearm(self) -> None:
        """Look again in one more grace period: a save is under way, and the timer must not end the
        process in its middle (a multi-GB DeepSpeed save takes longer than the grace)."""
        if self.signum is not None and self.signum > 0:
            self._arm(self.signum)

    def _arm(self, signum: int) -> None:
        self._timer = threading.Timer(self.grace, self._expired, args=[signum])
        self._timer.daemon = True
        self._timer.start()

    def _expired(self, signum: int) -> None:
        if self.signum == signum:
            self._between_steps(signum)

    def _chain(self, signum: int, frame: Any) -> None:
        self.signum = None
        original = self._handlers.get(signum, signal.SIG_DFL)
        if callable(original):
            original(signum, frame)
        elif original == signal.SIG_DFL:
            self._dying()  # the process is about to die: never hang it on a thread
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

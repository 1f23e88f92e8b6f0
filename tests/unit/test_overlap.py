"""``snapshot="overlap"``: a failure on the copy thread is a failed save, never an exception in step()."""

from __future__ import annotations

from typing import Callable

from trainer_hooks._snapshot.overlap import Overlap


def test_a_failure_on_the_copy_thread_is_a_failed_save_not_an_exception() -> None:
    failures: list[tuple[int, str]] = []
    handed: list[int] = []
    overlap = Overlap(None, lambda step, exc: failures.append((step, str(exc))))

    def broken() -> Callable[[], None]:
        raise OSError("no memory for the snapshot")

    overlap.start(broken, 7)
    assert overlap.wait(10) and failures == [(7, "no memory for the snapshot")]
    overlap.start(lambda: lambda: handed.append(8), 8)  # the thread lives on for the next save
    assert overlap.wait(10) and handed == [8]
    overlap.close()

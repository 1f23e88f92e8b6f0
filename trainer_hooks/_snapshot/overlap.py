"""``snapshot="overlap"`` (SPEC §14): the copy of the parameters and optimizer state into the
snapshot runs while the next forward and backward run, and is done before the optimizer next
writes them.

Lifecycle of one overlapped save, in order:

1. ``step()`` reads what must be read at the saving step (``Snapshotter.take``: the state's
   structure, its tensors, the progress) and copies at once, into memory of its own, the tensors
   the next forward may write (buffers such as BatchNorm's running statistics, RNG states,
   tensors in ``extra``: small; ``Snapshotter.hold``). The parameters and the optimizer's state
   are left as they are.
2. On CPU, ckptd's copy thread (one per Checkpointer, started at the first overlapped save)
   composes the header (JSON, the references to unchanged frozen tensors), lays the image out
   and copies every tensor into the staging buffer (torch's copy releases the GIL: training goes
   on). On CUDA the header is composed in ``step()`` and the copies are already enqueued on
   ckptd's stream, ordered after the trainer's, with an event recorded after them; the thread
   waits for the events. ``step()`` returns.
3. Before the optimizer's next ``step()`` (a pre-hook on it) writes those tensors in place: on
   CPU the hook waits for the copy; on CUDA it makes the trainer's current stream wait for the
   event, on the GPU, and the host goes on. (``zero_grad`` writes only gradients, which a
   snapshot does not hold.) So the checkpoint holds the state at the saving ``step()``, bit for bit.
4. Once every byte is in the buffer, the thread hands the snapshot over as any save (the daemon,
   or the embedded worker): the handoff happens there, not in ``step()``. A failure on the thread
   is a failed save (counted, logged), never an exception in training.

The state must be written only through the optimizer between ``step()`` and the next optimizer
step: a parameter written in place by other code in that window (an EMA update, a clamp) is not
waited for. ``wait()`` and ``close()`` wait for the copy and the handoff.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable, Iterable

import torch

from trainer_hooks._snapshot.shared import Identity, identity

log = logging.getLogger(__name__)


def written_by_optimizer(model: Any, optimizer: Any) -> set[Identity]:
    """What only the optimizer writes between two steps: parameters and its per-parameter state."""
    params: Iterable[torch.Tensor] = model.parameters() if hasattr(model, "parameters") else ()
    out = {identity(p) for p in params if p.numel()}
    if optimizer is not None:
        for state in optimizer.state.values():
            out |= {identity(t) for t in state.values() if isinstance(t, torch.Tensor) and t.numel()}
    return out


Copy = Callable[[], Callable[[], None]]  # fills the buffer; returns the handoff


class Overlap:
    def __init__(self, optimizer: Any, on_error: Callable[[int, Exception], None]) -> None:
        self._copied = threading.Event()  # every byte is in the buffer: the optimizer may write
        self._done = threading.Event()  # and the snapshot was handed over
        self._copied.set()
        self._done.set()
        self._events: list[Any] = []  # (device, event) of CUDA copies in flight
        self._cpu = False  # CPU copies in flight (on the thread)
        self._on_error = on_error
        self._tasks: queue.SimpleQueue[tuple[int, Copy] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None  # started at the first overlapped save
        self._hook = optimizer.register_step_pre_hook(self._before_optimizer_step) if optimizer is not None else None

    @property
    def idle(self) -> bool:
        return self._done.is_set()

    def start(self, copy: Copy, step: int, events: Iterable[Any] = (), cpu: bool = True) -> None:
        """Run ``copy`` (of the save at ``step``) on the copy thread, then the handoff it returns. ``events``:
        CUDA copies already enqueued (the optimizer's stream waits for them); ``cpu``: the thread copies."""
        self._copied.clear()
        self._done.clear()
        self._events, self._cpu = list(events), cpu
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ckptd-overlap", daemon=True)
            self._thread.start()
        self._tasks.put((step, copy))

    def _run(self) -> None:
        while (task := self._tasks.get()) is not None:
            step, copy = task
            handoff = None
            try:
                handoff = copy()
            except Exception as exc:  # never lose training to a save
                self._on_error(step, exc)
            finally:
                self._copied.set()
            try:
                if handoff is not None:
                    handoff()
            except Exception:  # the handoff reports its own failures
                log.exception("ckptd: an overlapped snapshot could not be handed over")
            finally:
                self._done.set()

    def _before_optimizer_step(self, *args: Any) -> None:
        """The optimizer is about to write parameters and state: not before they are copied."""
        if self._copied.is_set():
            return
        for device, event in self._events:  # CUDA: ordered on the GPU; the host goes on
            torch.cuda.current_stream(device).wait_event(event)
        if self._cpu:
            self._copied.wait()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def close(self) -> None:
        self._done.wait()
        if self._thread is not None:
            self._tasks.put(None)
            self._thread.join()
            self._thread = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

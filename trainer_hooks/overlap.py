"""``snapshot="overlap"`` (SPEC §14): the copy of the parameters and optimizer state into the
snapshot runs while the next forward and backward run, and is done before the optimizer next
writes them.

Lifecycle of one overlapped save, in order:

1. ``step()`` composes the snapshot as always and stages, synchronously, the header and every
   tensor that the next forward may write (buffers such as BatchNorm's running statistics, RNG
   states, ``extra``: small); the parameters and the optimizer's state are left (``later``).
2. On CPU a thread of ckptd's own copies them (torch's copy releases the GIL: training goes on
   on the other cores); on CUDA the copies are already enqueued on ckptd's stream, ordered after
   the trainer's, with an event recorded after them. ``step()`` returns.
3. Before the optimizer's next ``step()`` (a pre-hook on it) writes those tensors in place: on
   CPU the hook waits for the thread; on CUDA it makes the trainer's current stream wait for the
   event, on the GPU, and the host goes on. (``zero_grad`` writes only gradients, which a
   snapshot does not hold.) So the checkpoint holds the state at the saving ``step()``, bit for bit.
4. Once every byte is in the buffer, the thread hands the snapshot over as any save (the daemon,
   or the embedded worker): the handoff happens there, not in ``step()``.

The state must be written only through the optimizer between ``step()`` and the next optimizer
step: a parameter written in place by other code in that window (an EMA update, a clamp) is not
waited for. ``wait()`` and ``close()`` wait for the copy and the handoff.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Iterable

import torch

from trainer_hooks.shared import Identity, identity
from trainer_hooks.staging import Pending

log = logging.getLogger("ckptd.hook")


def written_by_optimizer(model: Any, optimizer: Any) -> set[Identity]:
    """What only the optimizer writes between two steps: parameters and its per-parameter state."""
    params: Iterable[torch.Tensor] = model.parameters() if hasattr(model, "parameters") else ()
    out = {identity(p) for p in params if p.numel()}
    if optimizer is not None:
        for state in optimizer.state.values():
            out |= {identity(t) for t in state.values() if isinstance(t, torch.Tensor) and t.numel()}
    return out


class Overlap:
    def __init__(self, optimizer: Any) -> None:
        self._done = threading.Event()
        self._done.set()
        self._events: list[Any] = []  # (device, event) of CUDA copies in flight
        self._cpu = False  # CPU copies in flight (on the thread)
        self._thread: threading.Thread | None = None
        self._hook = optimizer.register_step_pre_hook(self._before_optimizer_step) if optimizer is not None else None

    @property
    def idle(self) -> bool:
        return self._done.is_set()

    def start(self, pending: Pending, handoff: Callable[[], None]) -> None:
        """Finish ``pending`` in the background, then ``handoff`` the snapshot."""
        self._done.clear()
        self._events, self._cpu = list(pending.events), bool(pending.cpu)
        self._thread = threading.Thread(target=self._run, args=(pending, handoff), name="ckptd-overlap", daemon=True)
        self._thread.start()

    def _run(self, pending: Pending, handoff: Callable[[], None]) -> None:
        try:
            pending.finish()
            handoff()
        except Exception:  # never lose training to a save: the handoff reports its own failures
            log.exception("ckptd: an overlapped snapshot could not be completed")
        finally:
            self._done.set()

    def _before_optimizer_step(self, *args: Any) -> None:
        """The optimizer is about to write parameters and state: not before they are copied."""
        if self._done.is_set():
            return
        for device, event in self._events:  # CUDA: ordered on the GPU; the host goes on
            torch.cuda.current_stream(device).wait_event(event)
        if self._cpu:
            self._done.wait()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def close(self) -> None:
        self._done.wait()
        if self._thread is not None:
            self._thread.join()
        if self._hook is not None:
            self._hook.remove()

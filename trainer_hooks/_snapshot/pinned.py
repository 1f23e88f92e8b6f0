"""CUDA state into the snapshot at the speed of the host link (SPEC §10, ``snapshot="host"``).

Copied into ordinary (pageable) memory, a CUDA tensor goes through the driver's bounce
buffer at a quarter of the link's speed (measured on an H200: 4.4x the time of a copy into
page-locked memory). The staging buffer is a memfd mapping, which CUDA did not allocate, but
CUDA can page-lock it all the same (``cudaHostRegister``), after which a device-to-host copy
into it is one DMA at the link's speed. Registering costs about 0.1 s per GiB, so it is done
where the buffer is reserved, in the background; it is undone before the mapping goes.

The copies run on a stream of ckptd's own per device, ordered after all the trainer enqueued
on its current stream before the saving ``step()`` (``wait_stream``), so they capture the
state of that step; ``step()`` waits for them before the snapshot is handed over, so no later
kernel of the trainer can change what was captured. Nothing here runs without CUDA.
"""

from __future__ import annotations

import logging
from typing import Iterable, Sequence

import torch

log = logging.getLogger(__name__)
PORTABLE = 1  # cudaHostRegisterPortable: pinned for every device's context, not only the current one


def holds_cuda(tensors: Iterable[torch.Tensor]) -> bool:
    return any(t.is_cuda for t in tensors)


def register(ptr: int, size: int) -> bool:
    """Page-lock ``size`` bytes at ``ptr`` for CUDA; False (and said) when it refuses: the copies
    then run at pageable speed, and nothing else changes."""
    try:
        err = int(torch.cuda.cudart().cudaHostRegister(ptr, size, PORTABLE))  # type: ignore[no-untyped-call]
    except Exception as exc:  # no runtime to ask (a CPU build, a broken driver): never a failed save
        log.warning("ckptd: could not page-lock the snapshot buffer: %s", exc)
        return False
    if err:
        log.warning(
            "ckptd: could not page-lock the %d-byte snapshot buffer (cudaError %d); CUDA tensors are "
            "copied at pageable speed",
            size,
            err,
        )
    return not err


def unregister(ptr: int) -> None:
    try:
        err = int(torch.cuda.cudart().cudaHostUnregister(ptr))  # type: ignore[no-untyped-call]
    except Exception as exc:
        log.warning("ckptd: cudaHostUnregister of the snapshot buffer failed: %s", exc)
        return
    if err:
        log.warning("ckptd: cudaHostUnregister of the snapshot buffer failed (cudaError %d)", err)


class DeviceCopies:
    """Device-to-host copies on ckptd's own streams, one per device, made once and reused."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def copy(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """``dst.copy_(src)`` for each (host dst, CUDA src), all in flight at once, done on return."""
        for _, event in self.enqueue(pairs):
            event.synchronize()

    def enqueue(
        self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]
    ) -> list[tuple[torch.device, torch.cuda.Event]]:
        """The same copies, enqueued and not waited for (``snapshot="overlap"``): one event per
        device, recorded after them, which the trainer's stream waits on before the optimizer
        writes (on the GPU, not the host) and the overlap thread synchronises before the handoff."""
        events = []
        for device in dict.fromkeys(src.device for _, src in pairs):
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
            stream.wait_stream(torch.cuda.current_stream(device))  # after the step being saved
            with torch.cuda.stream(stream):
                for dst, src in pairs:
                    if src.device == device:
                        dst.copy_(src, non_blocking=True)
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(stream)
            events.append((device, event))
        return events


def pin_for(mode: str, job: str, tensors: Iterable[torch.Tensor]) -> bool:
    """Whether a job's snapshot buffer is page-locked: its state holds CUDA tensors."""
    if not holds_cuda(tensors) or not torch.cuda.is_available():
        return False
    if mode == "device":
        log.warning(
            "ckptd: job %s: snapshot='device' is not built yet; CUDA state is copied as with "
            "snapshot='host' (straight into page-locked shared memory)",
            job,
        )
    return True

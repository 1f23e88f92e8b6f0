"""The shared-memory snapshot: the only copy training waits for.

One ``memfd_create`` buffer per Checkpointer, reused across saves. It holds the
finished safetensors image: header (with placeholder digests) then every tensor, laid
out by ``ckptd.format.layout``. Whoever persists it (the embedded worker thread or the
daemon, which receives the fd) hashes the tensors, patches the digests in and writes
the buffer to disk.

Fresh memory costs a page fault per page (allocate, zero, map): copied into for the first
time, the buffer stalled the first save 3-5x longer than the later ones. So ``reserve``
allocates and maps it in a background thread (``fallocate``, ``MAP_POPULATE``) as soon as
the state's size is known, while training runs; a save that comes first waits for it,
and a state that outgrew the reservation still grows the buffer at the save.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Collection, Mapping

import torch

from ckptd.core.format import DIGEST_PLACEHOLDER, TensorEntry, encode_header, layout
from ckptd.wire.protocol import snapshot_memfd
from trainer_hooks._snapshot import pinned
from trainer_hooks._state.state import TORCH_TO_ST

log = logging.getLogger(__name__)
MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux: fault every page in at mmap()


class StagingBuffer:
    """A growable memfd mapped once; ``stage`` copies tensors into it."""

    def __init__(self, name: str = "ckptd-snapshot", pin: bool = False) -> None:
        self.fd = snapshot_memfd(name)  # sealed against shrinking: it only ever grows
        self.capacity = 0
        self.pin = pin  # page-lock the mapping for CUDA (trainer_hooks._snapshot.pinned): the state is on a GPU
        self.registered = False
        self._refused = False  # CUDA said no once (and it was said): not asked again
        self._devices: pinned.DeviceCopies | None = None  # ckptd's CUDA streams, made at the first CUDA copy
        self.grown_at_save = 0  # saves that found the buffer too small (and paid its page faults)
        self._mm: mmap.mmap | None = None
        self._flat: torch.Tensor | None = None
        self._lock = threading.Lock()  # held while the buffer is (re)mapped or copied into
        self._reserving: threading.Thread | None = None

    def reserve(self, size: int) -> None:
        """Make the buffer ``size`` bytes, backed, mapped (and page-locked with ``pin``), in the
        background; a no-op when it is."""
        if self.fd < 0 or (size <= self.capacity and not self._registers):
            return
        self.join()
        self._reserving = threading.Thread(target=self._reserve, args=(size,), name="ckptd-reserve", daemon=True)
        self._reserving.start()

    def _reserve(self, size: int) -> None:
        with self._lock:
            if self.fd < 0:
                return
            if size <= self.capacity and self._flat is not None:  # big enough: page-lock what is there
                self._register()
            else:
                try:
                    self._map(size, populate=True)
                except OSError as exc:  # memory is short: the save faults pages in itself, as before
                    log.warning(
                        "ckptd: could not reserve %d bytes of snapshot memory ahead of the first save: %s", size, exc
                    )

    def join(self) -> None:
        if self._reserving is not None:
            self._reserving.join()
            self._reserving = None

    def _map(self, size: int, populate: bool = False) -> torch.Tensor:
        self._unmap()
        capacity = max(size, int(self.capacity * 1.25), mmap.PAGESIZE)
        os.ftruncate(self.fd, capacity)
        if populate:
            os.posix_fallocate(self.fd, 0, capacity)  # the pages, allocated and zeroed now
        flags = mmap.MAP_SHARED | (MAP_POPULATE if populate else 0)  # and mapped now
        self._mm = mmap.mmap(self.fd, capacity, flags=flags)
        self.capacity = capacity
        self._flat = torch.frombuffer(self._mm, dtype=torch.uint8)
        self._register()
        return self._flat

    @property
    def _registers(self) -> bool:
        """The mapping is to be page-locked and is not (nor was it refused)."""
        return self.pin and not self.registered and not self._refused

    def _register(self) -> None:
        if self._registers and self._flat is not None:
            self.registered = pinned.register(self._flat.data_ptr(), self.capacity)
            self._refused = not self.registered

    def _unmap(self) -> None:
        if self.registered and self._flat is not None:
            pinned.unregister(self._flat.data_ptr())  # before the mapping goes: CUDA holds its pages
            self.registered = False
        self._flat = None
        if self._mm is not None:
            self._mm.close()
            self._mm = None

    def _ensure(self, size: int) -> torch.Tensor:
        if size > self.capacity or self._flat is None:
            if self.capacity:
                self.grown_at_save += 1
            return self._map(size)
        return self._flat

    def stage(self, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> int:
        """Copy the state into the buffer; returns the length of the safetensors image."""
        return self.stage_overlapped(tensors, metadata, ())[0]

    def stage_overlapped(
        self, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str], later: Collection[str]
    ) -> tuple[int, Pending]:
        """``stage``, but the tensors named in ``later`` are left to copy (``snapshot="overlap"``: on
        CPU by ``Pending.finish``, on CUDA already enqueued on ckptd's stream)."""
        entries, header, length = _header(tensors, metadata)
        self.join()
        with self._lock:
            pending = self._copy(self._ensure(length), header, entries, tensors, later)
        return length, pending

    def _copy(
        self,
        flat: torch.Tensor,
        header: bytes,
        entries: list[TensorEntry],
        tensors: Mapping[str, torch.Tensor],
        later: Collection[str],
    ) -> Pending:
        flat[: len(header)].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
        base, pending = len(header), Pending()
        on_gpu: list[tuple[torch.Tensor, torch.Tensor]] = []
        for e in entries:
            if e.nbytes:
                t = tensors[e.name]
                dst = flat[base + e.begin : base + e.end].view(t.dtype).view(t.shape)
                if t.is_cuda:
                    (pending.gpu if e.name in later else on_gpu).append((dst, t))
                elif e.name in later:
                    pending.cpu.append((dst, t))
                else:
                    dst.copy_(t)
        if on_gpu or pending.gpu:
            self._devices = self._devices or pinned.DeviceCopies()
        if on_gpu:
            assert self._devices is not None
            self._devices.copy(on_gpu)
        if pending.gpu:
            assert self._devices is not None
            pending.events = self._devices.enqueue(pending.gpu)
        return pending

    def close(self) -> None:
        self.join()
        self._unmap()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class Pending:
    """What ``stage`` left to copy (``snapshot="overlap"``): CPU copies for the overlap thread to
    make, and CUDA copies already in flight on ckptd's streams, with the events that follow them."""

    cpu: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    gpu: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    events: list[Any] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.cpu and not self.gpu

    def finish(self) -> None:
        """Until every byte is in the buffer (the overlap thread, before the handoff)."""
        for dst, src in self.cpu:
            dst.copy_(src)
        for _, event in self.events:
            event.synchronize()


def image_length(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """Bytes of the safetensors image ``stage`` would write: what a reservation is sized from."""
    return _header(tensors, metadata)[2]


def _header(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> tuple[list[TensorEntry], bytes, int]:
    entries = layout([(n, TORCH_TO_ST[t.dtype], tuple(t.shape)) for n, t in tensors.items()])
    meta = dict(metadata)
    meta["ckptd.digests"] = _placeholder_digests([e.name for e in entries])
    meta["ckptd.meta_digest"] = DIGEST_PLACEHOLDER
    header = encode_header(entries, meta)
    return entries, header, len(header) + (entries[-1].end if entries else 0)


def _placeholder_digests(names: list[str]) -> str:
    import json

    return json.dumps({n: DIGEST_PLACEHOLDER for n in names}, separators=(",", ":"))

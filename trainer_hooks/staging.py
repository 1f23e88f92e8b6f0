"""The shared-memory snapshot: the only copy training waits for.

One ``memfd_create`` buffer per Checkpointer, reused across saves so that only the
first save pays for page faults. It holds the finished safetensors image: header
(with placeholder digests) then every tensor, laid out by ``ckptd.format.layout``.
Whoever persists it (the embedded worker thread or the daemon, which receives the
fd) hashes the tensors, patches the digests in and writes the buffer to disk.
"""

from __future__ import annotations

import mmap
import os
from typing import Mapping

import torch

from ckptd.core.format import DIGEST_PLACEHOLDER, encode_header, layout
from ckptd.wire.protocol import snapshot_memfd
from trainer_hooks.state import TORCH_TO_ST


class StagingBuffer:
    """A growable memfd mapped once; ``stage`` copies tensors into it."""

    def __init__(self, name: str = "ckptd-snapshot") -> None:
        self.fd = snapshot_memfd(name)  # sealed against shrinking: it only ever grows
        self.capacity = 0
        self._mm: mmap.mmap | None = None
        self._flat: torch.Tensor | None = None

    def _ensure(self, size: int) -> torch.Tensor:
        if size > self.capacity or self._flat is None:
            self._flat = None
            if self._mm is not None:
                self._mm.close()
            self.capacity = max(size, int(self.capacity * 1.25), mmap.PAGESIZE)
            os.ftruncate(self.fd, self.capacity)
            self._mm = mmap.mmap(self.fd, self.capacity)
            self._flat = torch.frombuffer(self._mm, dtype=torch.uint8)
        return self._flat

    def stage(self, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> int:
        """Copy the state into the buffer; returns the length of the safetensors image."""
        entries = layout([(n, TORCH_TO_ST[t.dtype], tuple(t.shape)) for n, t in tensors.items()])
        meta = dict(metadata)
        meta["ckptd.digests"] = _placeholder_digests([e.name for e in entries])
        meta["ckptd.meta_digest"] = DIGEST_PLACEHOLDER
        header = encode_header(entries, meta)
        length = len(header) + (entries[-1].end if entries else 0)
        flat = self._ensure(length)
        flat[: len(header)].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
        base = len(header)
        for e in entries:
            if e.nbytes:
                t = tensors[e.name]
                dst = flat[base + e.begin: base + e.end].view(t.dtype).view(t.shape)
                dst.copy_(t)
        return length

    def close(self) -> None:
        self._flat = None
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _placeholder_digests(names: list[str]) -> str:
    import json

    return json.dumps({n: DIGEST_PLACEHOLDER for n in names}, separators=(",", ":"))

"""Frozen tensors stored once (SPEC §13), the hook's side.

A frozen parameter (``requires_grad=False``: the base under a LoRA adapter) that has not
changed since a verified save is not copied into the next snapshot at all: the snapshot's
header refers to the verified file that holds its bytes (``ckptd.core.refs``), so the save
costs what changed. "Not changed" is the same storage (pointer, offset, shape, stride,
dtype) at the same version counter: every in-place write through the parameter (an
optimizer step, ``copy_``, ``load_state_dict``) moves ``tensor._version``, and a new
tensor in its place has another storage. A write through ``param.data`` does not move the
parameter's counter; a frozen parameter written that way is not frozen, and ckptd cannot
see it (say so in the docs, not here).

The hook learns where the bytes are only once a save verified (from the verified file's
header), and forgets everything when a save fails: the next one stores every tensor again.
One save is in flight at a time (the staging buffer is reused), so one staged record is kept.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from ckptd.core.format import read_header
from ckptd.core.refs import Ref, RefError, decode
from ckptd.disk.safepath import open_regular

__all__ = ["SharedTensors", "identity", "frozen_identities"]

Identity = tuple[Any, ...]


def identity(t: torch.Tensor) -> Identity:
    """The storage a tensor is, not its values: what "unchanged" compares, with the version."""
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def frozen_identities(model: Any) -> set[Identity]:
    """The model's parameters that do not train (a LoRA base, a frozen encoder)."""
    params: Iterable[torch.Tensor] = model.parameters() if hasattr(model, "parameters") else ()
    return {identity(p) for p in params if not p.requires_grad and p.numel()}


@dataclass(frozen=True)
class _Seen:
    identity: Identity
    version: int


class SharedTensors:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, tuple[_Seen, Ref]] = {}  # name -> as verified, and where its bytes are
        self._staged: tuple[int, dict[str, tuple[_Seen, Ref | None]]] | None = None

    def split(
        self, step: int, tensors: dict[str, torch.Tensor], frozen: set[Identity], record: bool = True
    ) -> tuple[dict[str, torch.Tensor], dict[str, Ref]]:
        """At staging: (the tensors to copy, the references that stand for the unchanged frozen ones).
        ``record=False``: a snapshot that will not be a file (``every_memory``) teaches nothing."""
        stored: dict[str, torch.Tensor] = {}
        refs: dict[str, Ref] = {}
        staged: dict[str, tuple[_Seen, Ref | None]] = {}
        with self._lock:
            for name, t in tensors.items():
                key = identity(t) if t.numel() else None
                if key is None or key not in frozen:
                    stored[name] = t
                    continue
                seen = _Seen(key, t._version)
                held = self._held.get(name)
                ref = held[1] if held is not None and held[0] == seen else None
                if ref is None:
                    stored[name] = t
                else:
                    refs[name] = ref
                staged[name] = (seen, ref)
            if record:
                self._staged = (step, staged)
        return stored, refs

    def verified(self, step: int, path: str) -> None:
        """A save verified at ``path``: its frozen tensors are now held there (or still where they were)."""
        with self._lock:
            if self._staged is None or self._staged[0] != step:
                return
            staged, self._staged = self._staged[1], None
        stored = [name for name, (_, ref) in staged.items() if ref is None]
        where = _where(path, stored) if stored else {}
        with self._lock:
            for name, (seen, ref) in staged.items():
                held = ref if ref is not None else where.get(name)
                if held is not None:
                    self._held[name] = (seen, held)

    def failed(self) -> None:
        """A save failed: trust nothing learned so far; the next save stores every tensor."""
        with self._lock:
            self._held.clear()
            self._staged = None


def _where(path: str, names: list[str]) -> dict[str, Ref]:
    """Where a verified file holds these tensors, from its header alone."""
    try:
        with open_regular(path) as f:
            header = read_header(f, os.fstat(f.fileno()).st_size)
    except OSError:
        return {}
    digests = header.meta_json("ckptd.digests", {}) or {}
    entries = {e.name: e for e in header.tensors}
    file = os.path.basename(path)
    held = {
        n: Ref(file, n, (entries[n].begin, entries[n].end), str(digests[n]), entries[n].dtype, tuple(entries[n].shape))
        for n in names
        if n in entries and n in digests
    }
    try:
        referred = decode(header.metadata)  # what the persister found unchanged by its bytes (ckptd.disk.dedup)
    except RefError:
        referred = {}
    return {**held, **{n: referred[n] for n in names if n in referred}}

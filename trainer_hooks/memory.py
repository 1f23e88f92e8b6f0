"""Resuming from the daemon's memory tier (SPEC §14), the hook's side.

After a trainer crash with the daemon alive, the daemon still holds the job's newest verified
snapshot (``ckptd.daemon.memtier``). ``fetch`` asks for it (``memory`` request; the reply
carries a sealed memfd), checks it is the job's, not older than the newest checkpoint on disk,
sealed against writes (the daemon verified every tensor of it before sealing it) and its
metadata digest, and returns the state: no byte of the checkpoint file is read (tensors it refers to instead of holding, a
frozen base, still come from the file that holds them). Anything short of that returns None
and the caller resumes from disk; a daemon that does not answer is said once in the log.
"""

from __future__ import annotations

import fcntl
import json
import logging
import mmap
import os
import warnings
from typing import Any

import torch

from ckptd.core.format import FormatError, Header, meta_digest, read_header_from_buffer
from ckptd.disk.verify import digest_map
from ckptd.wire.client import DaemonUnavailable, request_fd
from trainer_hooks.state import ST_TO_TORCH, load_referenced, unflatten

log = logging.getLogger("ckptd.hook")
SEALED = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK


class Snapshot:
    """A snapshot from memory: its step, the checkpoint file it is the image of, its state. The
    model's tensors are views of the daemon's sealed copy (``load_state_dict`` copies them into
    the parameters: the one pass over the bytes); ``close()`` once they are loaded."""

    def __init__(self, step: int, path: str, state: dict[str, Any], metadata: dict[str, str],
                 mapping: mmap.mmap) -> None:
        self.step, self.path, self.state, self.metadata = step, path, state, metadata
        self._mapping: mmap.mmap | None = mapping

    def close(self) -> None:
        self.state = {}
        if self._mapping is not None:
            try:
                self._mapping.close()
            except BufferError:  # a view still alive somewhere: the mapping goes with it
                pass
            self._mapping = None


def fetch(socket_path: str, job: str, directory: str, newest_on_disk: int) -> Snapshot | None:
    try:
        reply, fd = request_fd(socket_path, {"type": "memory", "job": job, "directory": os.path.abspath(directory)})
    except DaemonUnavailable as exc:
        if os.path.exists(socket_path):
            log.warning("ckptd: job %s: the daemon's memory tier is unavailable (%s); resuming from disk", job, exc)
        return None
    if fd is None or not reply.get("ok") or reply.get("step") is None:
        return None
    try:
        if int(reply["step"]) < newest_on_disk:
            return None  # a newer checkpoint reached the disk another way (an embedded save, a fetch)
        return _load(fd, int(reply["length"]), str(reply.get("path") or ""), job, directory)
    except (OSError, ValueError, KeyError, FormatError) as exc:
        log.warning("ckptd: job %s: the snapshot in the daemon's memory is not usable (%s); resuming from disk",
                    job, exc)
        return None
    finally:
        os.close(fd)


def _load(fd: int, length: int, path: str, job: str, directory: str) -> Snapshot:
    if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALED != SEALED:
        raise FormatError("the daemon's copy is not sealed against writes")
    populate = getattr(mmap, "MAP_POPULATE", 0)  # the page faults at mmap, not one by one in the copy
    mm = mmap.mmap(fd, length, flags=mmap.MAP_PRIVATE | populate, prot=mmap.PROT_READ)  # (writable: copies them)
    try:
        header = read_header_from_buffer(memoryview(mm), length)
        _check(header, job)
        tensors = {e.name: _tensor(mm, header.data_start, e.dtype, e.shape, e.begin, e.end,
                                   copy=not e.name.startswith("model/")) for e in header.tensors}
        meta = dict(header.metadata)
        tensors.update(load_referenced(os.path.join(os.path.abspath(directory), "memory"), meta))  # holders beside
        state: dict[str, Any] = unflatten(json.loads(meta.get("ckptd.state", "null")), tensors,
                                          json.loads(meta.get("ckptd.aliases", "{}")))
    except BaseException:
        mm.close()
        raise
    return Snapshot(int(meta["ckptd.step"]), path, state, meta, mm)


def _check(header: Header, job: str) -> None:
    """The job's, with its digests recorded and the metadata (trainer state, RNG) intact. The
    tensors were verified by the daemon on the very bytes sealed since (``memtier``)."""
    if header.metadata.get("ckptd.job") != job:
        raise FormatError(f"it is job {header.metadata.get('ckptd.job')!r}'s")
    digest_map(header)
    if header.metadata.get("ckptd.meta_digest") != meta_digest(header.metadata):
        raise FormatError("metadata digest mismatch")


def _tensor(mm: mmap.mmap, start: int, dtype: str, shape: tuple[int, ...], begin: int, end: int,
            copy: bool) -> torch.Tensor:
    """One tensor out of the mapping: a view for what ``load_state_dict`` copies anyway, a copy for
    the rest (an optimizer keeps the tensors it is given, and the mapping goes away)."""
    kind = ST_TO_TORCH[dtype]
    if end == begin:
        return torch.empty(shape, dtype=kind)
    with warnings.catch_warnings():  # read-only memory: nothing writes through these views (a write would fault)
        warnings.filterwarnings("ignore", "The given buffer is not writable")
        t = torch.frombuffer(mm, dtype=kind, count=(end - begin) // kind.itemsize, offset=start + begin).view(shape)
    return t.clone() if copy else t

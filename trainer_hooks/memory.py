"""Resuming from the daemon's memory tier (SPEC §14), the hook's side.

After a trainer crash with the daemon alive, the daemon still holds the job's newest verified
snapshot (``ckptd.daemon.memtier``). ``fetch`` asks for it (``memory`` request; the reply
carries a sealed memfd), checks it is the job's and not older than the newest checkpoint on
disk, verifies every tensor's digest and the metadata digest from memory, and returns the
state: no byte of the checkpoint file is read (tensors it refers to instead of holding, a
frozen base, still come from the file that holds them). Anything short of that returns None
and the caller resumes from disk; a daemon that does not answer is said once in the log.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
from typing import Any

import torch
import xxhash

from ckptd.core.format import FormatError, Header, meta_digest, read_header_from_buffer
from ckptd.disk.verify import digest_map
from ckptd.wire.client import DaemonUnavailable, request_fd
from trainer_hooks.state import ST_TO_TORCH, load_referenced, unflatten

log = logging.getLogger("ckptd.hook")


class Snapshot:
    """A verified snapshot from memory: its step, the checkpoint file it is the image of, its state."""

    def __init__(self, step: int, path: str, state: dict[str, Any], metadata: dict[str, str]) -> None:
        self.step, self.path, self.state, self.metadata = step, path, state, metadata


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
        return _load(fd, int(reply["length"]), str(reply["path"]), job)
    except (OSError, ValueError, KeyError, FormatError) as exc:
        log.warning("ckptd: job %s: the snapshot in the daemon's memory is not usable (%s); resuming from disk",
                    job, exc)
        return None
    finally:
        os.close(fd)


def _load(fd: int, length: int, path: str, job: str) -> Snapshot:
    with mmap.mmap(fd, length, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE) as mm:
        view = memoryview(mm)
        try:
            header = read_header_from_buffer(view, length)
            _verify(view, header, job)
            tensors = {e.name: _tensor(mm, header, e.name, e.dtype, e.shape, e.begin, e.end) for e in header.tensors}
        finally:
            view.release()
    meta = dict(header.metadata)
    tensors.update(load_referenced(path, meta))
    state: dict[str, Any] = unflatten(json.loads(meta.get("ckptd.state", "null")), tensors,
                                      json.loads(meta.get("ckptd.aliases", "{}")))
    return Snapshot(int(meta["ckptd.step"]), path, state, meta)


def _verify(view: memoryview, header: Header, job: str) -> None:
    """What ``verify_file`` checks of a file, of the bytes in memory: job, metadata digest, every tensor."""
    if header.metadata.get("ckptd.job") != job:
        raise FormatError(f"it is job {header.metadata.get('ckptd.job')!r}'s")
    expected = digest_map(header)
    if header.metadata.get("ckptd.meta_digest") != meta_digest(header.metadata):
        raise FormatError("metadata digest mismatch")
    for e in header.tensors:
        if xxhash.xxh3_64_hexdigest(view[header.data_start + e.begin:header.data_start + e.end]) != expected[e.name]:
            raise FormatError(f"digest mismatch in tensor {e.name!r}")


def _tensor(mm: mmap.mmap, header: Header, name: str, dtype: str, shape: tuple[int, ...], begin: int,
            end: int) -> torch.Tensor:
    """A copy of one tensor out of the mapping (which goes away): the optimizer keeps what it is given."""
    t = torch.frombuffer(mm, dtype=ST_TO_TORCH[dtype], count=(end - begin) // ST_TO_TORCH[dtype].itemsize,
                         offset=header.data_start + begin) if end > begin else torch.empty(0, dtype=ST_TO_TORCH[dtype])
    return t.view(shape).clone()

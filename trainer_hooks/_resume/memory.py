"""Resuming from the daemon's memory tier (SPEC §14), the hook's side.

After a trainer crash with the daemon alive, the daemon still holds the job's newest verified
snapshot (``ckptd.daemon.memtier``). ``fetch`` asks for it (``memory`` request; the reply
carries a sealed memfd), checks it is the job's, kept for this very directory (the device and
inode the daemon recorded when it kept it equal the directory's now: one removed with
``rm -rf`` or recreated does not resume from memory; the daemon checks it too), that every
file it refers to is this uid's own, not older than the newest checkpoint on disk,
sealed against writes (the daemon verified every tensor of it before sealing it), its
metadata digest and that it fits the model, then reads the model's tensors straight into the
model and returns the state: no byte of the checkpoint file is read (tensors it refers to instead of holding, a
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
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from ckptd.core.format import FormatError, Header, meta_digest, read_header
from ckptd.disk.verify import digest_map
from ckptd.save.owned import holders_problem
from ckptd.wire.client import DaemonUnavailable, request_fd
from trainer_hooks._state.loader import load_referenced
from trainer_hooks._state.state import ST_TO_TORCH, unflatten

log = logging.getLogger(__name__)
SEALED = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK


@dataclass(frozen=True)
class Snapshot:
    """A snapshot from memory: its step, the checkpoint file it is the image of, its state (the
    model's tensors already read into the model's own, the rest into tensors of their own)."""

    step: int
    path: str
    state: dict[str, Any]
    metadata: dict[str, str]


def fetch(
    socket_path: str,
    job: str,
    directory: str,
    directory_id: tuple[int, int],
    newest_on_disk: int,
    fits: Callable[[dict[str, str]], bool],
    into: Mapping[str, torch.Tensor],
) -> Snapshot | None:
    """The daemon's snapshot of ``job``, or None (resume from disk). ``directory_id``: the job
    directory's (device, inode) now. ``fits``: does its metadata describe this model (asked before
    any byte is read into it)? ``into``: the model's tensors by their name in the snapshot
    (``model/KEY``), read into in place when they match."""
    try:
        reply, fd = request_fd(socket_path, {"type": "memory", "job": job, "directory": os.path.abspath(directory)})
    except DaemonUnavailable as exc:
        if os.path.exists(socket_path):
            log.warning("ckptd: job %s: the daemon's memory tier is unavailable (%s); resuming from disk", job, exc)
        return None
    if fd is None or not reply.get("ok") or reply.get("step") is None:
        return None
    if reply.get("directory_id") != list(directory_id):
        os.close(fd)
        log.warning(
            "ckptd: job %s: the daemon's snapshot was kept for another directory at %s (removed or "
            "recreated since: device and inode %s, now %s); not resumed from memory",
            job,
            directory,
            reply.get("directory_id"),
            list(directory_id),
        )
        return None
    try:
        if int(reply["step"]) < newest_on_disk:
            return None  # a newer checkpoint reached the disk another way (an embedded save, a fetch)
        return _load(fd, int(reply["length"]), str(reply.get("path") or ""), job, directory, fits, into)
    except (OSError, ValueError, KeyError, FormatError) as exc:
        log.warning(
            "ckptd: job %s: the snapshot in the daemon's memory is not usable (%s); resuming from disk", job, exc
        )
        return None
    finally:
        os.close(fd)


def _load(
    fd: int,
    length: int,
    path: str,
    job: str,
    directory: str,
    fits: Callable[[dict[str, str]], bool],
    into: Mapping[str, torch.Tensor],
) -> Snapshot | None:
    """The header, then every tensor copied straight into its destination: one copy
    of each byte (the model's own tensors included: ``load_state_dict`` finds them loaded)."""
    if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALED != SEALED:
        raise FormatError("the daemon's copy is not sealed against writes")
    with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
        header = read_header(f, length)
    _check(header, job)
    meta = dict(header.metadata)
    if not fits(meta):
        return None  # from disk, where a model that does not fit is refused with its reason
    reads: list[tuple[torch.Tensor, int, int]] = []
    tensors = {
        e.name: _tensor(header.data_start, e.dtype, e.shape, e.begin, e.end, into.get(e.name), reads)
        for e in header.tensors
    }
    problem = holders_problem(os.path.abspath(directory), meta, os.geteuid())
    if problem:
        raise FormatError(problem)
    _read_all(fd, length, reads)
    tensors.update(load_referenced(os.path.join(os.path.abspath(directory), "memory"), meta))  # holders beside
    state: dict[str, Any] = unflatten(
        json.loads(meta.get("ckptd.state", "null")), tensors, json.loads(meta.get("ckptd.aliases", "{}"))
    )
    return Snapshot(int(meta["ckptd.step"]), path, state, meta)


def _check(header: Header, job: str) -> None:
    """The job's, with its digests recorded and the metadata (trainer state, RNG) intact. The
    tensors were verified by the daemon on the very bytes sealed since (``memtier``)."""
    if header.metadata.get("ckptd.job") != job:
        raise FormatError(f"it is job {header.metadata.get('ckptd.job')!r}'s")
    digest_map(header)
    if header.metadata.get("ckptd.meta_digest") != meta_digest(header.metadata):
        raise FormatError("metadata digest mismatch")


def _tensor(
    start: int,
    dtype: str,
    shape: tuple[int, ...],
    begin: int,
    end: int,
    dest: torch.Tensor | None,
    reads: list[tuple[torch.Tensor, int, int]],
) -> torch.Tensor:
    """One tensor: ``dest`` (a model tensor of the same kind on the CPU, which ``load_state_dict``
    then finds already holding it and does not copy again) or a new one; its read is queued."""
    kind = ST_TO_TORCH[dtype]
    fits = (
        dest is not None
        and dest.device.type == "cpu"
        and dest.dtype == kind
        and tuple(dest.shape) == shape
        and dest.is_contiguous()
    )
    t = dest if fits and dest is not None else torch.empty(shape, dtype=kind)  # (the header matched extent and shape)
    if end > begin:
        reads.append((t, start + begin, end - begin))
    if t is dest:
        torch.autograd.graph.increment_version(t)  # written behind autograd's back: say so
    return t


def _read_all(fd: int, length: int, reads: list[tuple[torch.Tensor, int, int]]) -> None:
    """Every queued read: the sealed memfd mapped once (its pages exist: mapping them costs a
    twentieth of the copy) and copied by torch, which splits a large copy over its threads.
    Measured on a 2-vCPU VM, 1 GiB: 0.14 s this way, 0.25 s by ``preadv`` (the kernel copies
    shared memory page by page on one core), 0.25 s for a ``clone`` of the state."""
    populate = getattr(mmap, "MAP_POPULATE", 0)
    mm = mmap.mmap(fd, length, flags=mmap.MAP_SHARED | populate, prot=mmap.PROT_READ)
    try:
        with warnings.catch_warnings():  # read-only memory: nothing writes through this view (a write would fault)
            warnings.filterwarnings("ignore", "The given buffer is not writable")
            flat = torch.frombuffer(mm, dtype=torch.uint8)
        for t, offset, nbytes in reads:
            t.reshape(-1).view(torch.uint8)[:nbytes].copy_(flat[offset : offset + nbytes])
        del flat
    finally:
        mm.close()

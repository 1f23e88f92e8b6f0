"""The memory tier (SPEC §14): each job's newest verified snapshot, kept in the daemon's memory.

Most failures kill the trainer, not the host: the daemon outlives it, and so can the newest
checkpoint's bytes. After a save verified on disk, the daemon copies the snapshot it received
(a memfd whose header already carries the final digests: it is the file's exact image) into
a memfd of its own, sealed against any write, verifies every tensor of that copy against the
digests in its header, and keeps it for the job, replacing the one before. A restarted trainer's ``resume()`` asks for it (``memory`` request, answered with the
fd) and restores without reading the checkpoint file: it checks the seals (no write since the
daemon verified the copy) and the metadata digest, and reads each byte once.

Within ``[daemon] memory_budget`` (default 25% of RAM): when a snapshot would exceed it, the
oldest jobs' snapshots are dropped first; one larger than the budget is not kept. The daemon's
own memory is all this costs: a daemon that dies loses the tier, never a checkpoint (resume
falls back to disk and says so).
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from dataclasses import dataclass, replace

from ckptd.daemon.jobkey import JobKey
from ckptd.disk.verify import verify_open

__all__ = ["Held", "MemoryTier", "budget_of"]

log = logging.getLogger("ckptd.daemon")
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def budget_of(setting: int | float | None) -> int:
    """``[daemon] memory_budget``: bytes, or a fraction of the host's memory (default 25%)."""
    if isinstance(setting, int):
        return setting
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(ram * (0.25 if setting is None else setting))


@dataclass(frozen=True)
class Held:
    key: JobKey
    fd: int  # the daemon's sealed memfd
    length: int
    step: int
    path: str  # the verified checkpoint file it is the image of
    at: float  # when it was kept (the oldest job's goes first)
    owner: int = -1  # the uid it was kept for: only that uid resumes from it
    directory_id: tuple[int, int] = (0, 0)  # the job directory's (device, inode) when it was kept
    directory_fd: int = -1  # an O_PATH fd of that directory, held with it: while it is open the inode
    # cannot be freed and its number reused, so a directory removed and made again never matches

    def release(self) -> None:
        os.close(self.fd)
        if self.directory_fd >= 0:
            os.close(self.directory_fd)


class MemoryTier:
    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._held: dict[JobKey, Held] = {}
        self._lock = threading.Lock()

    def keep(self, key: JobKey, src_fd: int, length: int, step: int, path: str, now: float, *, owner: int = -1,
             directory_fd: int = -1) -> bool:
        """Copy a verified snapshot out of the trainer's buffer (which it reuses after our reply);
        False when it is not kept (the tier is off, it does not fit, or a newer step is held).
        ``owner`` and ``directory_fd`` (an fd of the job directory, the tier's to close) say whose
        and for which directory it is (``requests.memory`` answers only those)."""
        kept = False
        try:
            kept = self._keep(key, src_fd, length, step, path, now, owner, directory_fd)
            return kept
        finally:
            if not kept and directory_fd >= 0:
                os.close(directory_fd)

    def _keep(self, key: JobKey, src_fd: int, length: int, step: int, path: str, now: float, owner: int,
              directory_fd: int) -> bool:
        if self.budget <= 0:  # memory_budget = 0: the tier is off
            return False
        if length > self.budget:
            self.drop(key)
            log.info("job %s: snapshot of %d bytes exceeds the memory budget (%d); not kept in memory",
                     key.name, length, self.budget)
            return False
        with self._lock:
            if self._newer_than(key, step):
                return False
        fd = _sealed_copy(src_fd, length, f"ckptd-mem-{key.name}")
        problem = _unverified(fd, f"the memory tier's copy of {path or key.name}")
        if problem:
            os.close(fd)
            self.drop(key)
            log.warning("job %s: the copy of step %d for the memory tier does not verify (%s); not kept",
                        key.name, step, problem)
            return False
        with self._lock:
            if self._newer_than(key, step):
                os.close(fd)
                return False
            old = self._held.pop(key, None)
            for doomed in self._to_evict(length):
                self._held.pop(doomed.key).release()
                log.info("memory tier: dropped job %s's step %d (the oldest) for job %s", doomed.key.name,
                         doomed.step, key.name)
            self._held[key] = Held(key, fd, length, step, path, now, owner, _identity(directory_fd), directory_fd)
        if old is not None:
            old.release()
        return True

    def _newer_than(self, key: JobKey, step: int) -> bool:
        """Under the lock: a newer snapshot is held (a memory-only save taken while this disk save
        was persisting)."""
        held = self._held.get(key)
        return held is not None and held.step > step

    def _to_evict(self, incoming: int) -> list[Held]:
        """Under the lock: the oldest snapshots whose room the incoming one needs."""
        used = sum(h.length for h in self._held.values())
        out = []
        for h in sorted(self._held.values(), key=lambda h: h.at):
            if used + incoming <= self.budget:
                break
            out.append(h)
            used -= h.length
        return out

    def get(self, key: JobKey) -> Held | None:
        """The job's snapshot, with an fd of its own for the caller to send and close."""
        with self._lock:
            h = self._held.get(key)
            return None if h is None else replace(h, fd=os.dup(h.fd), directory_fd=-1)

    def held(self, key: JobKey) -> int:
        with self._lock:
            h = self._held.get(key)
            return h.length if h is not None else 0

    def drop(self, key: JobKey, kept_at: float | None = None) -> None:
        """Forget the job's snapshot (only the one kept at ``kept_at``, when given: not a newer one)."""
        with self._lock:
            h = self._held.get(key)
            if h is None or (kept_at is not None and h.at != kept_at):
                return
            del self._held[key]
        h.release()

    def close(self) -> None:
        with self._lock:
            held, self._held = list(self._held.values()), {}
        for h in held:
            h.release()


def _identity(directory_fd: int) -> tuple[int, int]:
    if directory_fd < 0:
        return (0, 0)
    st = os.fstat(directory_fd)
    return (st.st_dev, st.st_ino)


def _unverified(fd: int, label: str) -> str:
    """The sealed copy verified as a file is ("" when it is: header, metadata digest, every
    tensor): what a resume from memory reads is then these very bytes (the seal forbids any write
    since), so it need not hash them again."""
    with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
        return verify_open(f, label).reason


def _sealed_copy(src_fd: int, length: int, name: str) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, length)
        done = 0
        while done < length:
            try:
                n = os.copy_file_range(src_fd, fd, length - done, done, done)
            except OSError:  # a kernel without it for these files: sendfile writes at the position
                os.lseek(fd, done, os.SEEK_SET)
                n = os.sendfile(fd, src_fd, done, length - done)
            if n <= 0:
                raise OSError("the snapshot ended early")
            done += n
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)  # nobody, the daemon included, changes it from now on
    except BaseException:
        os.close(fd)
        raise
    return fd

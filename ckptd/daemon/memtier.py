"""The memory tier (SPEC §14): each job's newest verified snapshot, kept in the daemon's memory.

Most failures kill the trainer, not the host: the daemon outlives it, and so can the newest
checkpoint's bytes. After a save verified on disk, the daemon copies the snapshot it received
(a memfd whose header already carries the final digests: it is the file's exact image) into
a memfd of its own, sealed against any write, verifies every tensor of that copy against the
digests in its header, and keeps it for the job, replacing the one before. A restarted trainer's ``resume()`` asks for it (``memory`` request, answered with the
fd) and restores without reading the checkpoint file: it checks the seals (no write since the
daemon verified the copy) and the metadata digest, and reads each byte once.

Within ``[daemon] memory_budget`` (default 25% of RAM), counting copies in flight: room is
reserved before a byte is copied, so the tier's memfds never hold more than the budget, however
many saves copy at once; a snapshot that finds no room is not kept (the save itself is not
affected). Making room drops snapshots by a per-uid share (``evictions``): the budget divided by
the uids in the tier; the oldest snapshot of the uid that holds the most goes first, and a uid
within its share never loses one to another uid's save. One larger than the budget is not kept.
The daemon's own memory is all this costs: a daemon that dies loses the tier, never a checkpoint
(resume falls back to disk and says so).
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import threading
from dataclasses import dataclass, replace

from ckptd.daemon.jobkey import JobKey
from ckptd.disk.verify import verify_open

__all__ = ["Held", "MemoryTier", "Usage", "budget_of", "evictions"]

log = logging.getLogger(__name__)
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
    owner: int = -1  # the uid it was kept for: only that uid resumes from it, and it counts against its share
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
        self._flying: dict[int, tuple[int, int]] = {}  # a copy in flight (``_reserve``) -> (uid, bytes)
        self._tickets = itertools.count()
        self._lock = threading.Lock()

    def keep(
        self,
        key: JobKey,
        src_fd: int,
        length: int,
        step: int,
        path: str,
        now: float,
        *,
        owner: int = -1,
        directory_fd: int = -1,
    ) -> bool:
        """Copy a verified snapshot out of the trainer's buffer (which it reuses after our reply),
        once, into room reserved for it first; False when it is not kept (the tier is off, it does
        not fit, or a newer step is held). ``owner``: whose it is (only that uid resumes from it; it
        counts against that uid's share); ``directory_fd`` (the tier's to close): the job directory
        it is for (``requests.memory`` answers only for that very directory)."""
        kept = False
        try:
            kept = self._keep(key, src_fd, length, step, path, now, owner, directory_fd)
            return kept
        finally:
            if not kept and directory_fd >= 0:
                os.close(directory_fd)

    def _keep(
        self, key: JobKey, src_fd: int, length: int, step: int, path: str, now: float, uid: int, directory_fd: int
    ) -> bool:
        if self.budget <= 0:  # memory_budget = 0: the tier is off
            return False
        if length > self.budget:
            self.drop(key)
            log.info(
                "job %s: snapshot of %d bytes exceeds the memory budget (%d); not kept in memory",
                key.name,
                length,
                self.budget,
            )
            return False
        ticket = self._reserve(key, uid, length, step)
        if ticket is None:
            return False
        try:
            fd = _sealed_copy(src_fd, length, f"ckptd-mem-{key.name}")
            problem = _unverified(fd, f"the memory tier's copy of {path or key.name}")
        except BaseException:
            self._release(ticket)
            raise
        with self._lock:
            del self._flying[ticket]
            kept = not problem and not self._newer_than(key, step)
            if kept:
                old = self._held.pop(key, None)
                if old is not None:  # closed under the lock: its room is free before anyone reserves it
                    old.release()
                self._held[key] = Held(key, fd, length, step, path, now, uid, _identity(directory_fd), directory_fd)
            else:
                os.close(fd)
        if problem:
            self.drop(key)
            log.warning(
                "job %s: the copy of step %d for the memory tier does not verify (%s); not kept",
                key.name,
                step,
                problem,
            )
        return kept

    def _reserve(self, key: JobKey, uid: int, length: int, step: int) -> int | None:
        """Room for ``length`` bytes of ``uid``'s, made by ``evictions`` and counted until the copy
        is kept or dropped: a ticket, or None when no room can be made (or a newer step is held)."""
        with self._lock:
            if self._newer_than(key, step):
                return None
            doomed = evictions(self._usage(), self.budget, uid, length)
            if doomed is None:
                log.info(
                    "memory tier: no room for job %s's step %d (%d bytes): the copies in flight and the "
                    "snapshots of uids within their share hold the budget; not kept",
                    key.name,
                    step,
                    length,
                )
                return None
            for victim in doomed:
                h = self._held.pop(victim)
                h.release()
                log.info(
                    "memory tier: dropped job %s's step %d (the oldest of the uid holding the most) for job %s",
                    victim.name,
                    h.step,
                    key.name,
                )
            ticket = next(self._tickets)
            self._flying[ticket] = (uid, length)
            return ticket

    def _usage(self) -> Usage:
        """Under the lock: what each uid holds and has in flight."""
        held: dict[int, list[tuple[float, JobKey, int]]] = {}
        for k, h in self._held.items():
            held.setdefault(h.owner, []).append((h.at, k, h.length))
        flying: dict[int, int] = {}
        for u, n in self._flying.values():
            flying[u] = flying.get(u, 0) + n
        return Usage(held, flying)

    def _release(self, ticket: int) -> None:
        with self._lock:
            self._flying.pop(ticket, None)

    def accounted(self) -> int:
        """Bytes the tier holds and has reserved for copies in flight: never above the budget."""
        with self._lock:
            return sum(h.length for h in self._held.values()) + sum(n for _, n in self._flying.values())

    def _newer_than(self, key: JobKey, step: int) -> bool:
        """Under the lock: a newer snapshot is held (a memory-only save taken while this disk save
        was persisting)."""
        held = self._held.get(key)
        return held is not None and held.step > step

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


@dataclass(frozen=True)
class Usage:
    held: dict[int, list[tuple[float, JobKey, int]]]  # uid -> its snapshots (kept at, key, bytes)
    flying: dict[int, int]  # uid -> bytes of its copies in flight

    def of(self, uid: int) -> int:
        return sum(n for _, _, n in self.held.get(uid, ())) + self.flying.get(uid, 0)


def evictions(usage: Usage, budget: int, uid: int, length: int) -> list[JobKey] | None:
    """The snapshots to drop so that ``length`` more bytes of ``uid``'s fit ``budget``, or None
    when they cannot be made to fit. The share rule (L1): each uid in the tier (holding, copying
    or asking) has ``budget / uids``; while room is short, the uid that holds the most, counting
    the incoming bytes as ``uid``'s (on a tie, ``uid`` itself), loses its oldest snapshot, and
    only a uid over its share loses any. Since the total asked exceeds the budget, the heaviest
    uid is over its share: a uid within its share never loses a snapshot to another's save.
    Copies in flight are never dropped (they are counted, so the budget holds as they land)."""
    held = {u: sorted(snaps) for u, snaps in usage.held.items()}
    uids = set(held) | set(usage.flying) | {uid}
    share = budget / len(uids)
    load = {u: usage.of(u) + (length if u == uid else 0) for u in uids}
    used = sum(load.values())
    out: list[JobKey] = []
    while used > budget:
        candidates = [u for u in uids if held.get(u) and load[u] > share]
        if not candidates:
            return None
        victim = max(candidates, key=lambda u: (load[u], u == uid))
        _, key, n = held[victim].pop(0)
        out.append(key)
        load[victim] -= n
        used -= n
    return out


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

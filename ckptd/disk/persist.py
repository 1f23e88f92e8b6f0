"""From a staged snapshot to a durable, verified file under its final name.

The order matters and is the whole point:

1. parse and bound-check the snapshot's header (it may come from another process);
2. hash every tensor in the snapshot and patch the digests into its header;
3. write the image to a temp file in the target directory (``O_EXCL``, no symlinks);
4. ``fsync`` the file, then drop its pages from the cache (``POSIX_FADV_DONTNEED``) so
   the next read comes from the disk, not from memory;
5. verify the temp file by reading every tensor back and comparing digests;
6. ``rename`` it to the final name and ``fsync`` the directory.

A final name therefore always means "verified on disk"; a crash at any point leaves
at most a temp file, which ``cleanup_temp`` removes. An fsync failure is final for
that checkpoint: the data may be gone from the cache, so it is never retried into a
false success.
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import secrets
import stat
import time
from dataclasses import dataclass, field
from typing import Mapping

import xxhash

from ckptd.core.format import (
    FormatError,
    Header,
    encode_header,
    meta_digest,
    read_header,
    read_header_from_buffer,
)
from ckptd.core.refs import REFS_KEY, decode
from ckptd.core.vocab import FailReason
from ckptd.disk.dedup import find_reused, reduced
from ckptd.disk.opened import Opened
from ckptd.disk.refs import check_refs, holders, opener_at
from ckptd.disk.verify import VerifyResult, verify_open, verify_opened

__all__ = ["TEMP_MARK", "PersistError", "Persisted", "cleanup_temp", "persist", "reason_for", "seal", "temp_name"]

TEMP_MARK = ".ckptd-tmp."


class PersistError(Exception):
    """A save that failed; ``reason`` is the metric label (no_space, io_error, ...)."""

    def __init__(self, reason: FailReason, message: str) -> None:
        super().__init__(message)
        self.reason = FailReason(reason)


@dataclass(frozen=True)
class Persisted:
    path: str
    bytes: int
    metadata: dict[str, str]
    durations: dict[str, float] = field(default_factory=dict)
    fd: int | None = None  # ``keep_fd``: the file as it verified, read-only (the caller closes it)


_ERRNO_REASONS = {
    errno.ENOSPC: FailReason.NO_SPACE,
    errno.EDQUOT: FailReason.NO_SPACE,
    errno.EROFS: FailReason.READ_ONLY,
    errno.EACCES: FailReason.PERMISSION,
    errno.EPERM: FailReason.PERMISSION,
    errno.ENOENT: FailReason.TARGET_MISSING,
}


def reason_for(exc: OSError) -> FailReason:
    """The failure reason label for an OS error."""
    return _ERRNO_REASONS.get(exc.errno or 0, FailReason.IO_ERROR)


def temp_name(filename: str) -> str:
    return f".{filename}{TEMP_MARK}{os.getpid()}.{secrets.token_hex(4)}"


def persist(
    fd: int,
    length: int,
    directory: str,
    filename: str,
    *,
    dir_fd: int | None = None,
    expect: Mapping[str, str] | None = None,
    dedup: bool = False,
    keep_fd: bool = False,
) -> Persisted:
    """Persist the snapshot in ``fd`` (length bytes) as ``directory/filename``.

    ``dir_fd``: the directory, already opened safely by the caller (``safepath``), which
    keeps it; ``expect``: header fields the snapshot must carry (a daemon checks that a
    client's snapshot is the job and step it claims) before a byte is written; ``dedup``: a
    job's directory, whose newest checkpoint may already hold some tensors (``ckptd.disk.dedup``).
    A file of the same name that a checkpoint refers to (a step saved again: a retried final
    save, a save the daemon persisted just before it died) is kept as it is, not replaced:
    replacing it would break what refers to it. ``keep_fd``: the result carries the fd the new
    file verified through (its upload reads what verified, whatever the name points to later).
    """
    if "/" in filename or filename in ("", ".", ".."):
        raise PersistError(FailReason.INVALID_TARGET, f"invalid checkpoint file name {filename!r}")
    t0 = time.monotonic()
    header = seal(fd, length)
    wrong = {k: header.metadata.get(k) for k, v in (expect or {}).items() if header.metadata.get(k) != v}
    if wrong:
        raise PersistError(
            FailReason.INVALID_SNAPSHOT,
            f"snapshot says {wrong}, the request says { {k: expect[k] for k in wrong} if expect else {} }",
        )
    dfd = dir_fd if dir_fd is not None else _open_dir(directory)
    try:
        kept = _keep_referenced(dfd, directory, filename, header)
        if kept is not None:
            return kept
        tmp = temp_name(filename)
        kept_fd: list[int] = []
        try:
            header, length = _write_new_bytes(fd, length, header, dfd, tmp, filename if dedup else None)
            t1 = time.monotonic()
            result = _verify_temp(dfd, tmp, directory, kept_fd if keep_fd else None)
            if not result.ok:
                raise PersistError(
                    FailReason.VERIFY_FAILED, f"{directory}/{filename}: read-back failed: {result.reason}"
                )
            missing = (
                check_refs(header.metadata, opener_at(dir_fd=dfd), full=False) if REFS_KEY in header.metadata else ""
            )
            if missing:  # a tensor it refers to instead of storing is not where it says
                raise PersistError(FailReason.VERIFY_FAILED, f"{directory}/{filename}: {missing}")
            os.rename(tmp, filename, src_dir_fd=dfd, dst_dir_fd=dfd)
            os.fsync(dfd)
        except OSError as exc:
            _unlink_quietly(dfd, tmp)
            _close_all(kept_fd)
            raise PersistError(
                reason_for(exc), f"writing {directory}/{filename} failed: {exc.strerror or exc}"
            ) from None
        except PersistError:
            _unlink_quietly(dfd, tmp)
            _close_all(kept_fd)
            raise
    finally:
        if dir_fd is None:
            os.close(dfd)
    t2 = time.monotonic()
    return Persisted(
        os.path.join(directory, filename),
        length,
        header.metadata,
        {"persist": t1 - t0, "verify": t2 - t1},
        kept_fd[0] if kept_fd else None,
    )


def _keep_referenced(dfd: int, directory: str, filename: str, header: Header) -> Persisted | None:
    """The existing file of this name, when the new save cannot replace it (a checkpoint on disk, or
    the new snapshot itself, refers to it) and it verifies as this very save (the same job and step):
    the save is already there, and replacing it would break the references.

    Only a file the job's directory itself holds counts: opened once relative to its fd, never
    through a link, a regular file with one link owned by the directory's owner (or written by this
    process), and verified from that same fd with its references. Anything else under the name (a
    symlink to another user's checkpoint, a FIFO, a hard link) is never kept: the new file replaces
    it (a rename replaces the entry, it never follows it), or, when the snapshot refers to that
    name, the save is refused because what it refers to is not there. The snapshot's references
    (the client wrote them) only ever say "do not replace"; they never make anything trusted.
    """
    try:
        st = os.stat(filename, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    own = [r.file for r in decode(header.metadata).values()]
    if not _own_file(st, os.fstat(dfd).st_uid):
        if filename in own:  # what it refers to would be gone once it replaced this entry
            raise PersistError(
                FailReason.VERIFY_FAILED,
                f"{directory}/{filename}: the snapshot refers to the file of "
                "its own name, and what has that name is not a checkpoint "
                "of the job's own (a link, or not a regular file)",
            )
        return None
    referring = list(own)
    for name in os.listdir(dfd):
        if name != filename and name.endswith(".safetensors") and not name.startswith("."):
            referring += holders(_header_of(dfd, name))
    if filename not in referring:
        return None
    path = os.path.join(directory, filename)
    with Opened(os.dup(dfd), directory) as opened:
        try:
            fd = opened.fd(filename)
            same_file = _own_file(os.fstat(fd), os.fstat(dfd).st_uid)
        except OSError:
            same_file = False
        existing = (
            verify_opened(opened, filename, path)
            if same_file
            else VerifyResult(path, False, "not a regular file of the job's own")
        )
    same = existing.metadata.get("ckptd.job") == header.metadata.get("ckptd.job") and existing.metadata.get(
        "ckptd.step"
    ) == header.metadata.get("ckptd.step")
    if not (existing.ok and same):
        raise PersistError(
            FailReason.VERIFY_FAILED,
            f"{path} is referred to by other checkpoints and cannot be "
            f"replaced: {existing.reason or 'another job or step'}",
        )
    return Persisted(path, existing.bytes, existing.metadata, {"persist": 0.0, "verify": 0.0})


def _own_file(st: os.stat_result, owner: int) -> bool:
    """A regular file with no other name, of the directory's owner or of this process (the writer)."""
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid in (owner, os.geteuid())


def _header_of(dfd: int, name: str) -> dict[str, str]:
    try:
        f, size = opener_at(dir_fd=dfd)(name)
        with f:
            return read_header(f, size).metadata
    except (OSError, FormatError):
        return {}


def _write_new_bytes(
    fd: int, length: int, header: Header, dfd: int, tmp: str, dedup_for: str | None
) -> tuple[Header, int]:
    """The snapshot as it is, or without the tensors the job's newest checkpoint already holds
    (``ckptd.disk.dedup``, when ``dedup_for`` names the file being written): then a header of its
    own, the rest copied after it. Returns the header and length of what was written."""
    if dedup_for is None:  # a rank's shard: its unit holds only its peers' files
        _write(fd, length, dfd, tmp)
        return header, length
    with mmap.mmap(fd, length, prot=mmap.PROT_READ) as mm:
        view = memoryview(mm)
        try:
            reused = find_reused(header, view, dfd, opener_at(dir_fd=dfd), dedup_for)
            if not reused.refs:
                _write(fd, length, dfd, tmp)
                return header, length
            new, kept, meta = reduced(header, reused)
            raw = encode_header(new, meta)
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dfd)
            try:
                os.pwrite(out, raw, 0)
                for n, e in zip(new, kept):
                    _pwrite_all(out, view[header.data_start + e.begin : header.data_start + e.end], len(raw) + n.begin)
                os.fsync(out)
                os.posix_fadvise(out, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(out)
        finally:
            view.release()
    result = Header(len(raw) - 8, tuple(new), meta)
    return result, result.total_len


def _pwrite_all(out: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        n = os.pwrite(out, data[done : done + DIRECT_CHUNK], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        done += n


def _open_dir(directory: str) -> int:
    try:
        return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise PersistError(reason_for(exc), f"cannot open checkpoint directory {directory}: {exc.strerror}") from None


def seal(fd: int, length: int) -> Header:
    """Validate the staged header and patch in the real digests (same byte length)."""
    if length < 8 or os.fstat(fd).st_size < length:
        raise PersistError(FailReason.INVALID_SNAPSHOT, f"snapshot buffer shorter than the stated {length} bytes")
    with mmap.mmap(fd, length) as mm:
        view = memoryview(mm)
        try:
            header = read_header_from_buffer(view, length)
            digests = {
                e.name: xxhash.xxh3_64_hexdigest(view[header.data_start + e.begin : header.data_start + e.end])
                for e in header.tensors
            }
            meta = dict(header.metadata)
            meta["ckptd.digests"] = json.dumps(digests, separators=(",", ":"))
            meta["ckptd.meta_digest"] = meta_digest(meta)
            new = encode_header(header.tensors, meta)
            if len(new) != header.data_start:
                raise PersistError(FailReason.INVALID_SNAPSHOT, "snapshot header has malformed digest placeholders")
            view[: len(new)] = new
        except FormatError as exc:
            raise PersistError(
                FailReason.INVALID_SNAPSHOT, f"snapshot is not a valid checkpoint image: {exc}"
            ) from None
        finally:
            view.release()
    return Header(header.header_len, header.tensors, meta)


DIRECT_CHUNK = 16 << 20


def _write(src_fd: int, length: int, dfd: int, tmp: str) -> None:
    """O_DIRECT from the page-aligned snapshot mapping where the filesystem allows it
    (no page-cache copy, nothing to evict), else sendfile; fsync either way."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        out = os.open(tmp, flags | os.O_DIRECT, 0o644, dir_fd=dfd)
        direct = True
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # tmpfs and friends refuse O_DIRECT
            raise
        out, direct = os.open(tmp, flags, 0o644, dir_fd=dfd), False
    try:
        done = _write_direct(out, src_fd, length) if direct else 0
        _sendfile(out, src_fd, done, length)
        os.fsync(out)
        os.posix_fadvise(out, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(out)


def _write_direct(out: int, src_fd: int, length: int) -> int:
    """Write the block-aligned prefix with O_DIRECT; returns how much was written."""
    aligned = length - length % 4096
    if aligned == 0:
        fcntl.fcntl(out, fcntl.F_SETFL, fcntl.fcntl(out, fcntl.F_GETFL) & ~os.O_DIRECT)
        return 0
    with mmap.mmap(src_fd, length, prot=mmap.PROT_READ) as mm:
        view = memoryview(mm)
        try:
            offset = 0
            while offset < aligned:
                n = os.pwrite(out, view[offset : min(aligned, offset + DIRECT_CHUNK)], offset)
                if n <= 0:
                    raise OSError(errno.EIO, "short write")
                offset += n
        finally:
            view.release()
    fcntl.fcntl(out, fcntl.F_SETFL, fcntl.fcntl(out, fcntl.F_GETFL) & ~os.O_DIRECT)  # the unaligned tail
    return aligned


def _sendfile(out: int, src_fd: int, offset: int, length: int) -> None:
    os.lseek(out, offset, os.SEEK_SET)  # sendfile writes at the file position; pwrite did not move it
    while offset < length:
        sent = os.sendfile(out, src_fd, offset, min(length - offset, 1 << 30))
        if sent == 0:
            raise OSError(errno.EIO, "snapshot ended early")
        offset += sent


def _verify_temp(dfd: int, tmp: str, directory: str, keep: list[int] | None = None) -> VerifyResult:
    fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    if keep is not None:
        keep.append(os.dup(fd))
    with os.fdopen(fd, "rb", buffering=0) as f:
        result = verify_open(f, os.path.join(directory, tmp))
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return result


def _close_all(fds: list[int]) -> None:
    while fds:
        os.close(fds.pop())


def _unlink_quietly(dfd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dfd)
    except OSError:
        pass


def cleanup_temp(directory: str, live_pids: frozenset[int] = frozenset()) -> list[str]:
    """Remove temp files left by writers that died (a pid not running, or not ours)."""
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if TEMP_MARK not in name:
            continue
        pid = _temp_pid(name)
        if pid is not None and (pid in live_pids or (pid != os.getpid() and _alive(pid))):
            continue
        try:
            os.unlink(os.path.join(directory, name))
            removed.append(name)
        except OSError:
            pass
    return removed


def _temp_pid(name: str) -> int | None:
    try:
        return int(name.split(TEMP_MARK, 1)[1].split(".")[0])
    except (IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

"""Versions of a checkpoint file that its trainer overwrites in place.

Minimind writes ``pretrain_64.pth`` and ``pretrain_64_resume.pth`` again at every save
(``torch.save`` to a temp file, then ``os.replace``): one name, no history, so a bad save
replaces the last good one and ``keep_last`` means nothing. A file whose name states no step
(``ckptd.foreign.steps``) is taken for such a file: each verified version is copied, as it
was verified, to ``DIR/ckptd-history/NAME/STEM-stepNNNNNNNN.EXT`` (the step read from the
file; its time when none is recorded), where watch mode adopts it as a checkpoint of its own,
under the tree's retention (each file's versions are a retention group of their own). The
file itself belongs to the trainer: it is never deleted by retention.

A copy, not a hard link: a trainer that rewrites the file in place (``torch.save(path)``
without a temp file) would rewrite a linked version too. The copy is made from a descriptor
opened without following links (its path checked through ``/proc/self/fd``: no directory on
the way swapped for a link), checked to be the version that was verified (size and mtime)
before and after, written to a temp name and renamed, owned and moded as the original is.
"""

from __future__ import annotations

import logging
import os
import stat
import time

from ckptd.foreign import formats as foreign
from ckptd.foreign.steps import step_from_name

log = logging.getLogger(__name__)

HISTORY_DIR = "ckptd-history"
KINDS = ("torch", "lightning", "safetensors")  # single-file formats a trainer can overwrite


def overwritten_in_place(found: foreign.Found) -> bool:
    """A single-file checkpoint whose name states no step: the trainer writes it again and again."""
    name = os.path.basename(found.path)
    return found.kind in KINDS and step_from_name(name) is None and HISTORY_DIR not in found.path.split(os.sep)


def version_name(found: foreign.Found) -> str:
    stem, ext = os.path.splitext(os.path.basename(found.path))
    if found.step is not None:
        return f"{stem}-step{found.step:08d}{ext}"
    when = time.strftime("%Y%m%dT%H%M%S", time.gmtime(found.mtime)) + f".{int(found.mtime * 1e6) % 1_000_000:06d}"
    return f"{stem}-{when}{ext}"


def keep_version(found: foreign.Found) -> str | None:
    """Copy the verified version of ``found`` into its history; its path, or None when that version
    is already kept or the file changed since it was verified (the next version will be)."""
    parent, name = os.path.split(found.path)
    src = os.open(found.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode) or not _same(st, found):
            return None
        if os.readlink(f"/proc/self/fd/{src}") != found.path:  # a directory on the way swapped for a link
            raise OSError(f"{found.path} is not where it was found (a link on its path?): not copied")
        dfd = _history_dir(parent, name, st)
        try:
            target = version_name(found)
            try:
                os.stat(target, dir_fd=dfd, follow_symlinks=False)
                return None  # this version is kept already
            except FileNotFoundError:
                pass
            if not _copy(src, dfd, target, st):
                return None
        finally:
            os.close(dfd)
    finally:
        os.close(src)
    return os.path.join(parent, HISTORY_DIR, name, target)


def _same(st: os.stat_result, found: foreign.Found) -> bool:
    return st.st_size == found.bytes and abs(st.st_mtime - found.mtime) < 1e-6


def _history_dir(parent: str, name: str, owner: os.stat_result) -> int:
    """``parent/ckptd-history/name``, made if missing, opened without following a link at any level."""
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    for part in (HISTORY_DIR, name):
        try:
            os.mkdir(part, 0o755, dir_fd=fd)
            _own(part, fd, owner)
        except FileExistsError:
            pass
        try:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        finally:
            os.close(fd)
        fd = nxt
    return fd


def _own(name: str, dfd: int, owner: os.stat_result) -> None:
    """As the trainer's user owns its file (when ckptd runs as root); otherwise ours, as made."""
    if os.geteuid() == 0:
        os.chown(name, owner.st_uid, owner.st_gid, dir_fd=dfd, follow_symlinks=False)


def _copy(src: int, dfd: int, target: str, st: os.stat_result) -> bool:
    tmp = f".{target}.ckptd-tmp.{os.getpid()}"
    out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dfd)
    try:
        offset = 0
        while offset < st.st_size:
            n = os.copy_file_range(src, out, st.st_size - offset, offset, offset)
            if n == 0:
                break
            offset += n
        os.fchmod(out, stat.S_IMODE(st.st_mode) & 0o666)  # readable by whom the original is, no more
        os.fsync(out)
        os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
        now = os.fstat(src)
        if offset != st.st_size or (now.st_size, now.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            raise OSError("the file changed while it was copied")
    except OSError as exc:
        os.close(out)
        os.unlink(tmp, dir_fd=dfd)
        log.warning("history: %s not kept: %s", target, exc)
        return False
    os.close(out)
    _own(tmp, dfd, st)
    os.rename(tmp, target, src_dir_fd=dfd, dst_dir_fd=dfd)
    os.fsync(dfd)
    return True

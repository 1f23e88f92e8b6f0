"""Following a checkpoint's references (``ckptd.core.refs``) to the files that hold the bytes.

A checkpoint with references is complete only when every tensor it references is present
and verified: its holder is a ckptd file of the same job beside it, the holder's header
lists a tensor of that name at those offsets, with that dtype, shape and digest, and (when
``full``) those bytes, read again, hash to the digest. ``persist`` checks the cheap part
before it renames a new file into place (the holder verified when it was written and a
final name is never rewritten); ``verify_file``, resume and ``ckptd verify`` re-read the bytes.
"""

from __future__ import annotations

import errno
import os
from typing import BinaryIO, Callable, Mapping

import xxhash

from ckptd.core.format import FormatError, read_header
from ckptd.core.refs import Ref, RefError, decode
from ckptd.disk.opened import open_file_at

__all__ = ["check_refs", "holders", "opener_at", "read_referenced"]

CHUNK = 8 << 20
Opener = Callable[[str], tuple[BinaryIO, int]]  # a holder's name -> (a readable file or stream, its size)


# A holder that cannot be opened as a regular file beside the unit: one answer for all of these, so
# that a reference (a symlink, a name in a directory the reader may not enter) tells nothing about
# what lies behind it (docs/security.md, "Reading what was verified").
_NOT_THERE = frozenset(
    {errno.ENOENT, errno.ELOOP, errno.EACCES, errno.EPERM, errno.EINVAL, errno.ENOTDIR, errno.EISDIR, errno.ENXIO}
)


def opener_at(directory: str | None = None, dir_fd: int | None = None) -> Opener:
    """Open a holder by name directly in ``directory`` (or below ``dir_fd``): a regular file, its
    last component never a link (``ckptd.disk.opened``). A reader that must copy what it verified
    passes a ``Opened.open`` instead, which opens each holder once."""

    def open_holder(name: str) -> tuple[BinaryIO, int]:
        if dir_fd is not None:
            fd = open_file_at(dir_fd, name)
        else:
            d = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fd = open_file_at(d, name)
            finally:
                os.close(d)
        return os.fdopen(fd, "rb", buffering=0), os.fstat(fd).st_size

    return open_holder


def holders(metadata: Mapping[str, str]) -> tuple[str, ...]:
    """The file names a header's references point into (none when it has none or they do not parse)."""
    try:
        return tuple(sorted({r.file for r in decode(metadata).values()}))
    except RefError:
        return ()


def check_refs(metadata: Mapping[str, str], open_holder: Opener, full: bool) -> str:
    """Why the references of a header do not resolve ("" when every one does)."""
    try:
        refs = decode(metadata)
    except RefError as exc:
        return str(exc)
    by_file: dict[str, list[tuple[str, Ref]]] = {}
    for name, r in refs.items():
        by_file.setdefault(r.file, []).append((name, r))
    for file, wanted in sorted(by_file.items()):
        problem = _check_holder(file, wanted, open_holder, full, metadata.get("ckptd.job"))
        if problem:
            return problem
    return ""


def _check_holder(file: str, wanted: list[tuple[str, Ref]], open_holder: Opener, full: bool, job: str | None) -> str:
    try:
        f, size = open_holder(file)
        with f:
            header = read_header(f, size)
            if header.metadata.get("ckptd.job") != job:
                return f"referenced file {file} is not a checkpoint of job {job}"
            digests = header.meta_json("ckptd.digests", {}) or {}
            entries = {e.name: e for e in header.tensors}
            for name, r in wanted:
                e = entries.get(r.tensor)
                if (
                    e is None
                    or (e.begin, e.end) != r.offsets
                    or e.dtype != r.dtype
                    or tuple(e.shape) != r.shape
                    or digests.get(r.tensor) != r.digest
                ):
                    return f"tensor {name!r} refers to {file}:{r.tensor}, which does not hold it"
                if full and _hash(f, header.data_start + e.begin, e.nbytes) != r.digest:
                    return f"digest mismatch in tensor {name!r} (its bytes, in {file})"
    except KeyError:
        return _missing(file, wanted)
    except OSError as exc:
        if exc.errno in _NOT_THERE:
            return _missing(file, wanted)
        return f"referenced file {file} cannot be read: {exc.strerror or exc}"
    except (FormatError, ValueError) as exc:
        return f"referenced file {file} cannot be read: {getattr(exc, 'strerror', None) or exc}"
    return ""


def _missing(file: str, wanted: list[tuple[str, Ref]]) -> str:
    return (
        f"referenced file {file} is missing (no regular file of that name beside it that may be read; "
        f"it holds {len(wanted)} of this checkpoint's tensors)"
    )


def _hash(f: BinaryIO, start: int, n: int) -> str:
    h = xxhash.xxh3_64()
    f.seek(start)
    while n > 0:
        chunk = f.read(min(CHUNK, n))
        if not chunk:
            raise FormatError("file truncated inside a referenced tensor")
        h.update(chunk)
        n -= len(chunk)
    return h.hexdigest()


def read_referenced(r: Ref, open_holder: Opener) -> bytes:
    """The bytes of one referenced tensor (what a loader turns into a tensor)."""
    f, size = open_holder(r.file)
    with f:
        header = read_header(f, size)
        f.seek(header.data_start + r.offsets[0])
        data = f.read(r.nbytes)
    if len(data) != r.nbytes:
        raise FormatError(f"{r.file} is truncated inside {r.tensor!r}")
    return data

"""Tensors unchanged since the job's newest checkpoint, found by their bytes (SPEC §13).

The hook leaves out the frozen parameters it can tell are unchanged (same storage, same version
counter). Everything else is compared here, at persist time, after the digests are computed: a
tensor of the new snapshot whose name, dtype, shape and xxh3-64 equal those of a tensor that the
job's newest checkpoint holds (or refers to) is compared byte for byte with those bytes on disk
and, when equal, not written: the new file refers to the file that holds them. That covers what
the version counter cannot see, such as a frozen base loaded again by ``resume()`` (its counter
moved, its bytes did not) and buffers that did not change. Small tensors are always written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import BinaryIO

from ckptd.core.format import Header, TensorEntry, layout, meta_digest, read_header
from ckptd.core.refs import REFS_KEY, Ref, RefError, decode, encode
from ckptd.disk.refs import Opener

__all__ = ["MIN_BYTES", "Reused", "find_reused", "reduced"]

MIN_BYTES = 64 << 10  # below this a reference costs about what the bytes do
CHUNK = 8 << 20
SUFFIX = ".safetensors"


@dataclass(frozen=True)
class Reused:
    """What the new file refers to instead of storing: name -> where the equal bytes are."""

    refs: dict[str, Ref]


def find_reused(header: Header, snapshot: memoryview, dir_fd: int, open_at: Opener, target: str) -> Reused:
    """Compare the snapshot's tensors with the job's newest checkpoint in the directory other than
    ``target`` (the name being written: a file about to be replaced is nobody's holder)."""
    job = header.metadata.get("ckptd.job")
    known = _known(dir_fd, job, open_at, target) if job else {}
    if not known:
        return Reused({})
    digests = header.meta_json("ckptd.digests", {}) or {}
    out: dict[str, Ref] = {}
    holders = _Holders(open_at)
    try:
        for e in header.tensors:
            r = known.get(e.name)
            if (
                r is not None
                and e.nbytes >= MIN_BYTES
                and r.digest == digests.get(e.name)
                and r.dtype == e.dtype
                and r.shape == tuple(e.shape)
                and holders.same_bytes(snapshot, header.data_start + e.begin, r)
            ):
                out[e.name] = r
    finally:
        holders.close()
    return Reused(out)


def _known(dir_fd: int, job: str, open_at: Opener, target: str) -> dict[str, Ref]:
    """Name -> where the newest checkpoint of ``job`` here has that tensor's bytes (held or referenced)."""
    newest = _newest_file(dir_fd, target)
    if newest is None:
        return {}
    try:
        f, size = open_at(newest)
        with f:
            header = read_header(f, size)
        if header.metadata.get("ckptd.job") != job:
            return {}
        digests = header.meta_json("ckptd.digests", {}) or {}
        out = {
            e.name: Ref(newest, e.name, (e.begin, e.end), str(digests[e.name]), e.dtype, tuple(e.shape))
            for e in header.tensors
            if e.nbytes >= MIN_BYTES and e.name in digests
        }
        out.update(decode(header.metadata))  # what it refers to: the same holders, still valid
        return {name: r for name, r in out.items() if r.file != target}
    except (OSError, ValueError, RefError):
        return {}


def _newest_file(dir_fd: int, target: str) -> str | None:
    """The newest final-named checkpoint file here but ``target`` (a final name means verified)."""
    best: tuple[float, str] | None = None
    for name in os.listdir(dir_fd):
        if name.startswith(".") or not name.endswith(SUFFIX) or name == target:
            continue
        try:
            when = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mtime
        except OSError:
            continue
        if best is None or (when, name) > best:
            best = (when, name)
    return best[1] if best else None


class _Holders:
    """The files compared against, each opened and its header read once (a base is many tensors)."""

    def __init__(self, open_at: Opener) -> None:
        self._open_at = open_at
        self._open: dict[str, tuple[BinaryIO, int] | None] = {}

    def same_bytes(self, snapshot: memoryview, start: int, r: Ref) -> bool:
        """Byte for byte: equal digests are not taken on trust (a collision would be silent)."""
        held = self._file(r.file)
        if held is None:
            return False
        f, data_start = held
        try:
            f.seek(data_start + r.offsets[0])
            done = 0
            while done < r.nbytes:
                chunk = f.read(min(CHUNK, r.nbytes - done))
                if not chunk or chunk != snapshot[start + done : start + done + len(chunk)]:
                    return False
                done += len(chunk)
            return True
        except OSError:
            return False

    def _file(self, name: str) -> tuple[BinaryIO, int] | None:
        if name not in self._open:
            try:
                f, size = self._open_at(name)
            except OSError:
                self._open[name] = None
                return None
            try:
                self._open[name] = (f, read_header(f, size).data_start)
            except (OSError, ValueError):
                f.close()
                self._open[name] = None
        return self._open[name]

    def close(self) -> None:
        for held in self._open.values():
            if held is not None:
                held[0].close()


def reduced(header: Header, reused: Reused) -> tuple[list[TensorEntry], list[TensorEntry], dict[str, str]]:
    """(the entries the new file keeps, laid out anew; the same entries where the snapshot has them;
    its metadata, with the references added and the metadata digest sealed again)."""
    kept = [e for e in header.tensors if e.name not in reused.refs]
    new = layout([(e.name, e.dtype, tuple(e.shape)) for e in kept])
    meta = dict(header.metadata)
    meta[REFS_KEY] = encode({**decode(meta), **reused.refs})
    digests = header.meta_json("ckptd.digests", {}) or {}
    meta["ckptd.digests"] = json.dumps({e.name: digests[e.name] for e in kept}, separators=(",", ":"))
    meta["ckptd.meta_digest"] = meta_digest(meta)
    return new, kept, meta

"""Verification: a checkpoint counts only after every tensor's bytes are read back.

Streaming on purpose: the file is read once, sequentially, in fixed-size chunks, and
each tensor's xxh3-64 is fed across chunk boundaries, so verifying a 4 GiB checkpoint
needs a few MiB of memory, not 4 GiB. Nothing here imports torch: ckptd files carry
their own digests, and the structural checks (header bounds, offsets, sizes) are the
ones safetensors applies when it loads.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO, Collection

import xxhash

from ckptd.core.format import (
    DIGEST_PLACEHOLDER,
    FORMAT_VERSION,
    FormatError,
    Header,
    meta_digest,
    read_header,
)
from ckptd.core.refs import REFS_KEY, RefError, decode
from ckptd.core.vocab import Outcome
from ckptd.disk import manifest as mf
from ckptd.disk.opened import Opened, unreadable
from ckptd.disk.refs import check_refs

CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class VerifyResult:
    """The outcome for one path; ``reason`` is the first problem found, in words."""

    path: str
    ok: bool
    reason: str = ""
    tensors: int = 0
    bytes: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    unsafe: bool = False  # not loaded: it would need code execution (a pickle's globals)

    @property
    def outcome(self) -> Outcome:
        return Outcome.OK if self.ok else Outcome.UNSAFE if self.unsafe else Outcome.CORRUPT

    def to_json(self) -> dict[str, object]:
        return {
            "path": self.path,
            "ok": self.ok,
            "outcome": str(self.outcome),
            "reason": self.reason,
            "tensors": self.tensors,
            "bytes": self.bytes,
            "job": self.metadata.get("ckptd.job"),
            "step": _int_or_none(self.metadata.get("ckptd.step")),
        }


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value is not None and value.lstrip("-").isdigit() else None


def digest_map(header: Header) -> dict[str, str]:
    """The recorded digests, checked to cover every tensor with a real value."""
    if header.metadata.get("ckptd.format") != FORMAT_VERSION:
        raise FormatError(f"ckptd.format is {header.metadata.get('ckptd.format')!r}, expected {FORMAT_VERSION!r}")
    try:
        digests = header.meta_json("ckptd.digests", {})
    except json.JSONDecodeError:
        raise FormatError("ckptd.digests metadata is not valid JSON") from None
    if not isinstance(digests, dict):
        raise FormatError("ckptd.digests metadata is not an object")
    for e in header.tensors:
        d = digests.get(e.name)
        if not isinstance(d, str) or len(d) != 16 or d == DIGEST_PLACEHOLDER:
            raise FormatError(f"no digest recorded for tensor {e.name!r}")
    return digests


def compute_digests(f: BinaryIO, header: Header) -> dict[str, str]:
    """xxh3-64 of every tensor, reading the data section once from ``f``."""
    out: dict[str, str] = {}
    f.seek(header.data_start)
    pos = 0
    for e in header.tensors:
        h = xxhash.xxh3_64()
        while pos < e.end:
            chunk = f.read(min(CHUNK, e.end - pos))
            if not chunk:
                raise FormatError(f"file truncated inside tensor {e.name!r}")
            h.update(chunk)
            pos += len(chunk)
        out[e.name] = h.hexdigest()
    return out


def verify_file(path: str | os.PathLike[str]) -> VerifyResult:
    """Verify one safetensors file (or sharded unit); never raises for a bad file, only reports it.
    The file and its holders are opened once each, without following a link (``verify_opened``)."""
    p = os.fspath(path)
    if mf.is_unit(p):
        return verify_unit(p)
    try:
        with Opened.beside(p) as opened:
            return verify_opened(opened, os.path.basename(p), p)
    except OSError as exc:
        return VerifyResult(p, False, unreadable(exc, p))


def verify_opened(opened: Opened, name: str, label: str) -> VerifyResult:
    """Verify ``name`` below ``opened``, references followed through the same ``opened``: the fds it
    leaves open are the verified ones, and a reader that goes on from them (an export's copy)
    reads what was verified, whatever has become of the names since."""
    try:
        f, _ = opened.open(name)
    except OSError as exc:
        return VerifyResult(label, False, unreadable(exc, label))
    with f:
        result = verify_open(f, label)
    if result.ok and REFS_KEY in result.metadata:  # complete only with every tensor it references
        problem = check_refs(result.metadata, opened.open, full=True)
        if problem:
            return replace(result, ok=False, reason=problem)
    return result


def verify_open(f: BinaryIO, label: str) -> VerifyResult:
    """Verify an already-open file (the persister opens its temp file by dir fd)."""
    try:
        header = read_header(f, os.fstat(f.fileno()).st_size)
        return _check(label, f, header)
    except FormatError as exc:
        return VerifyResult(label, False, str(exc))
    except OSError as exc:
        return VerifyResult(label, False, f"cannot read: {exc.strerror or exc}")


class ForwardStream:
    """A forward-only byte stream (an object store's response body) as the verifier reads a
    file: whole reads, and a seek only to where it already is (the verifier never goes back).
    As a context manager it closes the body (a referenced holder's header read)."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.pos = raw, 0

    def read(self, n: int) -> bytes:
        parts, want = [], n
        while want > 0 and (chunk := self.raw.read(want)):
            parts.append(chunk)
            want -= len(chunk)
        data = b"".join(parts)
        self.pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0 or pos != self.pos:
            raise OSError(f"a stream cannot seek from {self.pos} to {pos}")
        return pos

    def __enter__(self) -> "ForwardStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.raw.close()


def verify_stream(raw: Any, size: int, label: str) -> VerifyResult:
    """Verify a checkpoint read once from a stream of ``size`` bytes (a remote object), with
    the same checks as a local file: header, metadata digest, every tensor's digest."""
    try:
        f = ForwardStream(raw)
        return _check(label, f, read_header(f, size))  # type: ignore[arg-type]
    except FormatError as exc:
        return VerifyResult(label, False, str(exc))
    except OSError as exc:
        return VerifyResult(label, False, f"cannot read: {exc.strerror or exc}")


def _check(path: str, f: BinaryIO, header: Header) -> VerifyResult:
    expected = digest_map(header) if header.is_ckptd else None
    if expected is not None and header.metadata.get("ckptd.meta_digest") != meta_digest(header.metadata):
        return VerifyResult(
            path,
            False,
            "metadata digest mismatch (trainer state or tags altered)",
            len(header.tensors),
            header.total_len,
            header.metadata,
        )
    actual = compute_digests(f, header)
    if expected is not None:
        mismatch = _name_mismatch(path, header)
        if mismatch:
            return VerifyResult(path, False, mismatch, len(actual), header.total_len, header.metadata)
        for name, digest in actual.items():
            if expected[name] != digest:
                return VerifyResult(
                    path, False, f"digest mismatch in tensor {name!r}", len(actual), header.total_len, header.metadata
                )
        _check_aliases(header)
    return VerifyResult(path, True, "", len(actual), header.total_len, header.metadata)


_STEP_IN_NAME = re.compile(r"-step(\d+)")


def _name_mismatch(path: str, header: Header) -> str:
    """A file renamed or swapped with another: its name says one step, its header another."""
    m = _STEP_IN_NAME.search(os.path.basename(path))
    step = header.metadata.get("ckptd.step")
    if m and step is not None and step.isdigit() and int(m.group(1)) != int(step):
        return f"file name says step {int(m.group(1))} but its header says step {step} (swapped or renamed?)"
    return ""


def _check_aliases(header: Header) -> None:
    aliases = header.meta_json("ckptd.aliases", {})
    try:
        referenced = set(decode(header.metadata))  # a tied frozen weight is referenced, not stored
    except RefError as exc:
        raise FormatError(str(exc)) from None
    names = {e.name for e in header.tensors} | referenced
    if not isinstance(aliases, dict) or not all(v in names for v in aliases.values()):
        raise FormatError("ckptd.aliases names a tensor that is not stored")


def verify_unit(
    unit: str, full: Collection[int] | None = None, opened: Opened | None = None, whole: bool = False
) -> VerifyResult:
    """A sharded checkpoint: the manifest, then every shard against it.

    Shards whose rank is in ``full`` (all when None) are re-read tensor by tensor;
    the others get the cheap checks (size, header, metadata digest, job, step), which
    is what a resuming rank needs for its peers' shards and the daemon for a commit
    whose shards their writers already verified from disk. ``opened``: the unit's directory, whose
    shard fds are the verified ones after this (an export reads them); else opened here.

    With node-local directories a host's copy holds its own ranks' shards (``manifest.away``):
    the others may be absent, and the result names them (``ckptd.shards_elsewhere``), unless
    ``whole`` (a fetched or exported unit must hold every shard) or the rank is named in an
    explicit ``full`` (a resuming rank's own shard must be here).
    """
    if opened is None:
        try:
            with Opened.at(unit, nofollow=True) as own:
                return verify_unit(unit, full, own, whole)
        except OSError as exc:
            return VerifyResult(unit, False, unreadable(exc, unit))
    try:
        m = mf.read(opened.proc_path)  # the manifest of the unit opened, not of whatever has its name now
    except mf.ManifestError as exc:
        return VerifyResult(unit, False, str(exc))
    meta = {
        "ckptd.job": m.job,
        "ckptd.step": str(m.step),
        "ckptd.world_size": str(m.world_size),
        "ckptd.layout": m.layout,
    }
    tensors = total = 0
    away = set() if whole else {r for r in mf.away(m, _names(opened)) if full is None or r not in full}
    skipped = []
    for shard in m.shards:
        if shard.rank in away:
            skipped.append(shard.rank)  # on its own host's disk; the rank that loads it checks it there
            continue
        r = _verify_shard(opened, shard, m, full is None or shard.rank in full, os.path.join(unit, shard.file))
        if not r.ok:
            return VerifyResult(unit, False, f"shard {shard.file}: {r.reason}", tensors, total, meta)
        tensors, total = tensors + r.tensors, total + r.bytes
    if skipped:
        meta["ckptd.shards_elsewhere"] = ",".join(str(r) for r in skipped)
    return VerifyResult(unit, True, "", tensors, total, meta)


def _names(opened: Opened) -> list[str]:
    try:
        return os.listdir(opened.dir_fd)
    except OSError:
        return []


def _verify_shard(opened: Opened, shard: mf.Shard, m: mf.Manifest, full: bool, path: str) -> VerifyResult:
    try:
        f, size = opened.open(shard.file)
        with f:
            if size != shard.bytes:
                return VerifyResult(path, False, f"{size} bytes, the manifest says {shard.bytes}")
            header = read_header(f, size)
            meta = header.metadata
            if meta.get("ckptd.meta_digest") != shard.meta_digest:
                return VerifyResult(path, False, "not the shard the manifest committed (metadata digest differs)")
            if meta.get("ckptd.job") != m.job or meta.get("ckptd.step") != str(m.step):
                return VerifyResult(
                    path,
                    False,
                    f"header says job {meta.get('ckptd.job')!r} step "
                    f"{meta.get('ckptd.step')}, the manifest {m.job!r} step {m.step}",
                )
            if full:
                return _check(path, f, header)
            if meta_digest(meta) != shard.meta_digest:
                return VerifyResult(path, False, "metadata digest mismatch (trainer state or tags altered)")
            return VerifyResult(path, True, "", len(header.tensors), size, meta)
    except FormatError as exc:
        return VerifyResult(path, False, str(exc))
    except OSError as exc:
        return VerifyResult(path, False, f"cannot read: {exc.strerror or exc}")

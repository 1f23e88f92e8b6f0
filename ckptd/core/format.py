"""The on-disk checkpoint format: a plain safetensors file with ckptd metadata.

Layout (the safetensors contract): an 8-byte little-endian header length N, N bytes
of JSON (tensor name -> dtype/shape/data_offsets, plus a ``__metadata__`` map of
strings), then the tensor bytes, back to back. ckptd adds, inside ``__metadata__``:

- ``ckptd.format``  format version (``"1"``)
- ``ckptd.job``, ``ckptd.step``, ``ckptd.epoch``, ``ckptd.created`` (UTC ISO 8601),
  ``ckptd.trigger``, ``ckptd.rule`` (the policy rule that made the save)
- ``ckptd.metrics``  JSON object of the metrics last reported by the trainer
- ``ckptd.state``    JSON skeleton of the trainer state: every non-tensor leaf, and a
  reference for each tensor (see ``trainer_hooks._state.state``)
- ``ckptd.aliases``  JSON ``{alias: stored_name}`` for tied weights stored once
- ``ckptd.digests``  JSON ``{tensor: xxh3-64 hex}`` over each tensor's bytes
- ``ckptd.meta_digest``  xxh3-64 over all the other metadata (``meta_digest``), so a
  flipped bit in the trainer state or an RNG seed is caught like one in a tensor

This module is torch-free on purpose: the daemon parses and verifies headers that
arrive from untrusted clients and files, and must not pay for importing torch.
Every bound is checked before anything is allocated or read.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Mapping

FORMAT_VERSION = "1"
MAX_HEADER_BYTES = 100 * 1000 * 1000
MAX_TENSORS = 1 << 20  # tensors in one file: far past any model, well short of a header built to stall a reader
DIGEST_PLACEHOLDER = "0" * 16
METADATA_KEY = "__metadata__"

# safetensors dtype name -> bytes per element (the names safetensors itself uses).
DTYPE_SIZES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "C64": 8,
    "F8_E4M3": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2": 1,
    "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1,
}


class FormatError(ValueError):
    """A file or buffer that is not a well-formed safetensors checkpoint."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live, relative to the start of the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A parsed, bounds-checked header."""

    header_len: int
    tensors: tuple[TensorEntry, ...]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    @property
    def data_len(self) -> int:
        return self.tensors[-1].end if self.tensors else 0

    @property
    def total_len(self) -> int:
        return self.data_start + self.data_len

    @property
    def is_ckptd(self) -> bool:
        """Any ``ckptd.*`` key makes it ours: one flipped bit in "ckptd.format" must not turn
        a damaged file of ours into a "foreign" file whose digests nobody checks."""
        return any(k.startswith("ckptd.") for k in self.metadata)

    def meta_json(self, key: str, default: Any = None) -> Any:
        """A JSON-valued metadata entry; malformed JSON is a format problem, not a crash."""
        raw = self.metadata.get(key)
        if raw is None:
            return default
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise FormatError(f"metadata {key} is not valid JSON") from None


def meta_digest(metadata: Mapping[str, str]) -> str:
    """xxh3-64 over the canonical JSON of every metadata entry but this digest itself."""
    import xxhash

    body = {k: v for k, v in metadata.items() if k != "ckptd.meta_digest"}
    return xxhash.xxh3_64_hexdigest(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def layout(specs: list[tuple[str, str, tuple[int, ...]]]) -> list[TensorEntry]:
    """Assign data offsets, widest dtype first so every tensor is naturally aligned.

    The data section starts 8-byte aligned (``encode_header`` pads), so ordering by
    element size keeps each tensor aligned for a zero-copy typed view.
    """
    ordered = sorted(specs, key=lambda s: (-DTYPE_SIZES[s[1]], s[0]))
    entries, offset = [], 0
    for name, dtype, shape in ordered:
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        entries.append(TensorEntry(name, dtype, tuple(shape), offset, offset + nbytes))
        offset += nbytes
    return entries


def encode_header(entries: list[TensorEntry] | tuple[TensorEntry, ...], metadata: Mapping[str, str]) -> bytes:
    """The 8-byte length plus JSON header, padded with spaces to 8-byte alignment.

    Deterministic for a given input (key order preserved), which ``persist`` relies on
    to patch same-length digests into a header in place.
    """
    doc: dict[str, Any] = {METADATA_KEY: dict(metadata)}
    for e in entries:
        doc[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def header_length(prefix: bytes, file_size: int) -> int:
    """Decode and bound the 8-byte header length before anything is read past it."""
    if file_size < 8 or len(prefix) < 8:
        raise FormatError(f"file too short for a safetensors header ({file_size} bytes)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise FormatError(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if n > file_size - 8:
        raise FormatError(f"header length {n} runs past the end of the file ({file_size} bytes)")
    return int(n)


def untrusted_json(raw: bytes) -> Any:
    """JSON from another process or a file anyone may have written: every way it can fail is a
    ``ValueError`` naming the problem (bad UTF-8 or JSON, integers past 4300 digits, nesting
    deep enough to exhaust the stack), never another exception escaping to the caller."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"is not valid JSON: {str(exc)[:200]}") from None
    except RecursionError:
        raise ValueError("is JSON nested too deeply") from None


def parse_header(raw: bytes, header_len: int, file_size: int) -> Header:
    """Validate a header's JSON against the file it came from.

    Checks what safetensors checks (dtypes, shapes, contiguous non-overlapping
    offsets covering the data section exactly) and reports the first problem in
    words a user can act on.
    """
    try:
        doc = untrusted_json(raw)
    except ValueError as exc:
        raise FormatError(f"header {exc}") from None
    if not isinstance(doc, dict):
        raise FormatError("header is not a JSON object")
    if len(doc) > MAX_TENSORS + 1:
        raise FormatError(f"header lists {len(doc) - 1} tensors, more than the {MAX_TENSORS} allowed")
    metadata = _parse_metadata(doc.pop(METADATA_KEY, {}))
    entries = sorted((_parse_entry(k, v) for k, v in doc.items()), key=lambda e: (e.begin, e.end))
    expected = 0
    for e in entries:
        if e.begin != expected:
            kind = "overlaps the previous tensor" if e.begin < expected else "leaves a gap"
            raise FormatError(f"tensor {e.name!r} at offset {e.begin} {kind} (expected {expected})")
        expected = e.end
    data_len = file_size - 8 - header_len
    if expected != data_len:
        what = "truncated" if expected > data_len else "has trailing bytes"
        raise FormatError(f"file {what}: header describes {expected} data bytes, file holds {data_len}")
    return Header(header_len, tuple(entries), metadata)


def _parse_metadata(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise FormatError("__metadata__ must map strings to strings")
    return value


def _parse_entry(name: str, spec: Any) -> TensorEntry:
    if not isinstance(spec, dict):
        raise FormatError(f"tensor {name!r}: entry is not an object")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:  # a list here must not raise TypeError
        raise FormatError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise FormatError(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise FormatError(f"tensor {name!r}: bad data_offsets {offsets!r}")
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise FormatError(
            f"tensor {name!r}: {offsets[1] - offsets[0]} bytes stored, shape {shape} of {dtype} needs {nbytes}"
        )
    return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def read_header(f: Any, file_size: int) -> Header:
    """Read and validate the header of an open binary file positioned anywhere."""
    f.seek(0)
    n = header_length(f.read(8), file_size)
    raw = f.read(n)
    if len(raw) != n:
        raise FormatError(f"file truncated inside the header ({len(raw)} of {n} bytes)")
    return parse_header(raw, n, file_size)


def read_header_from_buffer(buf: memoryview | bytes, size: int) -> Header:
    """Same validation over an in-memory buffer (a shared-memory snapshot)."""
    n = header_length(bytes(buf[:8]), size)
    return parse_header(bytes(buf[8 : 8 + n]), n, size)

"""References to tensors stored once (SPEC §13): what a checkpoint records instead of bytes
it would write again.

A tensor whose bytes a verified checkpoint of the same job already holds (a frozen base
under a LoRA adapter) is not written again: the new file's header lists it under
``ckptd.refs`` with its digest, dtype, shape, and where the bytes are: the holder's file
name (in the same directory), the tensor's name there, and its data offsets. A reference
always points at the file that physically holds the bytes, never at another reference, so
resolving one is one read. The file stays a valid safetensors file of the tensors it does
hold; ckptd's readers (verify, resume, export, retention) follow the references.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["REFS_KEY", "Ref", "RefError", "decode", "encode"]

REFS_KEY = "ckptd.refs"


class RefError(ValueError):
    """A ``ckptd.refs`` entry that does not parse or names a file outside the directory."""


@dataclass(frozen=True)
class Ref:
    file: str  # the holder, a file name in the same directory
    tensor: str  # the tensor's name in the holder
    offsets: tuple[int, int]  # its data offsets there (safetensors' data_offsets)
    digest: str  # xxh3-64 of its bytes
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "tensor": self.tensor,
            "offsets": list(self.offsets),
            "digest": self.digest,
            "dtype": self.dtype,
            "shape": list(self.shape),
        }


def encode(refs: Mapping[str, Ref]) -> str:
    return json.dumps({name: r.to_json() for name, r in sorted(refs.items())}, separators=(",", ":"))


def decode(metadata: Mapping[str, str]) -> dict[str, Ref]:
    """The references a header records (none for a file without any)."""
    text = metadata.get(REFS_KEY)
    if not text:
        return {}
    try:
        raw = json.loads(text)
        out = {}
        for name, r in raw.items():
            file = str(r["file"])
            if "/" in file or file.startswith(".") or not file.endswith(".safetensors"):
                raise RefError(f"reference of {name!r} names {file!r}, not a checkpoint file beside it")
            begin, end = (int(x) for x in r["offsets"])
            if not 0 <= begin <= end:
                raise RefError(f"reference of {name!r} has offsets {begin}..{end}")
            out[str(name)] = Ref(
                file,
                str(r["tensor"]),
                (begin, end),
                str(r["digest"]),
                str(r["dtype"]),
                tuple(int(x) for x in r["shape"]),
            )
        return out
    except RefError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RefError(f"{REFS_KEY} is malformed: {exc}") from None

"""Does a checkpoint fit the model it is asked to load into (issue 17 #4)? A fingerprint of the
model's tensor names, dtypes and shapes is in every header; when it differs, the first tensor
that does not fit is named, before anything is loaded."""

from __future__ import annotations

import json
import os

from trainer_hooks._state.state import TORCH_TO_ST, Flat

Structure = dict[str, tuple[str, tuple[int, ...]]]


def model_structure(flat: Flat) -> Structure:
    """Names, dtypes and shapes of the model's tensors as a checkpoint of it stores them."""
    return {n: (TORCH_TO_ST[t.dtype], tuple(t.shape)) for n, t in flat.tensors.items() if n.startswith("model/")}


def fingerprint(structure: Structure) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(sorted((n, d, list(s)) for n, (d, s) in structure.items())).encode()).hexdigest()[
        :32
    ]


def structure_problem(ours: Structure, path: str) -> str:
    """Why the checkpoint at ``path`` does not fit a model of structure ``ours`` ("" if it does)."""
    from ckptd.core.format import read_header
    from ckptd.core.meta import FINGERPRINT

    with open(path, "rb") as f:
        header = read_header(f, os.fstat(f.fileno()).st_size)
    if header.metadata.get(FINGERPRINT) == fingerprint(ours):
        return ""
    from ckptd.core.refs import decode

    theirs = {e.name: (e.dtype, tuple(e.shape)) for e in header.tensors if e.name.startswith("model/")}
    theirs.update({n: (r.dtype, r.shape) for n, r in decode(header.metadata).items() if n.startswith("model/")})
    for name in sorted(set(ours) | set(theirs)):
        if name not in theirs:
            return f"it has no tensor {name!r}"
        if name not in ours:
            return f"it has a tensor {name!r} the model does not"
        if ours[name] != theirs[name]:
            return (
                f"{name!r} is {theirs[name][0]}{list(theirs[name][1])} there, {ours[name][0]}{list(ours[name][1])} here"
            )
    return ""

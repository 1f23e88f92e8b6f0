"""Reading a ckptd checkpoint back into the nested training state: its tensors, the tensors it
refers to in the files that hold them (SPEC §13), and the JSON skeleton they go back into."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from trainer_hooks._state.state import unflatten


def load(path: str, via: str | None = None) -> dict[str, Any]:
    """The nested state stored in a ckptd checkpoint (tensors on CPU). ``via``: the name to open
    it by instead (``/proc/self/fd/N`` of a file already opened and checked); the files it refers
    to are beside ``path``."""
    from safetensors import safe_open

    with safe_open(via or path, framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors.update(load_referenced(path, meta))
    skeleton = json.loads(meta.get("ckptd.state", "null"))
    aliases = json.loads(meta.get("ckptd.aliases", "{}"))
    state: dict[str, Any] = unflatten(skeleton, tensors, aliases)
    return state


def load_referenced(path: str, meta: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint refers to instead of storing (SPEC §13), from the files beside it
    that hold them; each holder opened once."""
    from safetensors import safe_open

    from ckptd.core.refs import decode

    by_file: dict[str, dict[str, str]] = {}
    for name, r in decode(meta).items():
        by_file.setdefault(r.file, {})[name] = r.tensor
    out: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        with safe_open(os.path.join(os.path.dirname(path), file), framework="pt") as f:
            out.update({name: f.get_tensor(there) for name, there in names.items()})
    return out

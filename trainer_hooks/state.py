"""Training state <-> (flat tensors, JSON skeleton): what a checkpoint holds.

A checkpoint is the nested state ``{"model", "optimizer", "scheduler", "rng",
"trainer", "extra"}``. ``flatten`` walks it and replaces each tensor by a reference
to a flat name (``optimizer/state/0/exp_avg``), so the tensors go into safetensors
and everything else (param groups, scheduler counters, RNG tuples, user ``extra``)
goes into one JSON skeleton in the metadata. Containers are tagged so that int
keys (optimizer state), tuples (RNG states, AdamW betas) and numpy arrays come back
as they went in: resuming must be bit-exact, not "close".

Tied weights share storage, which safetensors refuses: the second name becomes an
alias of the first and ``unflatten`` hands both names the same tensor again.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

import torch

try:  # numpy is optional for torch; its RNG is captured when it is there.
    import numpy as np
except ImportError:  # pragma: no cover - numpy ships with our test extras
    np = None  # type: ignore[assignment]


class StateError(TypeError):
    """A value in the training state that cannot be checkpointed, named by its path."""


def _dtype_table() -> dict[torch.dtype, str]:
    names = {
        "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
        "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
        "uint16": "U16", "uint32": "U32", "uint64": "U64", "bool": "BOOL", "complex64": "C64",
        "float8_e4m3fn": "F8_E4M3", "float8_e4m3fnuz": "F8_E4M3FNUZ",
        "float8_e5m2": "F8_E5M2", "float8_e5m2fnuz": "F8_E5M2FNUZ", "float8_e8m0fnu": "F8_E8M0",
    }
    return {getattr(torch, k): v for k, v in names.items() if hasattr(torch, k)}


TORCH_TO_ST: dict[torch.dtype, str] = _dtype_table()
ST_TO_TORCH: dict[str, torch.dtype] = {v: k for k, v in TORCH_TO_ST.items()}


def capture(model: Any = None, optimizer: Any = None, scheduler: Any = None,
            extra: dict[str, Any] | None = None, trainer: dict[str, Any] | None = None,
            generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """The nested state of one checkpoint; RNG states always included, and those of the
    generators the trainer hands in (a sampler's ``generator=``), by name."""
    state: dict[str, Any] = {"trainer": trainer or {}, "rng": rng_state()}
    if generators:
        state["rng"]["generators"] = {name: g.get_state() for name, g in generators.items()}
    if model is not None:
        state["model"] = model.state_dict()
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if extra:
        state["extra"] = extra
    return state


def rng_state() -> dict[str, Any]:
    out: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if np is not None:
        out["numpy"] = np.random.get_state()
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(rng: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    for name, g in (generators or {}).items():
        if name in rng.get("generators", {}):
            g.set_state(rng["generators"][name])
    if "python" in rng:
        random.setstate(rng["python"])
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "numpy" in rng and np is not None:
        np.random.set_state(rng["numpy"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


class Flat:
    """The result of ``flatten``: stored tensors, aliases and the JSON skeleton."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.aliases: dict[str, str] = {}
        self._views: dict[tuple[Any, ...], str] = {}

    def add(self, path: str, t: torch.Tensor) -> str:
        if t.layout != torch.strided or t.is_quantized:
            raise StateError(f"{path}: {t.layout} tensors cannot be checkpointed; convert to dense")
        if t.dtype not in TORCH_TO_ST:
            raise StateError(f"{path}: dtype {t.dtype} is not supported by safetensors")
        name = path
        while name in self.tensors or name in self.aliases:
            name += "~"
        key = _view_key(t)
        if key is not None and key in self._views:
            self.aliases[name] = self._views[key]
            return name
        if key is not None:
            self._views[key] = name
        self.tensors[name] = t.detach()
        return name

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _view_key(t: torch.Tensor) -> tuple[Any, ...] | None:
    """Identity of a view: same storage, offset, shape, stride and dtype means same tensor."""
    if t.numel() == 0:
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


_SCALARS = (int, float, str, bool, type(None))


def flatten(state: Any) -> tuple[Flat, Any]:
    flat = Flat()
    return flat, _encode(state, "", flat)


def _encode(v: Any, path: str, flat: Flat) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, torch.Tensor):
        return {"$tensor": flat.add(path, v)}
    if np is not None and isinstance(v, np.ndarray):
        return {"$ndarray": flat.add(path, torch.from_numpy(np.ascontiguousarray(v)))}
    if np is not None and isinstance(v, np.generic):
        return v.item()
    if isinstance(v, torch.dtype):
        return {"$dtype": str(v).removeprefix("torch.")}
    if isinstance(v, dict):
        items = []
        for k, x in v.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise StateError(f"{path or '/'}: dict key {k!r} is not a string or integer")
            items.append([k, _encode(x, f"{path}/{k}" if path else str(k), flat)])
        return {"$dict": items}
    if isinstance(v, (list, tuple)):  # torch.Size is a tuple
        tag = "$list" if isinstance(v, list) else "$tuple"
        if all(type(x) in _SCALARS for x in v):  # fast path: RNG states are 625-int tuples
            return {tag: list(v)}
        return {tag: [_encode(x, f"{path}/{i}", flat) for i, x in enumerate(v)]}
    raise StateError(f"{path or '/'}: a {type(v).__name__} cannot be checkpointed; "
                     "use tensors, numbers, strings, lists and dicts")


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> Any:
    """Rebuild the nested state; every alias is the very tensor it aliases."""
    def tensor(name: str) -> torch.Tensor:
        return tensors[aliases.get(name, name)]

    def dec(v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        ((tag, x),) = v.items()
        if tag == "$tensor":
            return tensor(x)
        if tag == "$ndarray":
            return tensor(x).numpy()
        if tag == "$dtype":
            return getattr(torch, x)
        if tag == "$dict":
            return {k: dec(i) for k, i in x}
        if tag == "$list":
            return [dec(i) for i in x]
        if tag == "$tuple":
            return tuple(dec(i) for i in x)
        raise StateError(f"unknown tag {tag!r} in checkpoint skeleton")

    return dec(skeleton)


def apply(state: dict[str, Any], model: Any = None, optimizer: Any = None, scheduler: Any = None,
          generators: dict[str, torch.Generator] | None = None, strict: bool = True) -> None:
    """Load a restored state into the live objects, RNG last (loading may draw from it).
    ``strict=False``: a ``save="trainable"`` checkpoint, whose base the user's code loaded."""
    if model is not None and "model" in state:
        result = model.load_state_dict(state["model"], strict=strict)
        if not strict and result is not None and result.unexpected_keys:
            raise StateError(f"the checkpoint has tensors the model does not: {result.unexpected_keys[:5]}")
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    if "rng" in state:
        restore_rng(state["rng"], generators)


def rank_and_world() -> tuple[int, int]:
    """From torch.distributed when initialised, else torchrun's environment."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


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


def as_float(v: Any) -> float | None:
    if isinstance(v, torch.Tensor):
        return float(v.item()) if v.numel() == 1 else None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return None


def jsonable_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in metrics.items():
        f = as_float(v)
        out[str(k)] = f if f is not None else (v if isinstance(v, (str, bool, type(None))) else str(v))
    return out


# --- does a checkpoint fit the model it is asked to load into? (issue 17 #4) --------------

Structure = dict[str, tuple[str, tuple[int, ...]]]


def model_structure(flat: Flat) -> Structure:
    """Names, dtypes and shapes of the model's tensors as a checkpoint of it stores them."""
    return {n: (TORCH_TO_ST[t.dtype], tuple(t.shape)) for n, t in flat.tensors.items() if n.startswith("model/")}


def fingerprint(structure: Structure) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(sorted((n, d, list(s)) for n, (d, s) in structure.items())).encode()).hexdigest()[:32]


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
            return f"{name!r} is {theirs[name][0]}{list(theirs[name][1])} there, {ours[name][0]}{list(ours[name][1])} here"
    return ""

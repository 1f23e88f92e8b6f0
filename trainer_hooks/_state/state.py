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

from dataclasses import dataclass, field
from typing import Any

import torch

from trainer_hooks._state.rng import restore_rng, rng_state

try:  # numpy arrays in the state (a sampler's, a user's extra) come back as numpy arrays
    import numpy as np
except ImportError:  # pragma: no cover - numpy ships with our test extras
    np = None  # type: ignore[assignment]


@dataclass(frozen=True)
class TrainerObjects:
    """The trainer's live objects a checkpoint is captured from and loaded into, fixed when the
    ``Checkpointer`` is made. The snapshotter reads them at each ``step()`` and the resumer loads
    into them, so they travel together as one value, not as five arguments to each part."""

    model: Any = None
    optimizer: Any = None
    scheduler: Any = None
    extra: dict[str, Any] | None = None
    generators: dict[str, torch.Generator] = field(default_factory=dict)  # a sampler's, say: beside the global RNGs


class StateError(TypeError):
    """A value in the training state that cannot be checkpointed, named by its path."""


def _dtype_table() -> dict[torch.dtype, str]:
    names = {
        "float64": "F64",
        "float32": "F32",
        "float16": "F16",
        "bfloat16": "BF16",
        "int64": "I64",
        "int32": "I32",
        "int16": "I16",
        "int8": "I8",
        "uint8": "U8",
        "uint16": "U16",
        "uint32": "U32",
        "uint64": "U64",
        "bool": "BOOL",
        "complex64": "C64",
        "float8_e4m3fn": "F8_E4M3",
        "float8_e4m3fnuz": "F8_E4M3FNUZ",
        "float8_e5m2": "F8_E5M2",
        "float8_e5m2fnuz": "F8_E5M2FNUZ",
        "float8_e8m0fnu": "F8_E8M0",
    }
    return {getattr(torch, k): v for k, v in names.items() if hasattr(torch, k)}


TORCH_TO_ST: dict[torch.dtype, str] = _dtype_table()
ST_TO_TORCH: dict[str, torch.dtype] = {v: k for k, v in TORCH_TO_ST.items()}


def capture(
    model: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    extra: dict[str, Any] | None = None,
    trainer: dict[str, Any] | None = None,
    generators: dict[str, torch.Generator] | None = None,
) -> dict[str, Any]:
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
    raise StateError(
        f"{path or '/'}: a {type(v).__name__} cannot be checkpointed; use tensors, numbers, strings, lists and dicts"
    )


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


def apply(
    state: dict[str, Any],
    model: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    generators: dict[str, torch.Generator] | None = None,
    strict: bool = True,
) -> None:
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

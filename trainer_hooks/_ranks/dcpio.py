"""Sharded state that reshards (FSDP2, DTensor): torch.distributed.checkpoint plans, ckptd stores.

DCP's planners decide which chunk of which tensor each rank holds and writes, and which
chunks each rank reads back for this run's sharding, on any number of ranks. ckptd
supplies the storage side, so a save still goes through the lifecycle every sharded save
has (``trainer_hooks._ranks.shards``): snapshot, persist, verify, manifest last. Used when the
model's state holds ``DTensor``s; plain per-rank state (each rank its own tensors, as
tensor parallelism by hand) keeps the per-rank layout.

Lifecycle of one save, every rank, on the training thread, with no collective:

1. **Plan.** DCP's own local planner (``DefaultSavePlanner.create_local_plan``) flattens
   the state into DCP keys and computes this rank's chunk of each DTensor from its
   placements. DCP's global step, which gathers every plan to deduplicate replicated
   values, would cost four collectives per save (~12 ms on 2 CPU ranks, more than the
   copy itself); the same "one copy of each" is reached by rule instead (``_writes``):
   a chunk is written by the ranks at coordinate 0 of every mesh dimension it is
   replicated over, plain tensors and other values by rank 0.
2. **Resolve** each kept item without copying (``resolve_data``: a view of the local shard).
3. **Stage** (``Planned.header``, then the Checkpointer's staging buffer): the chunks and
   the rank's own state (RNG, progress, ``extra``) become one safetensors image in shared
   memory. Each tensor is named by its DCP key (``model.layers.0.weight``), its chunk
   offsets go under ``DCP_SHARDING_INFO``, the key torch's ``HuggingFaceStorageReader``
   reads, so a unit opens with ``dcp.load`` without ckptd. Non-tensor values (param
   groups, scheduler state) are JSON in ``ckptd.dcp``, never pickles.

Load: ``UnitReader`` (a ``StorageReader``) builds DCP's ``Metadata`` from the shard
headers; ``dcp.load`` plans the reads for this run's sharding, whatever the world size
that saved; ``set_state_dict`` puts the result into the FSDP2 model and optimizer.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, WriteItemType
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ckptd.core.meta import DCP, DCP_SHARDING_INFO, LAYOUT
from ckptd.disk import manifest as mf
from trainer_hooks._state.state import StateError, flatten, unflatten

__all__ = [
    "Planned",
    "has_dtensors",
    "plan_save",
    "load_unit",
    "global_state",
    "local_key",
    "local_bytes",
    "UnitReader",
]


def has_dtensors(state: Any) -> bool:
    """Does this state dict hold DTensors (FSDP2, tensor parallelism with DTensor)?"""
    from torch.distributed.tensor import DTensor

    values = state.values() if isinstance(state, dict) else []
    return any(isinstance(v, DTensor) or has_dtensors(v) for v in values)


def global_state(model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """The part of the state DCP plans: model and optimizer by fully qualified name (what
    ``get_state_dict`` gives for FSDP2, DDP or a plain module), and the scheduler."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {}
    if model is not None:
        state["model"] = get_model_state_dict(model)
        if optimizer is not None:
            state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    return state


def local_key(rank: int) -> str:
    """Where a rank's own state sits in its shard (tensor names must differ between the files)."""
    return f"ckptd.rank{rank:05d}"


def local_bytes(state: Any) -> int:
    """What this rank holds of ``state``: its local shard of each DTensor, plain tensors whole."""
    from torch.distributed.tensor import DTensor

    if isinstance(state, DTensor):
        return local_bytes(state.to_local())
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(local_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(local_bytes(v) for v in state)
    return 0


@dataclass
class Planned:
    """This rank's part of one save, as DCP planned it: chunks by DCP key, and plain values."""

    chunks: dict[str, torch.Tensor] = field(default_factory=dict)
    offsets: dict[str, list[int]] = field(default_factory=dict)
    sizes: dict[str, list[int]] = field(default_factory=dict)  # the whole tensor's shape
    objects: dict[str, Any] = field(default_factory=dict)

    def add_chunk(self, fqn: str, tensor: torch.Tensor, offsets: list[int], size: list[int]) -> None:
        if fqn in self.chunks:  # one file holds one chunk per name (a layout DCP's own readers share)
            raise StateError(f"{fqn}: this rank holds two chunks of it; ckptd stores one chunk per tensor and rank")
        self.chunks[fqn], self.offsets[fqn], self.sizes[fqn] = tensor, offsets, size

    def header(self, local: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Every tensor of the shard file, and the header keys that describe the DCP part."""
        objects, skeleton = flatten(self.objects)
        if objects.tensors:
            raise StateError(f"{next(iter(objects.tensors))}: a tensor inside a non-tensor value")
        tensors = {**self.chunks, **local}
        info = {name: {"saved_offsets": self.offsets.get(name, [0] * t.dim())} for name, t in tensors.items()}
        meta = {
            LAYOUT: mf.DCP,
            DCP_SHARDING_INFO: json.dumps(info, separators=(",", ":")),
            DCP: json.dumps({"sizes": self.sizes, "objects": skeleton}, separators=(",", ":")),
        }
        return tensors, meta


def plan_save(state: dict[str, Any], rank: int) -> Planned:
    """Steps 1-2 of the module docstring, on this rank alone (no collective)."""
    planner = DefaultSavePlanner()
    planner.set_up_planner(state, None, rank == 0)
    planned = Planned()
    for item in planner.create_local_plan().items:
        value = planner.state_dict[item.index.fqn]
        if not _writes(value, rank):
            continue
        if item.type == WriteItemType.BYTE_IO:
            planned.objects[item.index.fqn] = value
            continue
        data = planner.resolve_data(item)
        assert isinstance(data, torch.Tensor) and item.tensor_data is not None
        planned.add_chunk(
            item.index.fqn, data.detach(), list(item.tensor_data.chunk.offsets), list(item.tensor_data.size)
        )
    return planned


def _writes(value: Any, rank: int) -> bool:
    """One copy of everything, chosen by rule rather than by a collective: a DTensor's chunk by
    the ranks at coordinate 0 of each mesh dimension it is replicated over, all else by rank 0."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    if not isinstance(value, DTensor):
        return rank == 0
    coordinate = value.device_mesh.get_coordinate()
    if coordinate is None:
        return False  # not on this rank's part of the mesh
    if any(isinstance(p, Partial) for p in value.placements):
        raise StateError("a DTensor with a Partial placement holds partial sums; reduce it before saving")
    return all(c == 0 for c, p in zip(coordinate, value.placements) if isinstance(p, Replicate))


# -- load ---------------------------------------------------------------------------------------


class UnitReader(StorageReader):
    """DCP's ``Metadata`` from a committed unit's shard headers; reads chunks with safetensors."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit
        self._tensors: dict[MetadataIndex, tuple[str, str]] = {}  # -> (file, name)
        self._objects: dict[str, Any] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        from safetensors import safe_open

        entries: dict[str, Any] = {}
        for shard in mf.read(self.unit).shards:
            path = os.path.join(self.unit, shard.file)
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                info = json.loads(meta.get(DCP, "{}"))
                offsets = json.loads(meta.get(DCP_SHARDING_INFO, "{}"))
                for fqn, size in info.get("sizes", {}).items():
                    entry = entries.get(fqn)
                    part = f.get_slice(fqn)
                    dtype = part.get_dtype()
                    if entry is None:
                        entry = entries[fqn] = TensorStorageMetadata(
                            TensorProperties(dtype=_dtype(dtype)), torch.Size(size), []
                        )
                    at = torch.Size(offsets[fqn]["saved_offsets"])
                    entry.chunks.append(ChunkStorageMetadata(offsets=at, sizes=torch.Size(part.get_shape())))
                    self._tensors[MetadataIndex(fqn, at)] = (path, fqn)
                for fqn, value in unflatten(info.get("objects", {"$dict": []}), {}, {}).items():
                    entries.setdefault(fqn, BytesStorageMetadata())
                    self._objects.setdefault(fqn, value)
        return Metadata(state_dict_metadata=entries)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        from safetensors import safe_open

        by_file: dict[str, list[Any]] = {}
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                buf = io.BytesIO()
                torch.save(self._objects[item.storage_index.fqn], buf)  # JSON-decoded plain values
                buf.seek(0)
                planner.load_bytes(item, buf)
            else:
                by_file.setdefault(self._tensors[_key(item.storage_index)][0], []).append(item)
        for path, items in by_file.items():
            with safe_open(path, framework="pt") as f:
                for item in items:
                    fqn = item.storage_index.fqn
                    region = tuple(slice(o, o + n) for o, n in zip(item.storage_offsets, item.lengths))
                    src = f.get_slice(fqn)[region] if region else f.get_tensor(fqn)  # 0-d: AdamW's step
                    target = planner.resolve_tensor(item).detach()
                    target.copy_(src)
                    planner.commit_tensor(item, target)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return os.path.exists(os.path.join(checkpoint_id, mf.MANIFEST))


def _key(index: MetadataIndex) -> MetadataIndex:
    return MetadataIndex(index.fqn, index.offset)


def _dtype(name: str) -> torch.dtype:
    from trainer_hooks._state.state import ST_TO_TORCH

    try:
        return ST_TO_TORCH[name]
    except KeyError:
        raise StateError(f"dtype {name} in a shard header is not one ckptd writes") from None


def load_unit(unit: str, model: Any, optimizer: Any, scheduler: Any, group: Any) -> None:
    """Every rank: DCP's load planner maps the unit's chunks onto this run's sharding."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = global_state(model, optimizer, scheduler)
    dcp_load(state, storage_reader=UnitReader(unit), process_group=group)
    if model is not None:
        set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])

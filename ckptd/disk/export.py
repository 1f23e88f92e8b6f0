"""``ckptd export``: a checkpoint's model weights alone, as the model's own tools load them (SPEC §13).

A ckptd checkpoint holds the whole training state under ckptd's names (``model/...``,
``optimizer/...``, RNG, a JSON skeleton), and may refer to a frozen base stored in another
file instead of holding it. An export writes the model's tensors under the model's own
``state_dict`` keys, the referenced ones included, and nothing else:

- ``safetensors``: ``model.safetensors`` (above 5 GB, ``model-0000K-of-0000N.safetensors``
  and ``model.safetensors.index.json``, as HF shards), loadable by ``safetensors.torch.load_file``;
- ``hf``: the same plus the ``config.json`` the unit recorded (a model with a ``config``, as
  HF's are): ``AutoModel*.from_pretrained(OUT_DIR)``;
- ``peft``: ``adapter_model.safetensors`` and ``adapter_config.json`` of a PEFT model's
  adapter, its keys as PEFT saves them: ``PeftModel.from_pretrained(base, OUT_DIR)``.

Torch-free and streaming: each tensor's bytes are copied from the checkpoint (or its holder)
into the new file in chunks, so exporting a 14 GB base needs a few MiB of memory. The unit is
verified first (every tensor, references followed); a corrupt one is not exported.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable

from ckptd.core.format import TensorEntry, encode_header, layout, read_header
from ckptd.core.meta import HF_CONFIG, PEFT_CONFIG
from ckptd.core.refs import decode
from ckptd.disk import manifest as mf
from ckptd.disk.persist import temp_name
from ckptd.disk.safepath import fsync_dir, open_regular
from ckptd.disk.verify import verify_file, verify_unit

__all__ = ["FORMATS", "ExportError", "Exported", "export"]

FORMATS = ("safetensors", "hf", "peft")
MAX_SHARD = 5 * 10**9  # HF's default max_shard_size
CHUNK = 8 << 20
Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


class ExportError(Exception):
    """The unit cannot be exported as asked; the message says why and what would work."""


@dataclass(frozen=True)
class Source:
    """Where one exported tensor's bytes are: a file and their absolute offsets in it."""

    file: str
    start: int
    entry: TensorEntry  # dtype, shape and length (its begin/end are the source's, unused in the output)


@dataclass
class Exported:
    unit: str
    format: str
    files: list[str] = field(default_factory=list)
    tensors: int = 0
    bytes: int = 0

    def to_json(self) -> dict[str, object]:
        return {"unit": self.unit, "format": self.format, "files": self.files, "tensors": self.tensors,
                "bytes": self.bytes}


def export(unit: str, out_dir: str, fmt: str, adapter: str = "default", progress: Progress | None = None,
           rank: int | None = None) -> Exported:
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")
    if os.path.isdir(unit):
        return _export_unit(unit, out_dir, fmt, adapter, progress, rank)
    result = verify_file(unit)
    if not result.ok:
        raise ExportError(f"{unit} does not verify, so it is not exported: {result.reason}")
    meta = result.metadata
    sources = _model_tensors(unit, meta)
    if not sources:
        raise ExportError(f"{unit} holds no model weights (no model= was given to the Checkpointer)")
    os.makedirs(out_dir, exist_ok=True)
    done = Exported(unit, fmt)
    if fmt == "peft":
        config = _peft_config(unit, meta, adapter)
        _write_model(out_dir, "adapter_model", _adapter_tensors(sources, adapter, unit), done, progress, shard=False)
        _write_json(out_dir, "adapter_config.json", config, done)
        return done
    if fmt == "hf" and PEFT_CONFIG in meta:
        raise ExportError(f"{unit} is a PEFT model: export its adapter with --format peft (or merge the adapter "
                          "into the base and save that)")
    if fmt == "hf":
        hf_config = meta.get(HF_CONFIG)
        if not hf_config:
            raise ExportError(f"{unit} recorded no HF config (the model had no .config): use --format safetensors")
        _write_json(out_dir, "config.json", json.loads(hf_config), done)
    _write_model(out_dir, "model", sources, done, progress, shard=True)
    return done


def _export_unit(unit: str, out_dir: str, fmt: str, adapter: str, progress: Progress | None,
                 rank: int | None) -> Exported:
    """A sharded unit: a ``dcp`` one (FSDP2, DTensor) consolidated into one state dict by
    torch.distributed.checkpoint's own reader and planner, in this process; a ``per-rank`` one
    holds each rank's own tensors, so one rank's (``rank``) is exported as a single file is."""
    result = verify_unit(unit)
    if not result.ok:
        raise ExportError(f"{unit} does not verify, so it is not exported: {result.reason}")
    m = mf.read(unit)
    if m.layout != mf.DCP:
        if rank is None:
            raise ExportError(f"{unit} holds each rank's own tensors (per-rank layout, {m.world_size} ranks): "
                              "export one rank's with --rank R")
        if not 0 <= rank < m.world_size:
            raise ExportError(f"{unit} has ranks 0..{m.world_size - 1}, not {rank}")
        return export(os.path.join(unit, mf.shard_name(rank, m.world_size)), out_dir, fmt, adapter, progress)
    if fmt != "safetensors":
        raise ExportError(f"{unit}: a consolidated DCP unit exports as --format safetensors (no HF or PEFT config "
                          "is recorded for sharded state)")
    tensors = _consolidated(unit)
    if not tensors:
        raise ExportError(f"{unit} holds no model weights")
    os.makedirs(out_dir, exist_ok=True)
    from safetensors.torch import save_file

    done = Exported(unit, fmt)
    path = os.path.join(out_dir, "model.safetensors")
    save_file(tensors, path + ".tmp", metadata={"format": "pt"})
    os.rename(path + ".tmp", path)
    fsync_dir(out_dir)
    done.files.append(path)
    done.tensors = len(tensors)
    done.bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    if progress is not None:
        progress(done.bytes, done.bytes)
    return done


def _consolidated(unit: str) -> dict[str, Any]:
    """Every model tensor of a DCP unit, whole (gathered from every rank's chunks)."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}  # filled from the unit's own metadata, as torch's dcp_to_torch_save does
    with warnings.catch_warnings():  # "no process group: loading in a single process", which is the point
        warnings.simplefilter("ignore", UserWarning)
        _load_state_dict(state, storage_reader=HuggingFaceStorageReader(unit),
                         planner=_EmptyStateDictLoadPlanner(), no_dist=True)  # type: ignore[no-untyped-call]
    flat = _flat(state)
    return {k[len("model."):]: v.contiguous() for k, v in sorted(flat.items()) if k.startswith("model.")}


def _flat(state: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _model_tensors(path: str, meta: dict[str, str]) -> dict[str, Source]:
    """``model/<key>`` -> where its bytes are: stored in the unit, referenced, or tied to another."""
    with open_regular(path) as f:
        header = read_header(f, os.fstat(f.fileno()).st_size)
    out = {e.name: Source(path, header.data_start + e.begin, e) for e in header.tensors}
    directory = os.path.dirname(path)
    for name, r in decode(meta).items():
        holder = os.path.join(directory, r.file)
        with open_regular(holder) as f:
            start = read_header(f, os.fstat(f.fileno()).st_size).data_start
        out[name] = Source(holder, start + r.offsets[0], TensorEntry(name, r.dtype, r.shape, *r.offsets))
    for alias, stored in json.loads(meta.get("ckptd.aliases", "{}")).items():
        if stored in out:
            out[alias] = out[stored]
    return {name[len("model/"):]: s for name, s in sorted(out.items()) if name.startswith("model/")}


def _peft_config(unit: str, meta: dict[str, str], adapter: str) -> dict[str, object]:
    configs = json.loads(meta.get(PEFT_CONFIG) or "{}")
    if not configs:
        raise ExportError(f"{unit} is not a PEFT model's checkpoint (no adapter config recorded): use --format "
                          "safetensors or hf")
    if adapter not in configs:
        raise ExportError(f"{unit} has no adapter {adapter!r}; it has {', '.join(sorted(configs))} (--adapter)")
    config: dict[str, object] = configs[adapter]
    return config


def _adapter_tensors(sources: dict[str, Source], adapter: str, unit: str) -> dict[str, Source]:
    """PEFT's own selection and naming (``get_peft_model_state_dict``): the adapter's tensors and
    its ``modules_to_save``, the adapter's name taken out of each key."""
    marker = f".{adapter}."
    picked = {k.replace(f".{adapter}", ""): s for k, s in sources.items()
              if marker in k and ("lora_" in k or ".modules_to_save." in k)}
    if not picked:
        raise ExportError(f"{unit}: no tensor of adapter {adapter!r} (save='trainable' or 'all' of a PEFT model?)")
    return picked


def _write_model(out_dir: str, stem: str, sources: dict[str, Source], done: Exported,
                 progress: Progress | None, shard: bool) -> None:
    groups = _shards(sources) if shard else [list(sources)]
    total = sum(s.entry.nbytes for s in sources.values())
    names = [f"{stem}.safetensors"] if len(groups) == 1 else \
        [f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map: dict[str, str] = {}
    for name, keys in zip(names, groups):
        _write_safetensors(os.path.join(out_dir, name), {k: sources[k] for k in keys}, done, progress, total)
        weight_map.update({k: name for k in keys})
        done.files.append(os.path.join(out_dir, name))
    if len(groups) > 1:
        _write_json(out_dir, f"{stem}.safetensors.index.json",
                    {"metadata": {"total_size": total}, "weight_map": weight_map}, done)


def _shards(sources: dict[str, Source]) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for k, s in sources.items():
        if groups[-1] and size + s.entry.nbytes > MAX_SHARD:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += s.entry.nbytes
    return groups


def _write_safetensors(path: str, sources: dict[str, Source], done: Exported, progress: Progress | None,
                       total: int) -> None:
    """A temp file beside it, every tensor's bytes copied in, fsync, rename: never half an export."""
    entries = layout([(k, s.entry.dtype, tuple(s.entry.shape)) for k, s in sources.items()])
    header = encode_header(entries, {"format": "pt"})
    tmp = os.path.join(os.path.dirname(path), temp_name(os.path.basename(path)))
    try:
        with open(tmp, "xb") as out:
            out.write(header)
            for e in entries:
                _copy(sources[e.name], out)
                done.tensors += 1
                done.bytes += e.nbytes
                if progress is not None:
                    progress(done.bytes, total)
            out.flush()
            os.fsync(out.fileno())
        os.rename(tmp, path)
        fsync_dir(os.path.dirname(path))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _copy(s: Source, out: BinaryIO) -> None:
    with open_regular(s.file) as f:
        f.seek(s.start)
        left = s.entry.nbytes
        while left > 0:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                raise ExportError(f"{s.file} ends inside {s.entry.name!r}")
            out.write(chunk)
            left -= len(chunk)


def _write_json(out_dir: str, name: str, doc: object, done: Exported) -> None:
    path = os.path.join(out_dir, name)
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.rename(path + ".tmp", path)
    done.files.append(path)

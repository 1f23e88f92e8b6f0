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

What is copied is what was verified: the unit and each of its holders are opened once, without
following a link (``ckptd.disk.opened``), verified through those fds, and copied from the same
fds, each tensor hashed again on the way and compared with the digest it verified with (a file
rewritten in place in between fails the export instead of passing). Outputs are created only as
``ckptd.disk.outdir`` allows: OUT_DIR reached without a link and owned by the caller, each file
new (``O_EXCL | O_NOFOLLOW``, a random temp name) and renamed into place.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import xxhash

from ckptd.core.format import TensorEntry, encode_header, layout, read_header
from ckptd.core.meta import HF_CONFIG, PEFT_CONFIG
from ckptd.core.refs import decode
from ckptd.disk import manifest as mf
from ckptd.disk.opened import Opened, unreadable
from ckptd.disk.outdir import OutDir, OutputError
from ckptd.disk.safepath import open_dir
from ckptd.disk.verify import verify_opened, verify_unit

__all__ = ["FORMATS", "ExportError", "Exported", "export"]

FORMATS = ("safetensors", "hf", "peft")
MAX_SHARD = 5 * 10**9  # HF's default max_shard_size
CHUNK = 8 << 20
OnProgress = Callable[[int, int], None]  # (bytes done, bytes in all)


class ExportError(Exception):
    """The unit cannot be exported as asked; the message says why and what would work."""


@dataclass(frozen=True)
class Source:
    """Where one exported tensor's bytes are: a verified fd, their absolute offsets in it, their digest."""

    fd: int
    label: str  # the file's name, for messages
    start: int
    entry: TensorEntry  # dtype, shape and length (its begin/end are the source's, unused in the output)
    digest: str  # xxh3-64 the bytes verified with


@dataclass
class Exported:
    unit: str
    format: str
    files: list[str] = field(default_factory=list)
    tensors: int = 0
    bytes: int = 0

    def to_json(self) -> dict[str, object]:
        return {
            "unit": self.unit,
            "format": self.format,
            "files": self.files,
            "tensors": self.tensors,
            "bytes": self.bytes,
        }


def export(
    unit: str,
    out_dir: str,
    fmt: str,
    adapter: str = "default",
    progress: OnProgress | None = None,
    rank: int | None = None,
) -> Exported:
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")
    if os.path.isdir(unit) and not os.path.islink(unit):
        return _export_unit(unit, out_dir, fmt, adapter, progress, rank)
    with _reached(os.path.dirname(unit) or ".", unit) as opened:
        return _export_file(opened, os.path.basename(unit), unit, out_dir, fmt, adapter, progress)


def _reached(directory: str, unit: str) -> Opened:
    """``directory`` walked from ``/`` without following a link at any depth (``safepath.open_dir``):
    root exporting ``/home/alice/x/unit`` must not read Bob's checkpoint because ``x`` is Alice's
    link to Bob's directory. The error names the problem."""
    try:
        return Opened(open_dir(os.path.abspath(directory), ["/"]), directory)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ExportError(
                f"{unit}: its path goes through a symbolic link (or a file), which an export "
                "never follows: give the checkpoint's real path"
            ) from None
        raise ExportError(f"{unit}: {unreadable(exc, unit)}") from None


def _export_file(
    opened: Opened, name: str, unit: str, out_dir: str, fmt: str, adapter: str, progress: OnProgress | None
) -> Exported:
    result = verify_opened(opened, name, unit)
    if not result.ok:
        raise ExportError(f"{unit} does not verify, so it is not exported: {result.reason}")
    meta = result.metadata
    sources = _model_tensors(opened, name, meta)
    if not sources:
        raise ExportError(f"{unit} holds no model weights (no model= was given to the Checkpointer)")
    if fmt == "peft":
        config = _peft_config(unit, meta, adapter)
        picked = _adapter_tensors(sources, adapter, unit)
        with _output(out_dir) as out:
            done = Exported(unit, fmt)
            _write_model(out, "adapter_model", picked, done, progress, shard=False)
            _write_json(out, "adapter_config.json", config, done)
        return done
    if fmt == "hf" and PEFT_CONFIG in meta:
        raise ExportError(
            f"{unit} is a PEFT model: export its adapter with --format peft (or merge the adapter "
            "into the base and save that)"
        )
    hf_config = meta.get(HF_CONFIG)
    if fmt == "hf" and not hf_config:
        raise ExportError(f"{unit} recorded no HF config (the model had no .config): use --format safetensors")
    with _output(out_dir) as out:
        done = Exported(unit, fmt)
        if fmt == "hf" and hf_config:
            _write_json(out, "config.json", json.loads(hf_config), done)
        _write_model(out, "model", sources, done, progress, shard=True)
    return done


class _output:
    """OUT_DIR opened as ``outdir`` allows, closed durable on success, undone on failure."""

    def __init__(self, path: str) -> None:
        try:
            self.out = OutDir.open(path)
        except OutputError as exc:
            raise ExportError(str(exc)) from None

    def __enter__(self) -> OutDir:
        return self.out

    def __exit__(self, kind: object, *rest: object) -> None:
        self.out.close(ok=kind is None)


def _export_unit(
    unit: str, out_dir: str, fmt: str, adapter: str, progress: OnProgress | None, rank: int | None
) -> Exported:
    """A sharded unit: a ``dcp`` one (FSDP2, DTensor) consolidated into one state dict by
    torch.distributed.checkpoint's own reader and planner, in this process; a ``per-rank`` one
    holds each rank's own tensors, so one rank's (``rank``) is exported as a single file is.
    Either way from the shard fds ``verify_unit`` verified."""
    with _reached(unit, unit) as opened:
        result = verify_unit(unit, opened=opened, whole=True)
        if not result.ok:
            raise ExportError(f"{unit} does not verify, so it is not exported: {result.reason}")
        m = mf.read(opened.proc_path)
        if m.layout != mf.DCP:
            if rank is None:
                raise ExportError(
                    f"{unit} holds each rank's own tensors (per-rank layout, {m.world_size} ranks): "
                    "export one rank's with --rank R"
                )
            if not 0 <= rank < m.world_size:
                raise ExportError(f"{unit} has ranks 0..{m.world_size - 1}, not {rank}")
            name = mf.shard_name(rank, m.world_size)
            return _export_file(opened, name, os.path.join(unit, name), out_dir, fmt, adapter, progress)
        if fmt != "safetensors":
            raise ExportError(
                f"{unit}: a consolidated DCP unit exports as --format safetensors (no HF or PEFT "
                "config is recorded for sharded state)"
            )
        with _verified_view(opened) as view:
            tensors = _consolidated(view)
    if not tensors:
        raise ExportError(f"{unit} holds no model weights")
    from safetensors.torch import save

    data = save(tensors, metadata={"format": "pt"})
    done = Exported(unit, fmt)
    with _output(out_dir) as out:
        done.files.append(out.write("model.safetensors", lambda fd: _write_all(fd, data)))
    done.tensors = len(tensors)
    done.bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    if progress is not None:
        progress(done.bytes, done.bytes)
    return done


class _verified_view:
    """A private directory (0700, the caller's) of links to the verified shard fds themselves
    (``/proc/PID/fd/N``, which the kernel resolves to the open file, not to a name), for torch's
    reader, which opens files by path: it reads the shards that verified, whatever the unit's
    names point to by now."""

    def __init__(self, opened: Opened) -> None:
        self.opened = opened
        self.path = tempfile.mkdtemp(prefix="ckptd-export-")

    def __enter__(self) -> str:
        for name in self.opened.names():
            os.symlink(f"/proc/{os.getpid()}/fd/{self.opened.fd(name)}", os.path.join(self.path, name))
        return self.path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view[:CHUNK])
        view = view[n:]


def _consolidated(unit: str) -> dict[str, Any]:
    """Every model tensor of a DCP unit, whole (gathered from every rank's chunks)."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}  # filled from the unit's own metadata, as torch's dcp_to_torch_save does
    with warnings.catch_warnings():  # "no process group: loading in a single process", which is the point
        warnings.simplefilter("ignore", UserWarning)
        planner = _EmptyStateDictLoadPlanner()  # type: ignore[no-untyped-call]
        _load_state_dict(state, storage_reader=HuggingFaceStorageReader(unit), planner=planner, no_dist=True)
    flat = _flat(state)
    return {k[len("model.") :]: v.contiguous() for k, v in sorted(flat.items()) if k.startswith("model.")}


def _flat(state: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _model_tensors(opened: Opened, name: str, meta: dict[str, str]) -> dict[str, Source]:
    """``model/<key>`` -> where its bytes are: stored in the unit, referenced, or tied to another;
    every one in a file ``opened`` verified (its fd, not its name)."""
    f, size = opened.open(name)
    with f:
        header = read_header(f, size)
    digests = header.meta_json("ckptd.digests", {}) or {}
    out = {
        e.name: Source(opened.fd(name), name, header.data_start + e.begin, e, str(digests.get(e.name, "")))
        for e in header.tensors
    }
    for tensor, r in decode(meta).items():
        f, size = opened.open(r.file)
        with f:
            start = read_header(f, size).data_start
        out[tensor] = Source(
            opened.fd(r.file), r.file, start + r.offsets[0], TensorEntry(tensor, r.dtype, r.shape, *r.offsets), r.digest
        )
    for alias, stored in json.loads(meta.get("ckptd.aliases", "{}")).items():
        if stored in out:
            out[alias] = out[stored]
    return {n[len("model/") :]: s for n, s in sorted(out.items()) if n.startswith("model/")}


def _peft_config(unit: str, meta: dict[str, str], adapter: str) -> dict[str, object]:
    configs = json.loads(meta.get(PEFT_CONFIG) or "{}")
    if not configs:
        raise ExportError(
            f"{unit} is not a PEFT model's checkpoint (no adapter config recorded): use --format safetensors or hf"
        )
    if adapter not in configs:
        raise ExportError(f"{unit} has no adapter {adapter!r}; it has {', '.join(sorted(configs))} (--adapter)")
    config: dict[str, object] = configs[adapter]
    return config


def _adapter_tensors(sources: dict[str, Source], adapter: str, unit: str) -> dict[str, Source]:
    """PEFT's own selection and naming (``get_peft_model_state_dict``): the adapter's tensors and
    its ``modules_to_save``, the adapter's name taken out of each key."""
    marker = f".{adapter}."
    picked = {
        k.replace(f".{adapter}", ""): s
        for k, s in sources.items()
        if marker in k and ("lora_" in k or ".modules_to_save." in k)
    }
    if not picked:
        raise ExportError(f"{unit}: no tensor of adapter {adapter!r} (save='trainable' or 'all' of a PEFT model?)")
    return picked


def _write_model(
    out: OutDir, stem: str, sources: dict[str, Source], done: Exported, progress: OnProgress | None, shard: bool
) -> None:
    groups = _shards(sources) if shard else [list(sources)]
    total = sum(s.entry.nbytes for s in sources.values())
    names = (
        [f"{stem}.safetensors"]
        if len(groups) == 1
        else [f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    )
    weight_map: dict[str, str] = {}
    for name, keys in zip(names, groups):
        _write_safetensors(out, name, {k: sources[k] for k in keys}, done, progress, total)
        weight_map.update({k: name for k in keys})
    if len(groups) > 1:
        _write_json(
            out, f"{stem}.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}, done
        )


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


def _write_safetensors(
    out: OutDir, name: str, sources: dict[str, Source], done: Exported, progress: OnProgress | None, total: int
) -> None:
    """A new temp file in OUT_DIR, every tensor's bytes copied in, fsync, rename: never half an export."""
    entries = layout([(k, s.entry.dtype, tuple(s.entry.shape)) for k, s in sources.items()])
    header = encode_header(entries, {"format": "pt"})

    def fill(fd: int) -> None:
        _write_all(fd, header)
        for e in entries:
            for chunk in _verified_bytes(sources[e.name]):
                _write_all(fd, chunk)
            done.tensors += 1
            done.bytes += e.nbytes
            if progress is not None:
                progress(done.bytes, total)

    done.files.append(out.write(name, fill))


def _verified_bytes(s: Source) -> Iterator[bytes]:
    """One tensor's bytes, read from the verified fd, and hashed again on the way: bytes changed
    since they verified (the file rewritten in place) fail the export instead of being written."""
    h = xxhash.xxh3_64()
    pos, left = s.start, s.entry.nbytes
    while left > 0:
        chunk = os.pread(s.fd, min(CHUNK, left), pos)
        if not chunk:
            raise ExportError(f"{s.label} ends inside {s.entry.name!r}")
        h.update(chunk)
        pos += len(chunk)
        left -= len(chunk)
        yield chunk
    if s.digest and h.hexdigest() != s.digest:
        raise ExportError(
            f"{s.label} changed while it was exported (tensor {s.entry.name!r} no longer has the "
            "digest it verified with): that output was discarded; export again"
        )


def _write_json(out: OutDir, name: str, doc: object, done: Exported) -> None:
    text = json.dumps(doc, indent=2, sort_keys=True).encode()
    done.files.append(out.write(name, lambda fd: _write_all(fd, text)))

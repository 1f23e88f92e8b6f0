"""Checkpoints written by other tools: recognise, judge completeness, verify safely.

Recognised by layout and content, not only by name: HF Trainer ``checkpoint-N/``
directories, (sharded) safetensors, torch zip files (``.pt``/``.pth``/``.bin``/``.ckpt``,
Lightning's included), torch.distributed.checkpoint directories, DeepSpeed tags (``global_stepN/``, alone or inside
an HF ``checkpoint-N/``: ``ckptd.foreign.deepspeed``), OneTrainer's
``workspace/save/{timestamp}-{progress}`` files. A checkpoint still being written is
never verified: other tools' in-progress markers are respected and each format's own
completeness is checked first.

Nothing is unpickled with code execution (``ckptd.foreign.picklesafe``). This module is the
format registry every verb that takes a path uses (``find``), and watch mode too.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from ckptd.core.format import FormatError, read_header
from ckptd.disk import manifest as mf
from ckptd.disk.safepath import open_regular
from ckptd.disk.verify import VerifyResult, verify_file, verify_unit
from ckptd.foreign import deepspeed, steps
from ckptd.foreign.picklesafe import UnsafePickle, read_dcp_metadata, verify_torch

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
INCOMPLETE_MARKERS = ("checkpoint-is-incomplete.txt",)
CONFIG_PICKLES = ("training_args.bin",)  # HF's pickled TrainingArguments: CRC-checked, never unpickled
_ONETRAINER_PROGRESS = re.compile(r"-(\d+)-\d+-\d+\.\w+$")  # {timestamp}-save-{global_step}-{epoch}-{epoch_step}


@dataclass(frozen=True)
class Found:
    """One checkpoint unit: a file, or a directory deleted and verified as a whole."""

    path: str
    kind: str
    step: int | None
    mtime: float
    bytes: int


def step_from_name(name: str) -> int | None:
    """Only a name that says "step" gives one (``ckptd.foreign.steps``; a bare number is no step)."""
    return steps.step_from_name(name)


def _file_step(path: str, name: str, kind: str) -> int | None:
    """A step the name states, else the one recorded inside the file (``ckptd.foreign.steps``)."""
    named = step_from_name(name)
    return named if named is not None else steps.recorded_step(path, kind)


def classify(path: str, parent_is_plain: bool = False) -> Found | None:
    """What kind of checkpoint ``path`` is, if any (cheap: names, layout, magic bytes).

    ``parent_is_plain``: the caller knows the parent is no checkpoint directory (a walk
    that stops at those), so it is not listed again for every file in it.
    """
    name = os.path.basename(path.rstrip("/"))
    if name.startswith(".") or name.endswith(".orbax-checkpoint-tmp") or ".ckptd-tmp." in name:
        return None
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    if os.path.isdir(path) and not os.path.islink(path):
        kind = dir_kind(path)
        if kind is None:
            return None
        return Found(path, kind, _dir_step(path, name), _newest_mtime(path), _tree_bytes(path))
    if not os.path.isfile(path) or os.path.islink(path):
        return None
    if not parent_is_plain and _inside_checkpoint_dir(path):
        return None  # a file of an HF/DCP directory: the directory is the unit
    if name.endswith(".safetensors"):
        if re.search(r"-\d{5}-of-\d{5}\.safetensors$", name):
            return None  # one shard: judged with its index
        return Found(path, "safetensors", _safetensors_step(path, name), st.st_mtime, st.st_size)
    if name.endswith(".safetensors.index.json"):
        return Found(path, "safetensors-sharded", step_from_name(name), st.st_mtime, _index_bytes(path))
    if name.endswith(TORCH_SUFFIXES) and _is_zip(path):
        kind = "lightning" if name.endswith(".ckpt") else "torch"
        return Found(path, kind, _file_step(path, name, kind), st.st_mtime, st.st_size)
    if "save" in path.split(os.sep)[-2:-1] and re.match(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}-", name):
        progress = _ONETRAINER_PROGRESS.search(name)
        return Found(path, "onetrainer", int(progress.group(1)) if progress else None, st.st_mtime, st.st_size)
    return None


def dir_kind(path: str) -> str | None:
    try:
        names = set(os.listdir(path))
    except OSError:
        return None
    if mf.MANIFEST in names or any(mf.SHARD_RE.match(n) for n in names):
        return "ckptd-sharded"
    if any(n.endswith(".distcp") for n in names) or ".metadata" in names:
        return "dcp"
    if "trainer_state.json" in names or re.match(r"checkpoint-\d+$", os.path.basename(path)):
        if names & {
            "trainer_state.json",
            "model.safetensors",
            "pytorch_model.bin",
            "model.safetensors.index.json",
            "optimizer.pt",
            *INCOMPLETE_MARKERS,
        }:
            return "hf"
    if deepspeed.is_tag(names):
        return "deepspeed"
    return None


def _dir_step(path: str, name: str) -> int | None:
    step = step_from_name(name)
    if step is None:
        try:
            with open_regular(os.path.join(path, "trainer_state.json")) as f:
                step = int(json.load(f).get("global_step"))
        except (OSError, ValueError, TypeError, AttributeError):
            return None
    return step


def _inside_checkpoint_dir(path: str) -> bool:
    return dir_kind(os.path.dirname(path)) is not None


def _safetensors_step(path: str, name: str) -> int | None:
    try:
        with open_regular(path) as f:
            meta = read_header(f, os.fstat(f.fileno()).st_size).metadata
        if "ckptd.step" in meta:
            return int(meta["ckptd.step"])
    except (OSError, FormatError, ValueError):
        pass
    return _file_step(path, name, "safetensors")


def _is_zip(path: str) -> bool:
    try:
        with open_regular(path) as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _newest_mtime(path: str) -> float:
    newest = os.stat(path).st_mtime
    for dirpath, _, files in os.walk(path):
        for n in files:
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, n)).st_mtime)
            except OSError:
                pass
    return newest


def _tree_bytes(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for n in files:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_size
            except OSError:
                pass
    return total


def _index_bytes(path: str) -> int:
    shards = _index_shards(path) or []
    d = os.path.dirname(path)
    return sum(os.path.getsize(os.path.join(d, s)) for s in shards if os.path.exists(os.path.join(d, s)))


def _index_shards(path: str) -> list[str] | None:
    try:
        with open_regular(path) as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
    if not all(isinstance(s, str) and s and "/" not in s and s not in (".", "..") for s in shards):
        return None  # an index naming files outside its own directory is not followed
    return shards


def file_digests(found: Found) -> dict[str, str]:
    """xxh3-64 of every file of a unit, by name relative to it: other tools store no digests
    (safetensors has none), so what watch mode adopted is fingerprinted for later scrubs."""
    import xxhash

    paths = (
        [found.path]
        if os.path.isfile(found.path)
        else sorted(os.path.join(d, n) for d, _, names in os.walk(found.path) for n in names)
    )
    out = {}
    for p in paths:
        h = xxhash.xxh3_64()
        with open_regular(p) as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        out[os.path.relpath(p, found.path) if p != found.path else os.path.basename(p)] = h.hexdigest()
    return out


def changed_since(found: Found, recorded: dict[str, str]) -> str:
    """The first file whose bytes differ from the digests taken at adoption ("" if none)."""
    now = file_digests(found)
    for name, digest in sorted(recorded.items()):
        if now.get(name) != digest:
            return f"{name} changed since it was adopted (xxh3-64 {now.get(name, 'missing')}, was {digest})"
    return ""


def units_under(root: str) -> list[Found]:
    """Every checkpoint unit in the tree below ``root``: a directory that is one (HF, DCP, a
    sharded ckptd unit) is not entered; hidden entries and symlinks are skipped."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in list(dirnames):
            found = classify(os.path.join(dirpath, name))
            if found is not None:
                dirnames.remove(name)
                out.append(found)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out.extend(f for f in (classify(os.path.join(dirpath, n), parent_is_plain=True) for n in filenames) if f)
    return out


def find(path: str) -> list[Found]:
    """What a user means by PATH: the checkpoint it is, or the checkpoints under it."""
    found = classify(path)
    if found is not None:
        return [found]
    units = units_under(path) if os.path.isdir(path) else []
    return sorted(units, key=lambda f: (f.step if f.step is not None else -1, f.mtime, f.path))


# --- completeness -------------------------------------------------------------------------


def incomplete(found: Found) -> str | None:
    """Why ``found`` is not finished yet (None when it is): markers and format checks, one per
    kind (a kind with no check is finished once it is there)."""
    check = _COMPLETENESS.get(found.kind)
    return check(found.path) if check else None


def _hf_incomplete(path: str) -> str | None:
    """An HF ``checkpoint-N/``: no marker, its DeepSpeed tags and weight files complete, and a
    model file or trainer state present."""
    names = set(os.listdir(path))
    if names & set(INCOMPLETE_MARKERS):
        return "HF marks it incomplete (checkpoint-is-incomplete.txt)"
    for tag in _deepspeed_tags(path):
        reason = deepspeed.incomplete(os.path.join(path, tag))
        if reason:
            return f"{tag}: {reason}"
    for n in sorted(names):
        reason = _weights_incomplete(os.path.join(path, n))
        if reason:
            return reason
    return (
        None
        if names & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "trainer_state.json"}
        else "no model file yet"
    )


def _weights_incomplete(path: str) -> str | None:
    """A safetensors index or a single safetensors file (a numbered shard is checked by its index)."""
    name = os.path.basename(path)
    if name.endswith(".safetensors.index.json"):
        return _index_incomplete(path)
    if name.endswith(".safetensors") and not re.search(r"-\d{5}-of-\d{5}", name):
        return _safetensors_incomplete(path)
    return None


def _zip_incomplete(path: str) -> str | None:
    if not _is_zip(path):
        return None
    try:
        with zipfile.ZipFile(path) as z:
            z.namelist()
    except (zipfile.BadZipFile, OSError):
        return "zip central directory not readable yet"
    return None


def _safetensors_incomplete(path: str) -> str | None:
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            read_header(f, size)
    except FormatError as exc:
        return f"size does not match its header yet ({exc})"
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    return None


def _index_incomplete(path: str) -> str | None:
    shards = _index_shards(path)
    if shards is None:
        return "index json not readable"
    d = os.path.dirname(path)
    for s in shards:
        p = os.path.join(d, s)
        if not os.path.exists(p):
            return f"shard {s} listed in the index does not exist yet"
        reason = _safetensors_incomplete(p)
        if reason:
            return f"shard {s}: {reason}"
    return None


# --- verification ------------------------------------------------------------------------------


def verify(found: Found) -> VerifyResult:
    """Read every byte that matters; never raises for a bad checkpoint."""
    try:
        if found.kind == "safetensors":
            return verify_file(found.path)
        if found.kind == "safetensors-sharded":
            return _verify_all(
                found.path, [os.path.join(os.path.dirname(found.path), s) for s in _index_shards(found.path) or []]
            )
        if found.kind in ("torch", "lightning", "onetrainer"):
            return verify_torch(found.path)
        if found.kind == "hf":
            return _verify_hf(found)
        if found.kind == "dcp":
            return _verify_dcp(found)
        if found.kind == "ckptd-sharded":
            return verify_unit(found.path)
        if found.kind == "deepspeed":
            return deepspeed.verify(found.path)
    except OSError as exc:
        return VerifyResult(found.path, False, f"cannot read: {exc.strerror or exc}")
    return VerifyResult(found.path, False, f"unknown kind {found.kind}")


def _verify_all(label: str, parts: list[str]) -> VerifyResult:
    if not parts:
        return VerifyResult(label, False, "no files to verify")
    tensors = total = 0
    for p in parts:
        config_pickle = os.path.basename(p) in CONFIG_PICKLES
        r = verify_torch(p, load=not config_pickle) if p.endswith(TORCH_SUFFIXES) else verify_file(p)
        if not r.ok:
            return VerifyResult(label, False, f"{os.path.basename(p)}: {r.reason}", unsafe=r.unsafe)
        tensors += r.tensors
        total += r.bytes
    return VerifyResult(label, True, "", tensors, total)


def _verify_hf(found: Found) -> VerifyResult:
    """Every file that holds state, not only the model: the trainer's own (optimizer,
    scheduler, RNG, scaler) and a DeepSpeed tag inside, as one unit with its ``latest`` file."""
    names = sorted(os.listdir(found.path))
    parts = [
        os.path.join(found.path, n)
        for n in names
        if n.endswith(".safetensors") or (n.endswith(TORCH_SUFFIXES) and not n.startswith("."))
    ]
    if "trainer_state.json" in names:
        try:
            with open_regular(os.path.join(found.path, "trainer_state.json")) as f:
                json.load(f)
        except ValueError as exc:
            return VerifyResult(found.path, False, f"trainer_state.json is not valid JSON: {exc}")
    result = _verify_all(found.path, parts)
    tags = _deepspeed_tags(found.path)
    if not result.ok or not tags:
        return result
    tensors, total = result.tensors, result.bytes
    for tag in tags:
        r = deepspeed.verify(os.path.join(found.path, tag))
        if not r.ok:
            return VerifyResult(found.path, False, f"{tag}/{r.reason}", unsafe=r.unsafe)
        tensors, total = tensors + r.tensors, total + r.bytes
    named = deepspeed.latest_names(found.path)
    if named is not None and named not in tags:
        return VerifyResult(found.path, False, f"{deepspeed.LATEST} names {named!r}, which is not a DeepSpeed tag here")
    return VerifyResult(found.path, True, "", tensors, total)


def _deepspeed_tags(path: str) -> list[str]:
    """The DeepSpeed tag directories inside an HF checkpoint (``global_stepN/``)."""
    out = []
    for n in sorted(os.listdir(path)):
        p = os.path.join(path, n)
        if not n.startswith(".") and os.path.isdir(p) and not os.path.islink(p):
            try:
                if deepspeed.is_tag(set(os.listdir(p))):
                    out.append(n)
            except OSError:
                continue
    return out


def _verify_dcp(found: Found) -> VerifyResult:
    try:
        meta = read_dcp_metadata(os.path.join(found.path, ".metadata"))
    except pickle.UnpicklingError as exc:
        return VerifyResult(found.path, False, f".metadata: {exc}", unsafe=isinstance(exc, UnsafePickle))
    except (ValueError, EOFError, AttributeError, TypeError, RecursionError, MemoryError) as exc:
        return VerifyResult(found.path, False, f".metadata is not valid DCP metadata: {type(exc).__name__}")
    storage = getattr(meta, "storage_data", None)
    files = {getattr(v, "relative_path", None) for v in (storage.values() if isinstance(storage, dict) else ())}
    names = [f for f in files if isinstance(f, str)]
    if any(os.path.isabs(f) or ".." in f.split("/") for f in names):
        return VerifyResult(found.path, False, ".metadata names a file outside its directory")
    missing = sorted(f for f in names if not os.path.isfile(os.path.join(found.path, f)))
    if missing:
        return VerifyResult(found.path, False, f"{missing[0]} named in .metadata is missing")
    try:
        short = _dcp_short_file(found.path, storage.values() if isinstance(storage, dict) else ())
    except OSError as exc:
        return VerifyResult(found.path, False, f"cannot read: {exc.strerror or exc}")
    if short:
        return VerifyResult(found.path, False, short)
    return VerifyResult(found.path, True, "", len(getattr(meta, "state_dict_metadata", {}) or {}), found.bytes)


def _dcp_short_file(directory: str, entries: Iterable[Any]) -> str:
    """DCP keeps no digests; what it does record is where each item's bytes lie: a file
    truncated or emptied after the save no longer holds them."""
    sizes: dict[str, int] = {}
    for e in entries:
        name, offset, length = (getattr(e, a, None) for a in ("relative_path", "offset", "length"))
        if not isinstance(name, str) or not isinstance(offset, int) or not isinstance(length, int):
            continue
        if name not in sizes:
            sizes[name] = os.stat(os.path.join(directory, name), follow_symlinks=False).st_size
        if offset + length > sizes[name]:
            return f"{name} is {sizes[name]} bytes; .metadata places an item at {offset}..{offset + length}"
    return ""


_COMPLETENESS: dict[str, Callable[[str], str | None]] = {
    "deepspeed": deepspeed.incomplete,
    "hf": _hf_incomplete,
    "dcp": lambda p: None if os.path.exists(os.path.join(p, ".metadata")) else "no .metadata yet (DCP writes it last)",
    "ckptd-sharded": lambda p: (
        None if os.path.exists(os.path.join(p, mf.MANIFEST)) else "no manifest yet (written last)"
    ),
    "safetensors-sharded": _index_incomplete,
    "safetensors": _safetensors_incomplete,
    "torch": _zip_incomplete,
    "lightning": _zip_incomplete,
    "onetrainer": _zip_incomplete,
}

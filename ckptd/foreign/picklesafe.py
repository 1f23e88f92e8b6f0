"""Reading pickles that other tools wrote, without ever running them.

Torch zip files (``.pt``/``.pth``/``.bin``/``.ckpt``): every zip record's CRC-32 is checked
(``torch.load`` does not), the pickle's globals are listed without running it
(``torch.serialization.get_unsafe_globals_in_checkpoint``), and only a file whose globals
are all on a short allowlist is loaded, with ``weights_only=True``. DeepSpeed's own pickled
objects (its loss scaler, ZeRO stage enum, fragment addresses) are on that list as *inert
stand-ins*: the name maps to a class of ours that only records the arguments and fields it is
given, so DeepSpeed need not be installed and none of its code runs. DCP's ``.metadata``
(a plain ``pickle.load`` in DCP's own reader) is read with an unpickler that allows DCP's
metadata classes and nothing else. A decompression bomb is refused before it is inflated.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any

from ckptd.disk.safepath import open_regular
from ckptd.disk.verify import VerifyResult

__all__ = [
    "DEEPSPEED_GLOBALS",
    "Inert",
    "SAFE_GLOBALS",
    "UnsafePickle",
    "max_inflated",
    "read_dcp_metadata",
    "verify_torch",
]

SAFE_GLOBALS = {
    "numpy.ndarray",
    "numpy.dtype",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray.scalar",
    "collections.OrderedDict",
    "collections.defaultdict",
    "pathlib.PosixPath",
    "argparse.Namespace",
    "lightning.fabric.utilities.data.AttributeDict",
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "torch.torch_version.TorchVersion",
}

# What DeepSpeed (0.9 to 0.19) pickles into its checkpoints besides tensors, dicts and numbers:
# read as ``Inert`` records, never resolved to DeepSpeed's classes.
DEEPSPEED_GLOBALS = frozenset(
    {
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.fp16.loss_scaler.LossScalerBase",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
        "deepspeed.runtime.config.DeepSpeedConfig",
        "deepspeed.runtime.zero.offload_config.OffloadDeviceEnum",
    }
)


class Inert:
    """A foreign object read back as plain data: its class's name (``qualname``), the arguments it
    was rebuilt with (``args``; an enum's value) and its fields (``state``). It has no behaviour:
    the unpickler may create it and hand it its state, and that is all that happens."""

    qualname = ""

    def __new__(cls, *args: Any) -> "Inert":
        obj = super().__new__(cls)
        obj.args, obj.state = args, {}
        return obj

    def __init__(self, *args: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.qualname}{self.args or ''}>"

    args: tuple[Any, ...]
    state: Any


_INERT: dict[str, type[Inert]] = {}


def _inert_class(qualname: str) -> type[Inert]:
    """One stand-in class per foreign name (the weights-only unpickler matches by class)."""
    if qualname not in _INERT:
        _INERT[qualname] = type(qualname.rpartition(".")[2], (Inert,), {"qualname": qualname})
    return _INERT[qualname]


def safe_load(path: str, mmap: bool = False) -> Any:
    """``torch.load`` of a torch zip whose globals are all allowed (``weights_only``, DeepSpeed's
    objects as ``Inert``); ``UnsafePickle`` names the first global that is not."""
    import torch

    needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    forbidden = sorted(needed - SAFE_GLOBALS - DEEPSPEED_GLOBALS)
    if forbidden:
        raise UnsafePickle(f"unsafe: the pickle needs {', '.join(forbidden[:3])}; not loaded (it could execute code)")
    allowed: list[Any] = [obj for obj in map(_resolve, needed - DEEPSPEED_GLOBALS) if obj is not None]
    allowed += [(_inert_class(n), n) for n in needed & DEEPSPEED_GLOBALS] + _numpy_dtype_classes(needed)
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


# DCP's own reader is a plain pickle.load: code execution for whoever can write a .metadata
# file in a watched tree. This allowlist is every global DCP's metadata pickles.
_DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}
MAX_DCP_METADATA = 256 << 20


class UnsafePickle(pickle.UnpicklingError):
    """A pickle that needs a global outside the allowed set: loading it could execute code."""


class _DcpMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        import torch

        if name in _DCP_GLOBALS.get(module, ()) or (
            module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype))
        ):
            return super().find_class(module, name)
        raise UnsafePickle(f"unsafe: .metadata needs {module}.{name}; not loaded (it could execute code)")


def read_dcp_metadata(path: str) -> Any:
    """A DCP ``.metadata`` file, unpickled with nothing but DCP's own metadata classes."""
    with open_regular(path) as f:
        if os.fstat(f.fileno()).st_size > MAX_DCP_METADATA:
            raise ValueError(f"{path} is larger than {MAX_DCP_METADATA} bytes")
        return _DcpMetadataUnpickler(f).load()


def max_inflated(size: int) -> int:
    """What a torch zip of ``size`` bytes may decompress to. torch.save stores its records
    uncompressed, so a real checkpoint is about its own size; anything far larger is a bomb."""
    return 4 * size + (64 << 20)


def verify_torch(path: str, load: bool = True) -> VerifyResult:
    """Zip CRCs of every record, then a weights-only load if its globals are all known-safe.

    ``load=False`` stops after the CRCs: for pickled configuration (HF's
    ``training_args.bin``) that is no tensor data and that only its own tool unpickles.
    """
    try:
        with zipfile.ZipFile(path) as z:
            inflated = sum(i.file_size for i in z.infolist())
            if inflated > max_inflated(os.path.getsize(path)):
                return VerifyResult(
                    path,
                    False,
                    f"unsafe: its zip records inflate to {inflated} bytes from "
                    f"{os.path.getsize(path)}; not read (a decompression bomb?)",
                    unsafe=True,
                )
            bad = z.testzip()
        if bad is not None:
            return VerifyResult(path, False, f"CRC-32 mismatch in zip record {bad}")
    except (zipfile.BadZipFile, EOFError) as exc:
        return VerifyResult(path, False, f"not a valid torch zip file: {exc}")
    if not load:
        return VerifyResult(path, True, "", 0, os.path.getsize(path))
    try:
        obj = safe_load(path)
    except UnsafePickle as exc:
        return VerifyResult(path, False, str(exc), unsafe=True)
    except Exception as exc:
        return VerifyResult(path, False, f"weights-only load failed: {str(exc).splitlines()[0][:200]}")
    tensors = _count_tensors(obj)
    return VerifyResult(path, True, "", tensors, os.path.getsize(path))


def _numpy_dtype_classes(needed: set[str]) -> list[object]:
    """numpy's per-dtype classes, which a pickled array's dtype is rebuilt through."""
    if not any(g.startswith("numpy.") for g in needed):
        return []
    import numpy as np

    return [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]


def _resolve(qualname: str) -> object | None:
    import importlib

    module, _, name = qualname.rpartition(".")
    try:
        obj: object = getattr(importlib.import_module(module), name)
        return obj
    except (ImportError, AttributeError):
        return None


def _count_tensors(obj: object) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, dict):
        return sum(_count_tensors(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_count_tensors(v) for v in obj)
    return 0

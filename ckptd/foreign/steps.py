"""The step of another tool's checkpoint: from its name only where the name says "step", else
from inside the file, where the trainer recorded it.

A bare number in a name is not a step: Minimind's ``pretrain_64.pth`` is named for its hidden
size, and a 48-step run was reported at step 64. Only names that mean a step are parsed
(``checkpoint-N``, ``global_step N``, ``step N``, ``iter N``, ``epoch N``, in that order of
trust). Otherwise the step is read where the trainer recorded it: the ``global_step`` /
``step`` / ``iter`` / ``epoch`` keys of a torch zip's top-level dict (its pickle read as inert
data: no global is ever resolved, no tensor loaded), or a safetensors header's metadata.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from typing import Any

from ckptd.core.format import FormatError, read_header
from ckptd.disk.safepath import open_regular

# the first pattern that matches wins: a Lightning "epoch=3-step=1200" is at step 1200
_NAMED = [
    re.compile(p, re.IGNORECASE)
    for p in (
        r"checkpoint-(\d+)(?!\d)",
        r"global[_-]?step[=_-]?(\d+)",
        r"(?<![a-z])step[=_-]?(\d+)",
        r"(?<![a-z])iter(?:ation)?[=_-]?(\d+)",
        r"(?<![a-z])epoch[=_-]?(\d+)",
    )
]
RECORDED_KEYS = ("global_step", "step", "iter", "iteration", "epoch")  # what a trainer's dict calls it
MAX_PICKLE = 64 << 20  # a state dict's pickle is small (tensor data lives in other zip members)


def step_from_name(name: str) -> int | None:
    """The step a file name states, or None (a bare number is no step)."""
    for pattern in _NAMED:
        m = pattern.search(name)
        if m:
            return int(m.group(1))
    return None


def recorded_step(path: str, kind: str) -> int | None:
    """The step recorded inside the checkpoint at ``path`` (a torch zip or safetensors file), or None."""
    try:
        if kind == "safetensors":
            with open_regular(path) as f:
                meta = read_header(f, os.fstat(f.fileno()).st_size).metadata
            return _first_step(meta)
        with open_regular(path) as f, zipfile.ZipFile(f) as z:
            member = next(
                (i for i in z.infolist() if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"), None
            )
            if member is None or member.file_size > MAX_PICKLE:
                return None
            top = _InertUnpickler(io.BytesIO(z.read(member))).load()
        return _first_step(top) if isinstance(top, dict) else None
    except (
        OSError,
        FormatError,
        ValueError,
        zipfile.BadZipFile,
        pickle.UnpicklingError,
        EOFError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        RecursionError,
    ):
        return None


def _first_step(values: dict[Any, Any]) -> int | None:
    for key in ("ckptd.step", *RECORDED_KEYS):
        v = values.get(key)
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            return v
    return None


class _Inert:
    """What every global of the pickle becomes: it accepts any arguments and state, and does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> "_Inert":
        return _Inert()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _InertUnpickler(pickle.Unpickler):
    """Builds plain containers and numbers; a class or function named by the pickle is never
    imported (``find_class`` returns ``_Inert``) and tensor storages are not read."""

    def find_class(self, module: str, name: str) -> Any:
        return _Inert

    def persistent_load(self, pid: Any) -> Any:
        return None

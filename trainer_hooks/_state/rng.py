"""Every random number generator a run draws from (python, numpy, torch, CUDA, and the
generators the trainer names), captured into a checkpoint and restored from it: a resumed run
draws the same numbers as one never interrupted."""

from __future__ import annotations

import random
from typing import Any

import torch

try:  # numpy is optional for torch; its RNG is captured when it is there.
    import numpy as np
except ImportError:  # pragma: no cover - numpy ships with our test extras
    np = None  # type: ignore[assignment]


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

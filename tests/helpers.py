"""Helpers shared by tests: real checkpoints made by the real pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ckptd.disk.persist import persist
from trainer_hooks._snapshot.staging import StagingBuffer
from trainer_hooks._state.state import capture, flatten


def save_state(
    state: dict,
    directory: Path,
    name: str = "c.safetensors",
    job: str = "t",
    step: int = 1,
    extra_meta: dict[str, str] | None = None,
) -> str:
    """Stage and persist a nested state exactly as the Checkpointer does; returns the path."""
    flat, skeleton = flatten(state)
    metadata = {
        "ckptd.format": "1",
        "ckptd.job": job,
        "ckptd.step": str(step),
        "ckptd.created": "2026-01-01T00:00:00.000Z",
        "ckptd.trigger": "step",
        "ckptd.state": json.dumps(skeleton),
        "ckptd.aliases": json.dumps(flat.aliases),
        **(extra_meta or {}),
    }
    buf = StagingBuffer()
    try:
        length = buf.stage(flat.tensors, metadata)
        return persist(buf.fd, length, str(directory), name).path
    finally:
        buf.close()


def small_checkpoint(directory: Path, name: str = "c.safetensors", step: int = 1, seed: int = 0) -> str:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 8))
    return save_state(capture(model), directory, name, step=step)

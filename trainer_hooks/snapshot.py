"""What one snapshot holds, composed for the staging buffer: tensors and header fields.

A save's snapshot is the nested state (``trainer_hooks.state.capture``: model, optimizer,
scheduler, RNGs, progress, ``extra``) flattened into tensors plus a JSON skeleton, with
the ``ckptd.*`` header of ``CheckpointMeta``. With DTensor state (FSDP2) the model,
optimizer and scheduler are planned by torch.distributed.checkpoint instead
(``trainer_hooks.dcpio``): this rank's chunks join its own state (RNG, progress,
``extra``) under names that differ between the ranks' files.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

from ckptd.core.format import FORMAT_VERSION
from ckptd.core.meta import CheckpointMeta
from trainer_hooks.pinned import pin_for
from trainer_hooks.staging import StagingBuffer, image_length
from trainer_hooks.state import Flat, Structure, capture, fingerprint, flatten, jsonable_metrics

if TYPE_CHECKING:
    import torch


HEADER_ROOM = 1 << 16


class Snapshotting:
    """Mixed into ``Checkpointer``: what composing a snapshot needs of it is declared here."""

    job: str
    rank: int
    model: Any
    optimizer: Any
    scheduler: Any
    extra: dict[str, Any] | None
    generators: dict[str, torch.Generator]
    epoch: float | None
    run_id: str
    _before_save: Callable[[], None] | None
    _dcp: bool
    _step: int
    _metrics: dict[str, Any] | None
    _structure: Structure
    _buffer: StagingBuffer
    _resized: bool
    saving: bool
    settings: dict[str, Any]

    def _capture(self, refresh: bool = True) -> dict[str, Any]:
        """The state this rank stores as its own (with DCP planning: all but model, optimizer, scheduler)."""
        if refresh and self._before_save is not None:
            self._before_save()
        trainer = {"job": self.job, "step": self._step, "epoch": self.epoch}
        if self._dcp:
            return capture(None, None, None, self.extra, trainer, self.generators)
        return capture(self.model, self.optimizer, self.scheduler, self.extra, trainer, self.generators)

    def _image(self, trigger: str, rule: str, now: float) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors and header fields of this save's snapshot."""
        if not self._dcp:
            flat, skeleton = flatten(self._capture())
            return flat.tensors, self._metadata(trigger, rule, now, skeleton, flat.aliases)
        from trainer_hooks import dcpio

        flat, skeleton = flatten({dcpio.local_key(self.rank): self._capture()})  # names unique across the ranks' files
        planned = dcpio.plan_save(dcpio.global_state(self.model, self.optimizer, self.scheduler), self.rank)
        tensors, keys = planned.header(flat.tensors)
        return tensors, {**self._metadata(trigger, rule, now, skeleton, flat.aliases), **keys}

    def _image_bytes(self, flat: Flat, skeleton: Any, planned: int) -> int:
        """What a snapshot of this state will take in the staging buffer, with room for a header
        that grows between saves (step numbers, metrics): the size reserved ahead of a save.
        Exact without DCP; with it, this rank's ``planned`` bytes stand in for its chunks."""
        length = image_length(flat.tensors, self._metadata("manual", "manual", time.time(), skeleton, flat.aliases))
        return length + planned + HEADER_ROOM

    def _resize(self) -> None:
        """Once, at the first step(): an optimizer that had no state at construction has it now
        (AdamW's moments are twice the model), and a model moved to the GPU after construction is
        there now: reserve (and page-lock) for the state as it is, ahead of the first save."""
        self._resized = True
        if self.saving:
            flat, skeleton = flatten(self._capture(refresh=False))
            self._buffer.pin = self._buffer.pin or self._wants_pinning(flat)
            self._buffer.reserve(self._image_bytes(flat, skeleton, self._planned_bytes()))

    def _wants_pinning(self, flat: Flat) -> bool:
        """Page-lock the snapshot buffer: this rank's state is on a GPU (``trainer_hooks.pinned``)."""
        state = [*flat.tensors.values(), *(self.model.state_dict().values() if self._dcp else ())]
        return pin_for(self.settings["snapshot"], self.job, state)

    def _planned_bytes(self) -> int:
        """With DCP planning (0 without), this rank's part of the model and optimizer state, read as it is: not through
        ``get_optimizer_state_dict``, which initialises an optimizer that has not stepped yet by
        stepping it (with lr 0, but its step count moves): constructing a Checkpointer must not
        change training."""
        if not self._dcp:
            return 0
        from trainer_hooks import dcpio

        optimizer = self.optimizer.state_dict()["state"] if self.optimizer is not None else {}
        return dcpio.local_bytes({"model": self.model.state_dict(), "optimizer": optimizer})

    def _metadata(self, trigger: str, rule: str, now: float, skeleton: Any,
                  aliases: dict[str, str]) -> dict[str, str]:
        meta = CheckpointMeta(self.job, self._step, now, trigger, rule, self.epoch, jsonable_metrics(self._metrics or {}),
                              self.run_id, fingerprint(self._structure))
        return meta.encode(skeleton, aliases, FORMAT_VERSION)


def holds_dtensors(model: Any) -> bool:
    """FSDP2 (or any DTensor) state: its snapshot is planned by torch.distributed.checkpoint."""
    if model is None:
        return False
    from trainer_hooks import dcpio

    return dcpio.has_dtensors(model.state_dict())

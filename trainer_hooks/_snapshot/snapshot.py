"""What one snapshot holds, composed for the staging buffer: tensors and header fields.

A save's snapshot is the nested state (``trainer_hooks._state.state.capture``: model, optimizer,
scheduler, RNGs, progress, ``extra``) flattened into tensors plus a JSON skeleton, with
the ``ckptd.*`` header of ``CheckpointMeta``. With DTensor state (FSDP2) the model,
optimizer and scheduler are planned by torch.distributed.checkpoint instead
(``trainer_hooks._ranks.dcpio``): this rank's chunks join its own state (RNG, progress,
``extra``) under names that differ between the ranks' files.

Two steps, so that ``snapshot="overlap"`` can leave the second to its copy thread: ``take``
reads, at the saving ``step()``, what the step must not outlive (the structure, the tensors,
the progress and metrics); ``compose`` turns that into the header fields (JSON, references to
unchanged frozen tensors) and reads nothing the next training step changes.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ckptd.core.format import FORMAT_VERSION
from ckptd.core.meta import HF_CONFIG, PEFT_CONFIG, CheckpointMeta
from ckptd.core.refs import REFS_KEY, encode
from trainer_hooks._snapshot.overlap import written_by_optimizer
from trainer_hooks._snapshot.pinned import pin_for
from trainer_hooks._snapshot.shared import SharedTensors, frozen_identities, identity
from trainer_hooks._snapshot.staging import StagingBuffer, image_length
from trainer_hooks._state.fit import Structure, fingerprint, model_structure
from trainer_hooks._state.state import Flat, TrainerObjects, capture, flatten, jsonable_metrics

if TYPE_CHECKING:
    import torch


HEADER_ROOM = 1 << 16
log = logging.getLogger(__name__)


@dataclass
class Position:
    """Where the run is, as the policy clock counts it: what a snapshot's header records. Not
    ``core.policy.Progress`` (what the save policy weighs: last save, time due, metric)."""

    step: int = 0
    epoch: float | None = None
    metrics: dict[str, Any] | None = None


@dataclass(frozen=True)
class Measured:
    state_bytes: int  # what the state holds (the disk must take one of these)
    image_bytes: int  # what to reserve in the staging buffer (0 on a rank that does not save)
    pin: bool  # page-lock the buffer: the state is on a GPU


@dataclass
class Taken:
    """A snapshot as read at its ``step()``, its header not yet composed (``Snapshotter.take``).
    Not "frozen": that word is for parameters that do not train (``shared.frozen_identities``)."""

    tensors: dict[str, torch.Tensor]
    aliases: dict[str, str]
    skeleton: Any
    meta: CheckpointMeta
    memory_only: bool
    fields: dict[str, str] = field(default_factory=dict)  # with DCP: the plan's header fields

    @property
    def on_gpu(self) -> bool:
        return any(t.is_cuda for t in self.tensors.values())


@dataclass
class Snapshotter:
    """The state one rank saves, composed into tensors and header fields for the staging buffer.

    It reads the trainer's objects (model, optimizer, scheduler, RNGs, ``extra``) and the run's
    ``Position`` only when asked, so what it composes is the state at the ``step()`` that asks.
    """

    job: str
    rank: int
    objects: TrainerObjects  # model, optimizer, scheduler, extra, generators
    progress: Position
    snapshot_mode: str  # the ``snapshot`` setting: auto | host | device
    dcp: bool = False  # DTensor state planned by torch.distributed.checkpoint (trainer_hooks._ranks.dcpio)
    before_save: Callable[[], None] | None = None  # e.g. a framework callback refreshing ``extra``
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    structure: Structure | None = None  # the model's structure, fixed at construction
    shared: SharedTensors | None = None  # unchanged frozen tensors referred to, not copied (SPEC §13)
    trainable_only: bool = False  # save="trainable": the model's trainable part and the buffers that changed
    _buffers_at_start: dict[str, tuple[Any, int]] = field(default_factory=dict)
    _configs: dict[str, str] = field(default_factory=dict)  # what ``ckptd export`` needs to write hf/peft

    def __post_init__(self) -> None:
        if self.trainable_only and self.objects.model is not None:
            self._buffers_at_start = {n: (identity(b), b._version) for n, b in self.objects.model.named_buffers()}
        self._configs = model_configs(self.objects.model)

    def capture(self, refresh: bool = True) -> dict[str, Any]:
        """The state this rank stores as its own (with DCP planning: all but model, optimizer, scheduler)."""
        if refresh and self.before_save is not None:
            self.before_save()
        trainer = {"job": self.job, "step": self.progress.step, "epoch": self.progress.epoch}
        if self.dcp:
            return capture(None, None, None, self.objects.extra, trainer, self.objects.generators)
        if not self.trainable_only or self.objects.model is None:
            return capture(
                self.objects.model,
                self.objects.optimizer,
                self.objects.scheduler,
                self.objects.extra,
                trainer,
                self.objects.generators,
            )
        state = capture(
            None, self.objects.optimizer, self.objects.scheduler, self.objects.extra, trainer, self.objects.generators
        )
        return {**state, "model": self._trainable_state()}

    def _trainable_state(self) -> dict[str, Any]:
        """``save="trainable"``: the parameters that train and the buffers that changed since construction."""
        trains = {n for n, p in self.objects.model.named_parameters() if p.requires_grad}
        changed = {
            n
            for n, b in self.objects.model.named_buffers()
            if (identity(b), b._version) != self._buffers_at_start.get(n)
        }
        return {k: v for k, v in self.objects.model.state_dict().items() if k in trains or k in changed}

    def take(self, trigger: str, rule: str, now: float, memory_only: bool = False) -> Taken:
        """What must be read at the saving ``step()`` itself: the state's structure, its tensors (the
        live ones; with DCP, this rank's planned chunks) and the progress. ``compose`` may run later."""
        if not self.dcp:
            flat, skeleton = flatten(self.capture())  # first: ``before_save`` may refresh what the header says
            return Taken(flat.tensors, flat.aliases, skeleton, self._meta(trigger, rule, now), memory_only)
        from trainer_hooks._ranks import dcpio

        flat, skeleton = flatten({dcpio.local_key(self.rank): self.capture()})  # names unique across the ranks' files
        planned = dcpio.plan_save(
            dcpio.global_state(self.objects.model, self.objects.optimizer, self.objects.scheduler), self.rank
        )
        tensors, keys = planned.header(flat.tensors)
        return Taken(tensors, flat.aliases, skeleton, self._meta(trigger, rule, now), memory_only, keys)

    def compose(self, taken: Taken) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors and header fields of a taken snapshot: the JSON, and the references that stand
        for unchanged frozen tensors. Reads nothing the next training step changes."""
        meta = {**self._fields(taken.meta, taken.skeleton, taken.aliases), **taken.fields}
        if self.shared is None:
            return taken.tensors, meta
        tensors, refs = self.shared.split(
            taken.meta.step, taken.tensors, frozen_identities(self.objects.model), record=not taken.memory_only
        )
        if refs:
            meta[REFS_KEY] = encode(refs)
        return tensors, meta

    def hold(self, taken: Taken) -> None:
        """Copy now what the next forward may write (buffers such as BatchNorm's statistics, tensors in
        ``extra``): the rest, which only the optimizer writes, is copied later, before it does."""
        later = set(self.optimizer_writes(taken.tensors))
        for name, t in taken.tensors.items():
            if t.numel() and name not in later:
                taken.tensors[name] = t.clone()

    def optimizer_writes(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        """The tensors only the optimizer writes between two steps (``snapshot="overlap"`` copies
        them beside the next forward and backward)."""
        ids = written_by_optimizer(self.objects.model, self.objects.optimizer)
        return [n for n, t in tensors.items() if t.numel() and identity(t) in ids]

    def image_bytes(self, flat: Flat, skeleton: Any, planned: int) -> int:
        """What a snapshot of this state will take in the staging buffer, with room for a header
        that grows between saves (step numbers, metrics): the size reserved ahead of a save.
        Exact without DCP; with it, this rank's ``planned`` bytes stand in for its chunks."""
        length = image_length(
            flat.tensors, self._fields(self._meta("manual", "manual", time.time()), skeleton, flat.aliases)
        )
        return length + planned + HEADER_ROOM

    def measure(self, saving: bool) -> Measured:
        """At construction: the state flattened once (an unserialisable ``extra`` fails here), the
        model's structure fixed for resume's fit check, and the sizes the buffer and disk need."""
        flat, skeleton = flatten(self.capture())
        self.structure = model_structure(flat)
        planned = self.planned_bytes()
        image = self.image_bytes(flat, skeleton, planned) if saving else 0
        return Measured(flat.nbytes + planned, image, saving and self.wants_pinning(flat))

    def reserve(self, buffer: StagingBuffer) -> None:
        """At the first ``step()``: an optimizer that had no state at construction has it now (AdamW's
        moments are twice the model), and a model moved to the GPU after construction is there now:
        reserve (and page-lock) the buffer for the state as it is, ahead of the first save."""
        flat, skeleton = flatten(self.capture(refresh=False))
        buffer.pin = buffer.pin or self.wants_pinning(flat)
        buffer.reserve(self.image_bytes(flat, skeleton, self.planned_bytes()))

    def wants_pinning(self, flat: Flat) -> bool:
        """Page-lock the snapshot buffer: this rank's state is on a GPU (``trainer_hooks._snapshot.pinned``)."""
        state = [*flat.tensors.values(), *(self.objects.model.state_dict().values() if self.dcp else ())]
        return pin_for(self.snapshot_mode, self.job, state)

    def planned_bytes(self) -> int:
        """With DCP planning (0 without), this rank's part of the model and optimizer state, read as it is: not through
        ``get_optimizer_state_dict``, which initialises an optimizer that has not stepped yet by
        stepping it (with lr 0, but its step count moves): constructing a Checkpointer must not
        change training."""
        if not self.dcp:
            return 0
        from trainer_hooks._ranks import dcpio

        optimizer = self.objects.optimizer.state_dict()["state"] if self.objects.optimizer is not None else {}
        return dcpio.local_bytes({"model": self.objects.model.state_dict(), "optimizer": optimizer})

    def _meta(self, trigger: str, rule: str, now: float) -> CheckpointMeta:
        p = self.progress
        return CheckpointMeta(
            self.job,
            p.step,
            now,
            trigger,
            rule,
            p.epoch,
            jsonable_metrics(p.metrics or {}),
            self.run_id,
            fingerprint(self.structure) if self.structure is not None else "",
        )

    def _fields(self, meta: CheckpointMeta, skeleton: Any, aliases: dict[str, str]) -> dict[str, str]:
        return {**meta.encode(skeleton, aliases, FORMAT_VERSION), **self._configs}


def model_configs(model: Any) -> dict[str, str]:
    """A HF model's config and a PEFT model's adapter configs, as JSON header fields: ``ckptd
    export --format hf|peft`` writes them back as ``config.json`` / ``adapter_config.json``."""
    out: dict[str, str] = {}
    try:
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "to_json_string"):
            out[HF_CONFIG] = with_architecture(config.to_json_string(use_diff=False), model)
        peft = getattr(model, "peft_config", None)
        if isinstance(peft, dict) and peft:
            out[PEFT_CONFIG] = json.dumps(
                {name: c.to_dict() for name, c in peft.items()},
                sort_keys=True,
                default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v),
            )
    except Exception as exc:  # a config that does not serialise costs the export format, never a save
        log.warning("ckptd: the model's config is not recorded (ckptd export --format hf/peft will say so): %s", exc)
    return out


def with_architecture(config_json: str, model: Any) -> str:
    """``architectures`` from the model's class when the config has none (a model built from a config
    rather than loaded), as ``save_pretrained`` writes it: Auto classes and pipelines pick the class by
    it. A PEFT model names its base model's class."""
    doc = json.loads(config_json)
    if doc.get("architectures"):
        return config_json
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    doc["architectures"] = [type(base).__name__]
    return json.dumps(doc, indent=2, sort_keys=True)


def holds_dtensors(model: Any) -> bool:
    """FSDP2 (or any DTensor) state: its snapshot is planned by torch.distributed.checkpoint."""
    if model is None:
        return False
    from trainer_hooks._ranks import dcpio

    return dcpio.has_dtensors(model.state_dict())

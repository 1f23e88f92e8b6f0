"""The ``ckptd.*`` keys of a checkpoint's ``__metadata__``: written here, read here.

Every value is a string (safetensors' rule); JSON where the value is structured. The
hook writes them (``CheckpointMeta.encode``), everything else reads them
(``CheckpointMeta.decode``), and docs/format.md describes each. ``ckptd.digests`` and
``ckptd.meta_digest`` are filled in by whoever persists the snapshot
(``ckptd.disk.persist``), not by the writer of the state.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

__all__ = [
    "FORMAT",
    "JOB",
    "STEP",
    "EPOCH",
    "CREATED",
    "TRIGGER",
    "RULE",
    "METRICS",
    "STATE",
    "ALIASES",
    "RUN",
    "FINGERPRINT",
    "DIGESTS",
    "META_DIGEST",
    "WORLD_SIZE",
    "LAYOUT",
    "DCP",
    "DCP_SHARDING_INFO",
    "CheckpointMeta",
    "iso_utc",
    "parse_time",
]

FORMAT, JOB, STEP, EPOCH, CREATED = "ckptd.format", "ckptd.job", "ckptd.step", "ckptd.epoch", "ckptd.created"
TRIGGER, RULE, METRICS, STATE, ALIASES = "ckptd.trigger", "ckptd.rule", "ckptd.metrics", "ckptd.state", "ckptd.aliases"
HF_CONFIG, PEFT_CONFIG = "ckptd.hf_config", "ckptd.peft_config"  # what ckptd export writes back (SPEC §13)
RUN, FINGERPRINT = "ckptd.run", "ckptd.fingerprint"  # which run wrote it; the state's structure (names, shapes, dtypes)
DIGESTS, META_DIGEST, WORLD_SIZE = "ckptd.digests", "ckptd.meta_digest", "ckptd.world_size"
LAYOUT, DCP = "ckptd.layout", "ckptd.dcp"  # a sharded unit planned by torch.distributed.checkpoint: sizes, objects
DCP_SHARDING_INFO = "DCP_SHARDING_INFO"  # torch's key (HuggingFaceStorageReader): each tensor's chunk offsets


def iso_utc(when: float) -> str:
    return datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> float:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint says about itself, beside its tensors."""

    job: str
    step: int
    created: float
    trigger: str = ""
    rule: str = ""
    epoch: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    run: str = ""
    fingerprint: str = ""

    def encode(self, state: Any, aliases: Mapping[str, str], format_version: str) -> dict[str, str]:
        """The header fields of a new snapshot (digests are added when it is persisted)."""
        out = {
            FORMAT: format_version,
            JOB: self.job,
            STEP: str(self.step),
            EPOCH: "" if self.epoch is None else repr(float(self.epoch)),
            CREATED: iso_utc(self.created),
            TRIGGER: self.trigger,
            RULE: self.rule,
            METRICS: json.dumps(self.metrics),
            STATE: json.dumps(state, separators=(",", ":")),
            ALIASES: json.dumps(dict(aliases), separators=(",", ":")),
        }
        if self.run:
            out[RUN] = self.run
        if self.fingerprint:
            out[FINGERPRINT] = self.fingerprint
        return out

    @classmethod
    def decode(cls, meta: Mapping[str, str], mtime: float = 0.0) -> "CheckpointMeta":
        """Lenient: a missing or malformed field reads as empty (``verify`` judges the file)."""
        return cls(
            meta.get(JOB, ""),
            _int(meta.get(STEP)),
            parse_time(meta.get(CREATED, "")) or mtime,
            meta.get(TRIGGER, ""),
            meta.get(RULE, ""),
            _float(meta.get(EPOCH)),
            _json_dict(meta.get(METRICS)),
            meta.get(RUN, ""),
            meta.get(FINGERPRINT, ""),
        )


def _int(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0


def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "", "null") else None
    except ValueError:
        return None
    return value if value is None or math.isfinite(value) else None


def _json_dict(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}

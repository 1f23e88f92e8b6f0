"""DeepSpeed checkpoints: a tag directory (``global_stepN/``) is one unit.

``engine.save_checkpoint(dir)`` writes, per tag: ``mp_rank_MM_model_states.pt`` (ZeRO-0/1/2: the
model, written by data-parallel rank 0 of each model-parallel rank) or
``zero_pp_rank_D_mp_rank_MM_model_states.pt`` (ZeRO-3: every rank), and with ZeRO
``[bf16_]zero_pp_rank_D_mp_rank_MM_optim_states.pt`` (every rank its optimizer partition); then
rank 0 writes the tag's name into ``dir/latest``. Nothing of it is atomic: each rank writes
straight to the final name, ``latest`` is a plain write. So a tag is complete only when the
model-states file says how many ranks wrote it (``dp_world_size``, ``mp_world_size``, the ZeRO
stage in ``ds_config``) and every one of those ranks' files is there and loads.
"""

from __future__ import annotations

import json
import os
import re
import stat
from typing import Any

from ckptd.disk.safepath import open_regular
from ckptd.disk.scan import Checkpoint, is_pinned
from ckptd.disk.verify import VerifyResult, verify_file
from ckptd.foreign.picklesafe import UnsafePickle, safe_load, verify_torch
from ckptd.foreign.steps import step_from_name

RANK_FILE = re.compile(
    r"^(?:(?P<bf16>bf16_)?zero_pp_rank_(?P<dp>\d+)_)?mp_rank_(?P<mp>\d+)_(?P<what>model|optim)_states\.pt$"
)
LATEST = "latest"
COMMIT = "ckptd-commit.json"  # inside a tag ckptd committed (``trainer_hooks.deepspeed``): who wrote it, when


def is_tag(names: set[str]) -> bool:
    """Whether a directory's file names are a DeepSpeed tag's."""
    return any(RANK_FILE.match(n) for n in names)


def _model_states_name(names: set[str]) -> str | None:
    for n in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if n in names:
            return n
    return None


def layout(path: str) -> tuple[dict[str, Any], str]:
    """What the tag's first model-states file says about who wrote it: ``{"dp": .., "mp": ..,
    "stage": .., "step": ..}``, or ("", why not) when it cannot be read (yet)."""
    names = set(os.listdir(path))
    first = _model_states_name(names)
    if first is None:
        return {}, "no model-states file (mp_rank_00_model_states.pt or zero_pp_rank_0_mp_rank_00_model_states.pt)"
    try:
        states = safe_load(os.path.join(path, first), mmap=True)
    except UnsafePickle as exc:
        return {}, f"{first}: {exc}"
    except Exception as exc:  # a torn zip, a truncated pickle: the writer is not done or it is corrupt
        return {}, f"{first} not readable: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}"
    if not isinstance(states, dict):
        return {}, f"{first} holds no DeepSpeed model states"
    cfg = states.get("ds_config")
    zero = cfg.get("zero_optimization") if isinstance(cfg, dict) else None
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    if first.startswith("zero_pp_rank_"):
        stage = 3
    dp, mp, step = states.get("dp_world_size"), states.get("mp_world_size", 1), states.get("global_steps")
    if not isinstance(dp, int) or not isinstance(mp, int) or dp < 1 or mp < 1 or not isinstance(stage, int):
        return {}, f"{first} does not say the world size (dp_world_size {dp!r}, mp_world_size {mp!r})"
    return {"dp": dp, "mp": mp, "stage": stage, "step": step if isinstance(step, int) else None}, ""


def expected_files(names: set[str], dp: int, mp: int, stage: int) -> list[str]:
    """Every rank's files a tag written by ``dp`` x ``mp`` ranks at ``stage`` must hold."""
    bf16 = "bf16_" if any(n.startswith("bf16_zero_pp_rank_") for n in names) else ""
    optim = stage > 0 or bool(bf16) or any(n.endswith("_optim_states.pt") for n in names)
    out = []
    for m in range(mp):
        if stage >= 3:
            out += [f"zero_pp_rank_{d}_mp_rank_{m:02d}_model_states.pt" for d in range(dp)]
        else:
            out.append(f"mp_rank_{m:02d}_model_states.pt")
        if optim:
            out += [f"{bf16}zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt" for d in range(dp)]
    return out


def incomplete(path: str) -> str | None:
    """Why the tag is not a whole checkpoint yet (None when every rank's file is there)."""
    info, why = layout(path)
    if why:
        return why
    names = set(os.listdir(path))
    missing = [n for n in expected_files(names, info["dp"], info["mp"], info["stage"]) if n not in names]
    if missing:
        return (
            f"{len(missing)} rank file(s) missing for ZeRO-{info['stage']} with {info['dp'] * info['mp']} "
            f"ranks: {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    return None


def verify(path: str) -> VerifyResult:
    """Every rank's file present (as many as the tag says wrote it), each passing its zip CRCs
    and a weights-only load (DeepSpeed's objects as inert data)."""
    names = set(os.listdir(path))
    rank_files = sorted(n for n in names if RANK_FILE.match(n) or n.endswith("_model_states.pt"))
    tensors = total = 0
    for n in rank_files:
        r = verify_torch(os.path.join(path, n))
        if not r.ok:
            return _named(path, VerifyResult(path, False, f"{n}: {r.reason}", unsafe=r.unsafe))
        tensors += r.tensors
        total += r.bytes
    reason = incomplete(path)
    if reason:
        return _named(path, VerifyResult(path, False, f"incomplete DeepSpeed tag: {reason}"))
    return VerifyResult(path, True, "", tensors, total)


def _named(path: str, result: VerifyResult) -> VerifyResult:
    """A failed tag that DeepSpeed's own ``latest`` file names: ``load_checkpoint`` would pick it."""
    if latest_names(os.path.dirname(path.rstrip("/"))) == os.path.basename(path.rstrip("/")):
        return VerifyResult(
            result.path,
            False,
            result.reason + f" (and {LATEST} names this tag: DeepSpeed's load_checkpoint would resume from it)",
            unsafe=result.unsafe,
        )
    return result


def latest_names(directory: str) -> str | None:
    """The tag a DeepSpeed ``latest`` file in ``directory`` names (None: no such file)."""
    try:
        with open_regular(os.path.join(directory, LATEST)) as f:
            text = f.read(4096).decode("utf-8", "replace").strip()
    except OSError:
        return None
    return text or None


# -- tags ckptd committed (an engine job's checkpoints) ----------------------------------------


def is_committed(path: str) -> bool:
    """A DeepSpeed tag that ckptd's engine hook committed (its ``COMMIT`` record inside); no link."""
    return not os.path.islink(path) and os.path.isdir(path) and os.path.isfile(os.path.join(path, COMMIT))


def committed_tags(directory: str) -> list[tuple[int, str]]:
    """(step, name) of the committed tags in ``directory``, oldest first (hidden names and links skipped)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    out = []
    for n in names:
        step = step_from_name(n)
        if not n.startswith(".") and step is not None and is_committed(os.path.join(directory, n)):
            out.append((step, n))
    return sorted(out)


def job_tags(directory: str, job: str) -> list[Checkpoint]:
    """``job``'s committed tags in ``directory``, oldest first, as their ``COMMIT`` records
    describe them (for retention over them, and the best metric so far on resume)."""
    infos = [committed_info(os.path.join(directory, n)) for _, n in committed_tags(directory)]
    return [c for c in infos if c.job == job]


def committed_info(path: str) -> Checkpoint:
    """A committed tag as the catalogue and retention describe a checkpoint: job, step and
    creation time from its ``COMMIT`` record (read without following a link), its bytes."""
    try:
        with open_regular(os.path.join(path, COMMIT)) as f:
            record = json.loads(f.read(1 << 20) or b"{}")
        names = os.listdir(path)
        size = sum(os.lstat(os.path.join(path, n)).st_size for n in names)
    except (OSError, ValueError) as exc:
        return Checkpoint(path, "", -1, 0, problem=f"{COMMIT}: {exc}")
    record = record if isinstance(record, dict) else {}
    step, created, metrics = record.get("step"), record.get("created"), record.get("metrics")
    return Checkpoint(
        path,
        str(record.get("job") or ""),
        step if isinstance(step, int) else -1,
        size,
        float(created) if isinstance(created, (int, float)) else os.lstat(path).st_mtime,
        trigger=str(record.get("trigger") or ""),
        metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))} if isinstance(metrics, dict) else {},
        pinned=is_pinned(path),
        shards=sum(1 for n in names if RANK_FILE.match(n)),
    )


def not_plain(dir_fd: int) -> str:
    """Why a tag opened as ``dir_fd`` (without following a link) is no plain tag ("" when it is):
    each entry must be a regular file or directory itself, never a link, a FIFO or a device, so
    that verifying it reads the tag's own files and nothing a link points at."""
    for n in sorted(os.listdir(dir_fd)):
        mode = os.stat(n, dir_fd=dir_fd, follow_symlinks=False).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            return f"{n} is not a regular file (a link, a FIFO or a device)"
    return ""


def verify_ours(path: str) -> VerifyResult:
    """A ckptd checkpoint of any shape verified now: a committed DeepSpeed tag (every rank's file),
    else a file or a sharded unit (``verify_file``)."""
    return verify(path) if is_committed(path) else verify_file(path)

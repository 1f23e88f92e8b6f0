"""Whose a checkpoint is: what the hook resumes must be its own uid's (SPEC §6, docs/security.md).

A trainer loads weights, optimizer state and RNG from what it resumes: a file another uid
put in its directory (planted, hard-linked, a symlink, a whole directory swapped for one of
theirs) would make the run continue from that uid's state without a word. So a candidate
counts only when the job directory, the checkpoint (a file, or a sharded unit's directory and
every file in it) and every holder it references (SPEC §13) belong to the resuming uid, and
none of them is a symbolic link. The answer is a reason in words ("" when it is the uid's),
which the caller logs with the path it skipped.
"""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from typing import Callable, Mapping

from ckptd.disk.refs import holders
from ckptd.disk.verify import VerifyResult

__all__ = ["directory_problem", "holders_problem", "owner_problem", "verified_if_owned"]


def _problem(path: str, uid: int, what: str) -> str:
    """Why ``path`` (not followed if a link) is not ``uid``'s own ``what`` ("" when it is)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return f"{what} {path} is missing"
    except OSError as exc:
        return f"{what} {path} cannot be examined: {exc.strerror or exc}"
    if stat.S_ISLNK(st.st_mode):
        return f"{what} {path} is a symbolic link (owned by uid {st.st_uid}): only your own files are resumed"
    if st.st_uid != uid:
        return f"{what} {path} is owned by uid {st.st_uid}, not by uid {uid}: only your own files are resumed"
    return ""


def directory_problem(directory: str, uid: int) -> str:
    """Why the job directory is not ``uid``'s own ("" when it is, or when it does not exist yet)."""
    if not os.path.lexists(directory):
        return ""
    problem = _problem(directory, uid, "the job directory")
    if not problem and not os.path.isdir(directory):
        return f"the job directory {directory} is not a directory"
    return problem


def owner_problem(path: str, uid: int) -> str:
    """Why the checkpoint at ``path`` is not ``uid``'s: the file, or a unit's directory and each
    file in it (its shards and manifest)."""
    problem = _problem(path, uid, "checkpoint")
    if problem or not os.path.isdir(path):
        return problem
    try:
        names = sorted(os.listdir(path))
    except OSError as exc:
        return f"checkpoint {path} cannot be listed: {exc.strerror or exc}"
    for name in names:
        problem = _problem(os.path.join(path, name), uid, "file")
        if problem:
            return problem
    return ""


def holders_problem(directory: str, metadata: Mapping[str, str], uid: int) -> str:
    """Why a holder the checkpoint refers to for tensors it does not store is not ``uid``'s."""
    for name in holders(metadata):
        problem = _problem(os.path.join(directory, name), uid, "referenced file")
        if problem:
            return problem
    return ""


def verified_if_owned(path: str, directory: str, uid: int, verify: Callable[[str], VerifyResult]) -> VerifyResult:
    """``verify(path)`` for a checkpoint that is ``uid``'s (not read at all when it is not), then
    its holders' owners; a failed result says why, for the caller's "skipping" line."""
    problem = owner_problem(path, uid)
    if problem:
        return VerifyResult(path, False, problem)
    result = verify(path)
    if result.ok and (problem := holders_problem(directory, result.metadata, uid)):
        return replace(result, ok=False, reason=problem)
    return result

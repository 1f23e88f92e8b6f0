"""The resume side of ``Checkpointer``: find the newest checkpoint that verifies, load it.

In order, on every rank: (1) wait for the save in flight (its collectives must not
interleave with the agreement below); (2) ``newest_verified`` walks the job's checkpoints
newest first, each verified now (sharded: first the ranks agree on the units every one of
them holds, an ``all_gather`` of their listings, since node-local disks differ; then each
shard is re-read by one rank, the others' checked cheaply, and all ranks agree with an
``all_reduce(MIN)``; none in common while some rank holds a committed unit: the same
``ResumeError`` on every rank, at once); (3) none: with a remote
tier, fetch the newest that verifies there (sharded: each disk's lead, unless its disk holds
that unit already) and look again; (4) check that it fits the model (a stale run in the same directory is
refused, never loaded partly); (5) load: the file, or this rank's shard, or for a ``dcp``
unit DCP's load planner over every shard (any number of ranks); then RNG, ``extra`` and
the step count, so the next save and the triggers continue from there.

Only what the resuming uid owns is resumed (docs/security.md, "What the hook resumes"): the
job directory must be its own (else ``ResumeError``: it may have been swapped); on disk a
checkpoint, the files of a unit and every holder it refers to must be its own and no link;
from memory only a snapshot the daemon holds for this uid and this very directory (same device
and inode); from a remote only a unit whose commit object names this uid and directory. Each
candidate skipped is logged with its path and why.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Collection

from ckptd.core.meta import FINGERPRINT
from ckptd.core.settings import Settings
from ckptd.disk.manifest import DCP as DCP_LAYOUT
from ckptd.disk.manifest import read as read_manifest
from ckptd.disk.manifest import shard_name
from ckptd.disk.scan import Checkpoint, scan
from ckptd.disk.verify import VerifyResult, verify_file, verify_unit
from ckptd.save.newest import agreed_order, first_verified, newest_verified
from ckptd.save.owned import directory_problem, verified_if_owned
from trainer_hooks._state.fit import Structure, fingerprint, structure_problem
from trainer_hooks._state.loader import load
from trainer_hooks._state.state import TrainerObjects, apply

if TYPE_CHECKING:
    from ckptd.remote.listing import RemoteCheckpoint
    from trainer_hooks._ranks.shards import ShardGroup

log = logging.getLogger(__name__)


def say_resumed(job: str, step: int, path: str | None, source: str, seconds: float, where: str = "") -> None:
    """The one line a resume prints on stderr by default (``quiet=True`` silences it): at the
    default log level a silent resume left users guessing whether it had found anything."""
    if path is None:
        line = f"ckptd: job {job}: nothing to resume (no verified checkpoint{f' in {where}' if where else ''}), step 0"
    else:
        line = f"ckptd: job {job} resumed at step {step} from {path} (verified, from {source})"
    print(f"{line} [{seconds:.2f}s]", file=sys.stderr, flush=True)


def newest_to_resume(job: str, directory: str, quiet: bool) -> Checkpoint | None:
    """The newest verified single-file checkpoint of ``job`` in ``directory`` that is the uid's own,
    said as every resume says it: what a framework's resume (HF, Lightning) rebuilds in its own format."""
    t0 = time.perf_counter()
    info = newest_verified(directory, job, units=False, owner=os.geteuid())  # only the uid's own
    if not quiet:
        say_resumed(
            job, info.step if info else 0, info.path if info else None, "disk", time.perf_counter() - t0, directory
        )
    return info


class ResumeError(RuntimeError):
    """The newest verified checkpoint does not fit the model; the message says how to start fresh."""


@dataclass(frozen=True)
class Resumed:
    """What a resume restored: the run continues from ``step``."""

    step: int
    epoch: float | None
    path: str


@dataclass
class Resumer:
    """Finds the newest checkpoint of a job that verifies (locally, else on its remote tier) and
    loads it into the trainer's objects; the ``Checkpointer`` then continues its count from it."""

    job: str
    directory: str
    settings: Settings
    rank: int
    world_size: int
    objects: TrainerObjects  # model, optimizer, scheduler, extra, generators
    structure: Structure
    shards: ShardGroup | None = None
    quiet: bool = False
    strict: bool = True  # False for save="trainable": the base is the user's to load
    socket_path: str | None = None  # the daemon whose memory tier may hold the newest snapshot
    # sharded: each rank's units at the last look, (name, step, committed), gathered from every rank
    held: list[list[tuple[str, int, bool]]] = field(default_factory=list, init=False)

    def checkpoints(self) -> list[Checkpoint]:
        return scan(self.directory, self.job)

    def resume(self, fresh: bool = False) -> Resumed | None:
        """Load the newest checkpoint that verifies now; None if there is none (or ``fresh``).

        A checkpoint that does not fit the model (a stale run in the same directory, a
        changed architecture) is refused with ``ResumeError``, never loaded partly.
        ``fresh=True`` moves every existing checkpoint of the job into
        ``DIR/.ckptd-stale/<time>/`` (nothing is deleted).
        """
        if fresh:
            self._move_aside()
            return None
        problem = directory_problem(self.directory, os.geteuid())
        if self.shards is not None:  # one rank's refusal is every rank's: the others must not wait for it
            problem = self.shards.anyone(problem)
        if problem:
            raise ResumeError(
                f"job {self.job}: {problem}. Nothing in it is resumed (another user may have swapped "
                "it for one of theirs); give this run a directory of your own"
            )
        t0, source = time.perf_counter(), "disk"
        remembered = self._from_memory(t0)
        if remembered is not None:
            return remembered
        info = self._newest()
        if info is None and self._fetch_remote():
            info, source = self._newest(), "remote"
        if info is None:
            self._none_in_common()
            self._say(None, 0, source, t0)
            return None
        fits = self.shards is not None or self.objects.model is None  # (a sharded rank holds its part of the model)
        problem = "" if fits else structure_problem(self.structure, info.path)
        if problem:
            raise ResumeError(
                f"the newest checkpoint of job {self.job}, {info.path} (step {info.step}), does not fit "
                f"this model: {problem}. It may be from an older run in the same directory. Start "
                "fresh with ckpt.resume(fresh=True) (moves the job's checkpoints into .ckptd-stale/), "
                "or give this run another directory or job name"
            )
        resumed = self._finish(self._load(info), info.step, info.path, source, t0)
        log.info("ckptd: resumed job %s from %s (step %d)", self.job, info.path, resumed.step)
        return resumed

    def _newest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies, for every rank. Sharded, the ranks first agree on
        the candidates (an ``all_gather`` of what each one's directory holds): with node-local
        disks, or a unit committed between two ranks' listings, they can differ, and ranks that
        verify different lists enter mismatched collectives (a hang, or each loading another
        step). Only the units every rank holds are candidates, newest first."""
        if self.shards is None:
            return newest_verified(self.directory, self.job, check=self._resumable)
        mine = {os.path.basename(c.path): c for c in self._listing()}
        self.held = self.shards.gather([(name, c.step, c.ok and not c.pending) for name, c in mine.items()])
        common = _common(self.held)
        for name in sorted(set(mine) - common):
            log.warning("ckptd: rank %d: skipping %s: not every rank holds it", self.rank, mine[name].path)
        return first_verified([mine[name] for name in agreed_order(self.held, common)], self._resumable)

    def _listing(self) -> list[Checkpoint]:
        """This rank's units; none when its directory cannot be listed (that rank then holds
        nothing, and still takes part in every collective)."""
        try:
            return self.checkpoints() if os.path.isdir(self.directory) else []
        except OSError as exc:
            log.error("ckptd: rank %d: cannot list %s: %s", self.rank, self.directory, exc)
            return []

    def _none_in_common(self) -> None:
        """Sharded, no unit verified for every rank while some rank holds a committed one: the
        same ``ResumeError`` on every rank, now, rather than a silent start from step 0 (a run
        that loses its progress) or ranks resuming different steps. That is when no unit is
        held by every rank, or, across node-local disks, when none of those held verifies (a
        rank's own shard on another host's disk: torchrun gave it another rank). On one disk,
        units every rank holds that all fail to verify start the run afresh, each skip logged."""
        committed = [[name for name, _, ok in reversed(names) if ok] for names in self.held]
        if self.shards is None or not any(committed):
            return
        if _common(self.held) and self.shards.disks == 1:
            return
        seen = "; ".join(f"rank {r}: {', '.join(names[:3]) or 'none'}" for r, names in enumerate(committed))
        raise ResumeError(
            f"job {self.job}: no checkpoint is held and verified by all {self.world_size} ranks, though some hold "
            f"committed ones (newest first: {seen}; each rank's log says why it skipped each). Resuming would "
            "lose them or split the ranks across steps. Run each rank where its shards are (the same ranks on "
            "the same hosts), make the same unit readable to every rank (a shared directory, or the remote "
            "tier), or start fresh with ckpt.resume(fresh=True) on every rank"
        )

    def _from_memory(self, t0: float) -> Resumed | None:
        """The daemon's memory tier (SPEC §14): the newest verified snapshot without reading its
        file, when the daemon holds it, it verifies, and it fits the model (else: from disk)."""
        if self.socket_path is None or self.shards is not None:
            return None
        from trainer_hooks._resume import memory

        try:
            st = os.stat(self.directory)
        except OSError:
            return None  # no directory (removed since): nothing of it is in memory either
        on_disk = [c.step for c in self.checkpoints() if c.ok and not c.pending]
        into = (
            {f"model/{k}": t for k, t in self.objects.model.state_dict().items()}
            if self.objects.model is not None
            else {}
        )
        snap = memory.fetch(
            self.socket_path,
            self.job,
            self.directory,
            (st.st_dev, st.st_ino),
            max(on_disk, default=-1),
            lambda meta: self.objects.model is None or meta.get(FINGERPRINT) == fingerprint(self.structure),
            into,
        )
        if snap is None:
            return None
        apply(
            snap.state,
            self.objects.model,
            self.objects.optimizer,
            self.objects.scheduler,
            self.objects.generators,
            strict=self.strict,
        )
        where = snap.path or "the daemon's memory (a memory-only save: not on disk)"
        return self._finish(snap.state, snap.step, where, "memory", t0)

    def _finish(self, state: dict[str, Any], step: int, where: str, source: str, t0: float) -> Resumed:
        """After the state was applied, wherever it came from: ``extra`` back, the step and epoch the
        trainer recorded, and the line that says where the run resumed from."""
        if self.objects.extra is not None and "extra" in state:
            self.objects.extra.clear()
            self.objects.extra.update(state["extra"])
        trainer = state.get("trainer", {})
        resumed = Resumed(int(trainer.get("step", step)), trainer.get("epoch"), where)
        self._say(where, resumed.step, source, t0)
        return resumed

    def _load(self, info: Checkpoint) -> dict[str, Any]:
        """The file, or this rank's shard, or for a ``dcp`` unit DCP's load planner over every shard."""
        manifest = read_manifest(info.path) if self.shards is not None else None
        if manifest is not None and manifest.layout == DCP_LAYOUT:
            return self._load_planned(info.path, manifest.world_size)
        state = _load_owned(
            info.path if self.shards is None else os.path.join(info.path, shard_name(self.rank, self.world_size))
        )
        apply(
            state,
            self.objects.model,
            self.objects.optimizer,
            self.objects.scheduler,
            self.objects.generators,
            strict=self.strict,
        )
        return state

    def _say(self, path: str | None, step: int, source: str, t0: float) -> None:
        """One line on stderr (rank 0 of a multi-rank run), unless ``quiet=True``; sharded, every
        rank also logs its own (its source, step and seconds: on node-local disks they differ)."""
        seconds = time.perf_counter() - t0
        if not self.quiet and self.rank == 0:
            say_resumed(self.job, step, path, source, seconds, self.directory)
        if self.shards is not None:
            log.info(
                "ckptd: job %s rank %d resumed at step %d from %s (%s, %.2fs)",
                self.job,
                self.rank,
                step,
                path or "nothing",
                source,
                seconds,
            )

    def _load_planned(self, unit: str, saved_by: int) -> dict[str, Any]:
        """A unit DCP planned, saved by any number of ranks: DCP's load planner reshards the
        model and optimizer; this rank's own state (RNG, ``extra``) comes from its own shard
        when the unit has one (the same rank count), else it is left as it is."""
        from trainer_hooks._ranks import dcpio

        assert self.shards is not None
        dcpio.load_unit(unit, self.objects.model, self.objects.optimizer, self.objects.scheduler, self.shards.plans)
        own = self.rank if self.rank < saved_by else 0
        state: dict[str, Any] = load(os.path.join(unit, shard_name(own, saved_by)))[dcpio.local_key(own)]
        if own != self.rank or saved_by != self.world_size:
            log.info(
                "ckptd: rank %d of %d resumes a checkpoint of %d ranks (resharded); its RNG and extra %s",
                self.rank,
                self.world_size,
                saved_by,
                "stay as they are (the unit has no shard of this rank)" if own != self.rank else "are its own",
            )
        if own == self.rank:
            apply(state, generators=self.objects.generators)
        else:
            state.pop("extra", None)
        return state

    def _fetch_remote(self) -> bool:
        """No local checkpoint verifies (sharded: none every rank holds): a new host resumes from
        the remote tier, if there is one. Sharded: each disk's lead fetches the newest remote unit
        that verifies, unless its disk holds it committed already, with the same manifest, and it
        was not tried yet (a surviving host's own part of a unit spread over node-local disks,
        which the other hosts lacked); then every rank looks again."""
        if not self.settings.remote:
            return False
        if self.shards is None:
            return self._fetch_newest() is not None
        self.shards.everyone(True)  # every rank has looked at its directory before anything appears in it
        tried = _common(self.held)  # (``_newest`` gathered them: every rank held these, and one failed)
        here = [name for name, _, ok in self.held[self.rank] if ok and name not in tried]
        path = self._fetch_newest(here) if self.shards.lead else None
        self.shards.everyone(True)  # each lead's copy is in place before its disk's ranks look
        return not self.shards.everyone(path is None)  # the same answer on every rank

    def _fetch_newest(self, here: Collection[str] = ()) -> str | None:
        from ckptd.remote.fetch import fetch
        from ckptd.remote.layout import prefix_in
        from ckptd.remote.stores import RemoteError, open_store

        try:  # only this uid's own job in this directory (layout.job_prefix), and its commit object must say so
            path = fetch(
                open_store(self.settings.remote, self.settings.remote_endpoint),
                prefix_in(self.settings, self.job, self.directory),
                self.directory,
                check=self._remote_ours,
                here=here,
            )
        except (RemoteError, OSError) as exc:
            log.error("ckptd: job %s: no local checkpoint, and the remote tier cannot be read: %s", self.job, exc)
            return None
        if path is not None and os.path.basename(path) not in here:
            log.info("ckptd: job %s: no local checkpoint; fetched %s from %s", self.job, path, self.settings.remote)
        return path

    def _move_aside(self) -> None:
        stale = os.path.join(self.directory, ".ckptd-stale", time.strftime("%Y%m%dT%H%M%S"))
        for c in self.checkpoints():
            os.makedirs(stale, exist_ok=True)
            os.rename(c.path, os.path.join(stale, os.path.basename(c.path)))
            log.warning("ckptd: resume(fresh=True): moved %s aside to %s", c.path, stale)

    def _remote_ours(self, c: RemoteCheckpoint) -> bool:
        """A remote unit is fetched only when its commit object names this uid and this directory.
        One written before the layout named them (neither recorded) was listed with this trainer's
        own credentials, which the store's access control let read it: fetched, said in the log."""
        uid, directory = remote_owner(c)
        if uid is None and directory is None:
            log.warning(
                "ckptd: job %s: remote %s names no owner (written before the layout recorded one); "
                "fetched because this trainer's own credentials read it",
                self.job,
                c.key,
            )
            return True
        if uid == os.geteuid() and directory == os.path.realpath(self.directory):
            return True
        log.warning(
            "ckptd: skipping remote %s: its commit object names uid %s in %s, this run is uid %d in %s",
            c.key,
            uid,
            directory,
            os.geteuid(),
            os.path.realpath(self.directory),
        )
        return False

    def _resumable(self, info: Checkpoint) -> VerifyResult:
        """Is ``info`` this uid's own and does it verify for this rank (sharded: this rank's shard,
        and on every rank: the ownership answer takes part in the agreement)?"""
        if self.shards is None:
            return verified_if_owned(info.path, self.directory, os.geteuid(), verify_file)
        # each shard re-read by one rank (its own, with as many ranks), its peers' checked cheaply
        full = range(self.rank, 1 << 31, self.world_size)
        result = verified_if_owned(info.path, self.directory, os.geteuid(), lambda p: verify_unit(p, full=full))
        if (
            result.ok
            and result.metadata.get("ckptd.world_size") != str(self.world_size)
            and result.metadata.get("ckptd.layout") != DCP_LAYOUT
        ):
            result = replace(
                result,
                ok=False,
                reason=f"saved by {result.metadata.get('ckptd.world_size')} ranks, "
                f"this run has {self.world_size}: each rank saved its own plain "
                "tensors, which do not reshard (DTensor state, FSDP2, does)",
            )
        if (
            result.ok
            and result.metadata.get("ckptd.layout") == DCP_LAYOUT
            and "ckptd.shards_elsewhere" in result.metadata
        ):
            result = replace(
                result,
                ok=False,
                reason="its DCP-planned shards are spread over node-local disks, and DCP's load planner reads "
                "every shard: resume it where one directory holds them all (a shared filesystem)",
            )
        if self.shards.everyone(result.ok) != result.ok:
            result = replace(result, ok=False, reason="another rank's shard of it does not verify")
        return result


def _common(held: list[list[tuple[str, int, bool]]]) -> set[str]:
    """The units every rank holds, from the gathered listings."""
    return set.intersection(*({name for name, _, _ in names} for names in held))


def _load_owned(path: str) -> dict[str, Any]:
    """``load`` from the very file whose owner is checked: opened once without following a link,
    its owner checked on that descriptor and read through it, so a file swapped in after the
    candidate was checked (by someone who may write into the directory) is never what is loaded."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise ResumeError(
                f"{path} changed after it was checked: it is now owned by uid {st.st_uid}, not by uid "
                f"{os.geteuid()} (another user can write into its directory); it is not loaded"
            )
        return load(path, via=f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def remote_owner(c: RemoteCheckpoint) -> tuple[int | None, str | None]:
    """The owner uid and job directory a remote commit object names (``owner_uid`` and
    ``directory`` in its JSON); (None, None) for one written before the layout recorded them."""
    uid, directory = getattr(c, "owner_uid", None), getattr(c, "directory", None)
    return (int(uid) if isinstance(uid, int) else None), (
        directory if isinstance(directory, str) and directory else None
    )

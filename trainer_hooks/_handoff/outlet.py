"""Where a staged snapshot goes: the three ways a save leaves the trainer, behind one interface.

1. **daemon**: the snapshot's fd goes over the socket (``trainer_hooks._handoff.link``); the
   daemon runs the save pipeline and replies ``saved``.
2. **embedded**: no daemon answers (or it went away with saves in flight): this
   process's persist thread (``trainer_hooks._handoff.worker``) runs the same pipeline
   (``ckptd.save.pipeline.save_unit``).
3. **sharded**: every rank's persist thread writes its own shard and the ranks commit
   together (``ckptd.save.pipeline.save_shard`` over ``trainer_hooks._ranks.shards``' collectives);
   each disk's lead tells its host's daemon, if any (one disk: rank 0).

With a remote tier (``remote=``), what this process saved itself (embedded, or left by a
daemon that went away; sharded: each disk's lead, once the unit committed) is then replicated by its
own ``Uploader``; what the daemon saved or was told of, the daemon replicates. ``close()`` waits for pending uploads up to ``remote_timeout``.

Whichever it is, ``on_done`` hears of each save once: verified, or failed with a reason.
The staging buffer is reused, so one save is in flight at a time: ``busy``/``wait``. Memory-only
saves (``every_memory``, or every="auto"'s memory tier) have a buffer of their own
(``memory_slot``), made at the first: they never wait for a disk save still being written,
and a disk save whose daemon went away is still whole in its buffer, to be persisted here.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any, Callable

from ckptd.core.meta import CheckpointMeta
from ckptd.core.vocab import FailReason
from ckptd.disk.manifest import shard_name, unit_name
from ckptd.disk.persist import Persisted, PersistError
from ckptd.disk.target import Target
from ckptd.save.keep import Removed, prune
from ckptd.save.pipeline import Hooks, StagedShard, save_shard, save_unit
from trainer_hooks._handoff.link import Link
from trainer_hooks._handoff.worker import Done, StagedSave, Worker
from trainer_hooks._ranks.shards import ShardGroup
from trainer_hooks._snapshot.overlap import Overlap
from trainer_hooks._snapshot.staging import Pending, StagingBuffer

if TYPE_CHECKING:
    from ckptd.remote.uploader import Uploader

log = logging.getLogger(__name__)


class Outlet:
    def __init__(
        self,
        target: Target,
        on_done: Done,
        on_removed: Removed,
        shards: ShardGroup | None = None,
        replicate: bool = False,
        overlap: Overlap | None = None,
    ) -> None:
        self.target, self.shards = target, shards
        self.overlap = overlap  # snapshot="overlap": the copy finishes, then the handoff, off step()
        self._on_done, self._on_removed = on_done, on_removed
        self._worker = Worker(self._persist_here, self._persisted_here)
        self.link: Link | None = None
        uploads = replicate and target.settings.remote and (shards is None or shards.lead)
        self.uploader: Uploader | None = None  # sharded: each disk's lead uploads the unit (its host's part)
        if uploads:  # the remote tier (boto3 and all) is imported only by a job that has one
            from ckptd.remote.uploader import Uploader

            self.uploader = Uploader()
        self._daemon_has_it = False  # the last sharded commit went to the daemon, which replicates it
        self._memory: StagingBuffer | None = None  # memory-only saves' buffer

    def connect(
        self,
        path: str,
        hello: Callable[[], dict[str, Any]],
        beat: Callable[[], dict[str, Any]],
        on_due: Callable[[str], None],
        retry_every: float,
    ) -> None:
        """Talk to the daemon at ``path`` (and keep trying to, every ``retry_every`` seconds)."""
        self.link = Link(path, hello, beat, self._daemon_saved, self._daemon_lost, retry_every, on_due=on_due)

    def say_mode(self, saving: bool, rank_of: tuple[int, int], socket: str | bool | None) -> None:
        """Once, at construction: where this process's saves go (said, never guessed at later)."""
        job, directory = self.target.job, self.target.directory
        if not saving:
            log.info("ckptd: job %s rank %d of %d: rank 0 saves; this rank only resumes", job, *rank_of)
        elif self.mode == "embedded" and isinstance(socket, str):
            log.warning(
                "ckptd: job %s: no daemon answers at %s (socket= was given); saving in embedded mode to %s",
                job,
                socket,
                directory,
            )
        elif self.mode == "embedded":
            log.info(
                "ckptd: job %s saving to %s in embedded mode (no daemon; saves run in a background thread)",
                job,
                directory,
            )

    @property
    def mode(self) -> str:
        return "daemon" if self.link is not None and self.link.connected else "embedded"

    @property
    def busy(self) -> bool:
        copying = self.overlap is not None and not self.overlap.idle
        return copying or self._worker.busy or (self.link is not None and self.link.busy)

    def wait(self, timeout: float | None = None) -> bool:
        """Until the save in flight is verified or failed (by the daemon or here)."""
        if self.overlap is not None and not self.overlap.wait(timeout):
            return False
        if self.link is not None and not self.link.wait_idle(timeout):
            return False
        return self._worker.wait_idle(timeout)

    def submit(self, staged: StagedSave, msg: dict[str, Any], pending: Pending | None = None) -> None:
        """Hand a staged snapshot over; one whose copy is ``pending`` once the overlap thread finished it."""
        if pending is None or pending.empty or self.overlap is None:
            self._hand_over(staged, msg)
            return

        def copy() -> Callable[[], None]:
            pending.finish()
            return lambda: self._hand_over(staged, msg)

        self.overlap.start(copy, staged.step, pending.events, cpu=bool(pending.cpu))

    def defer(self, stage: Callable[[], tuple[StagedSave, dict[str, Any], Pending]], step: int) -> None:
        """``snapshot="overlap"`` on CPU: the overlap thread ``stage``s the snapshot, then hands it over."""
        assert self.overlap is not None

        def copy() -> Callable[[], None]:
            staged, msg, _ = stage()  # nothing left pending: the thread copied it all
            return lambda: self._hand_over(staged, msg)

        self.overlap.start(copy, step)

    def describe(
        self,
        fd: int,
        length: int,
        meta: CheckpointMeta,
        filename: str,
        memory_only: bool,
        stall: float,
        cost: float | None = None,
    ) -> tuple[StagedSave, dict[str, Any]]:
        """A staged snapshot as whoever persists it sees it (sharded: each rank writes its own shard in-process,
        in the unit's directory; see trainer_hooks._ranks.shards)."""
        directory = self.target.directory
        if self.shards is not None:
            directory = os.path.join(directory, unit_name(filename))
            filename = shard_name(self.shards.rank, self.shards.world_size)
        staged = StagedSave(fd, length, directory, filename, meta.step, meta.trigger, stall=stall)
        msg = {
            "step": meta.step,
            "epoch": meta.epoch,
            "trigger": meta.trigger,
            "rule": meta.rule,
            "filename": filename,
            "length": length,
            "stall": stall,
            "memory_only": memory_only,
        }
        if cost is not None:  # what the save cost training, when more than the stall (overlap's copy on CPU)
            msg["cost"] = cost
        return staged, msg

    def _hand_over(self, staged: StagedSave, msg: dict[str, Any]) -> None:
        if self.shards is not None or self.link is None or not self.link.submit(staged, msg):
            self._worker.submit(staged)

    def notify(self, msg: dict[str, Any]) -> None:
        if self.link is not None:
            self.link.notify(msg)

    def memory_slot(self, pin: bool) -> StagingBuffer | None:
        """The buffer for a memory-only save; None without a daemon, or while the last is in flight."""
        if self.link is None or not self.link.connected:
            return None
        if self._memory is None:
            self._memory = StagingBuffer("ckptd-memory", pin=pin)
        return None if self.link.holds(self._memory.fd) else self._memory

    def close(self, end_step: int | None, timeout: float | None = None) -> None:
        if self.overlap is not None:
            self.overlap.close()
        if self.link is not None:
            self.link.close(end_step)
            self.link = None
        if self._memory is not None:
            self._memory.close()
        self._worker.close(timeout)
        if self.uploader is not None:
            self._drain_uploads(timeout)

    def _drain_uploads(self, timeout: float | None) -> None:
        """Embedded: nobody else will upload what is left, so wait for it, within remote_timeout."""
        assert self.uploader is not None
        limit = self.target.settings.remote_timeout
        left = self.uploader.wait(limit if timeout is None else min(limit, timeout))
        if left:
            log.warning(
                "ckptd: %d checkpoint(s) not yet on %s after %.0fs: %s; they stay on disk and the next run "
                "(or a daemon) uploads them",
                len(left),
                self.target.settings.remote,
                limit,
                ", ".join(os.path.basename(u.path) for u in left),
            )
        self.uploader.close(timeout=5.0)

    def resync_remote(self) -> None:
        """Embedded at start: upload what an earlier run saved and did not get to the remote tier."""
        if self.uploader is not None:
            self.uploader.resync(self.target.job, self.target.directory, self.target.settings, after=self._prune_again)

    def _persisted_here(self, staged: StagedSave, result: Persisted | None, error: PersistError | None) -> None:
        self._on_done(staged, result, error)

    def _replicate(self, result: Persisted) -> None:
        """Stage 7 of what this process saved itself (the daemon replicates what it was told of)."""
        if self.uploader is not None and not self._daemon_has_it:
            from ckptd.remote.uploader import Upload

            self.uploader.submit(
                Upload(self.target.job, result.path, self.target.settings, after=self._prune_again, created=time.time())
            )

    def _prune_again(self) -> None:
        """Once a checkpoint is remote, local retention may delete what it only kept for that."""
        prune(self.target, self._on_removed)

    # -- the persist thread ------------------------------------------------------------------

    def _persist_here(self, staged: StagedSave) -> Persisted:
        hooks = Hooks(removed=self._on_removed, replicate=self._replicate)
        if self.shards is not None:
            shard = StagedShard(
                staged.fd,
                staged.length,
                os.path.basename(staged.directory),
                staged.filename,
                staged.step,
                staged.trigger,
                staged.stall,
            )
            return save_shard(self.shards, self.target, shard, hooks, self._report_commit)
        return save_unit(self.target, staged.fd, staged.length, staged.filename, staged.step, hooks)

    def _report_commit(self, report: dict[str, Any]) -> bool:
        """A sharded save's lead (rank 0; with node-local directories each host's) tells its
        host's daemon, which catalogues and prunes; False: there is none."""
        self._daemon_has_it = self.link is not None and self.link.connected
        if self._daemon_has_it:
            assert self.link is not None
            self.link.notify(report)
            return True
        return self.shards is not None and not self.shards.lead

    # -- the daemon's answers ------------------------------------------------------------------

    def _daemon_saved(self, staged: StagedSave, reply: dict[str, Any]) -> None:
        if reply.get("ok"):
            self._on_done(staged, Persisted(str(reply.get("path")), staged.length, {}), None)
        else:
            self._on_done(staged, None, PersistError(FailReason.of(reply.get("reason")), str(reply.get("error"))))

    def _daemon_lost(self, staged_saves: list[StagedSave]) -> None:
        for staged in staged_saves:
            if staged.trigger == "memory":  # its tier went with the daemon: nothing to persist here
                continue
            log.warning("ckptd: the daemon went away with step %d in flight; persisting it here", staged.step)
            self._worker.submit(staged)

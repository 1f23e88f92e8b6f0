"""Who may do what (docs/security.md): the rules, in one place, over the peer's kernel identity.

A client may act on jobs of its own uid, in directories it owns inside the roots; root,
the daemon's own uid and real members of ``admin_group`` may act on every job. Real
membership comes from the group database, never from the gid a peer connected with.
"""

from __future__ import annotations

import os
import pwd
from typing import Callable, Sequence

from ckptd.daemon.catalog import Catalog, Row
from ckptd.daemon.jobkey import JobKey
from ckptd.disk.remove import inside


class Access:
    def __init__(
        self,
        roots: Sequence[str],
        catalog: Catalog,
        admin_gid: int | None,
        max_jobs_per_uid: int,
        live_jobs: Callable[[int, JobKey], int],
        remote_allow: Sequence[str] = (),
        remote_endpoint: str | None = None,
    ) -> None:
        self.roots, self.catalog, self.admin_gid = roots, catalog, admin_gid
        self.remote_allow = [u.rstrip("/") for u in remote_allow]
        self.remote_endpoint = remote_endpoint
        self.max_jobs_per_uid = max_jobs_per_uid
        self._live_jobs = live_jobs  # jobs of a uid connected or recently ended, other than the one asked about

    def privileged(self, uid: int) -> bool:
        """May act on every job: root, the daemon's own uid, and real members of ``admin_group``.

        Any member of a group can make it its effective gid (``sg``), so the socket's
        group grants access to the socket and nothing more.
        """
        if uid in (0, os.getuid()):
            return True
        if self.admin_gid is None:
            return False
        try:
            user = pwd.getpwuid(uid)
        except KeyError:
            return False
        return self.admin_gid in os.getgrouplist(user.pw_name, user.pw_gid)

    def directory(self, directory: str, uid: int, must_exist: bool = True) -> str:
        """A directory the uid may have the daemon write to and delete from (or, ``must_exist=False``,
        create: then its nearest existing ancestor must be the uid's).

        To an unprivileged uid, a directory that does not exist and one another uid owns get the
        same refusal: the daemon, which may look where the uid cannot, must not tell them apart
        (finding L7)."""
        if not isinstance(directory, str) or not os.path.isabs(directory) or ".." in directory.split("/"):
            raise PermissionError(f"directory {directory!r} must be an absolute path without '..'")
        real = os.path.realpath(directory)
        if not inside(real, self.roots):
            raise PermissionError(f"directory {directory} is outside the daemon's roots ({', '.join(self.roots)})")
        privileged = self.privileged(uid)
        refusal = (
            f"directory {directory} does not exist"
            if privileged
            else f"directory {directory} is not a directory of uid {uid} (it does not exist, or another uid owns it)"
        )
        existing = real
        while not os.path.isdir(existing):
            if must_exist or existing in self.roots or existing == "/":
                raise PermissionError(refusal)
            existing = os.path.dirname(existing)
        if not privileged and os.stat(existing).st_uid != uid:
            raise PermissionError(refusal)
        return real

    def job(self, key: JobKey, uid: int) -> None:
        """May ``uid`` register ``key``, within ``max_jobs_per_uid``. Whose the job is follows its
        directory (``directory`` checked it is the uid's): a new owner of a directory gets the
        job, and the catalogue's owner changes with it (finding L2)."""
        if self.privileged(uid):
            return
        live = self._live_jobs(uid, key)
        if live >= self.max_jobs_per_uid:
            raise PermissionError(
                f"uid {uid} already has {live} jobs connected or ended within the last hour "
                "(max_jobs_per_uid); each job is a set of metric series"
            )

    def remote(self, url: str, client_endpoint: str | None = None) -> str | None:
        """The endpoint the daemon uses for ``url``, a remote ``[daemon] remote_allow`` names.

        The daemon replicates (and prunes, lists, with its own credentials) only where its own
        configuration says: a client names an allowed remote, never a store, endpoint or
        credentials (a client's ``remote_endpoint`` would receive the daemon's signed requests,
        credentials and all). S3 requests go to ``[daemon] remote_endpoint`` (None: AWS)."""
        if client_endpoint is not None:
            raise PermissionError(
                f"remote_endpoint {client_endpoint!r} is refused: with a daemon, the S3 endpoint "
                "comes from its configuration ([daemon] remote_endpoint), never from a client; "
                "leave remote_endpoint unset (embedded mode, without a daemon, uses it)"
            )
        if ".." in url.split("/") or not any(url == a or url.startswith(a + "/") for a in self.remote_allow):
            allowed = ", ".join(self.remote_allow) or "nothing, the list is empty"
            raise PermissionError(
                f"remote {url} is not one the daemon replicates to ([daemon] remote_allow: {allowed}); "
                "without the daemon, the trainer replicates itself with its own credentials"
            )
        return self.remote_endpoint if url.startswith("s3://") else None

    def visible(self, uid: int, job: JobKey) -> bool:
        """A uid sees its own jobs; a job nobody registered (a watched tree) is seen by the uids
        that own a checkpoint of it; privileged uids see everything."""
        if self.privileged(uid):
            return True
        owner = self.catalog.job_owner(job)
        if owner is not None:
            return owner == uid
        return any(r.uid == uid for r in self.catalog.checkpoints(*job))

    def sees(self, uid: int, row: Row) -> bool:
        """A checkpoint row: the uid that owned its file when it was catalogued, and privileged
        uids (a directory that changed hands keeps its old rows from the new owner, L2; rows
        rebuilt from files are their owners', L6)."""
        return row.uid == uid or self.privileged(uid)

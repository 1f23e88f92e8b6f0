"""Remote stores for the remote tier (SPEC §11): an S3 bucket or a shared filesystem.

``remote = "s3://bucket/prefix"`` (with ``remote_endpoint`` for S3-compatible stores) or
``remote = "file:///mnt/shared/ckpt"``. Both stores offer the same five operations on
keys relative to the URL's prefix, which is all replication needs (``ckptd.remote.upload``
says what goes where and in which order). Credentials come from the standard AWS chain
(environment, profile, instance role) only: boto3 finds them, ckptd's config never holds them.

boto3 is imported only when an ``s3://`` store is opened, so neither the hook without a
remote nor the idle daemon pays for it.
"""

from __future__ import annotations

import base64
import errno
import functools
import hashlib
import os
import secrets
import shutil
import stat
import time
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol
from urllib.parse import urlparse

from ckptd.core.units import parse_remote
from ckptd.disk.safepath import open_dir

__all__ = ["RemoteError", "Store", "FileStore", "S3Store", "open_store", "parse_remote"]

MiB = 1 << 20
TEMP = ".ckptd-upload-"
MAX_LIST_KEYS = 50_000  # far above any one job's objects (data + commit per checkpoint); a listing past it is a hostile or broken store
MAX_LIST_PAGES = 1_000  # S3 pages of up to 1000 keys: an endless, always-truncated listing ends here
LIST_SECONDS = 120.0


class RemoteError(Exception):
    """The store refused or failed; the message carries the store's own words."""


class Store(Protocol):
    url: str

    def put_file(self, local: str, key: str) -> None: ...

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def open(self, key: str) -> tuple[BinaryIO, int]: ...

    def list(self, prefix: str) -> dict[str, int]: ...

    def delete(self, key: str) -> None: ...

    def matches(self, local: str, key: str) -> bool | None:
        """Does the stored object equal the local file, by a checksum the store validated on
        receipt? None: the store keeps none (the caller reads the object back instead)."""
        ...


@functools.lru_cache(maxsize=64)
def open_store(url: str, endpoint: str | None = None) -> Store:
    """One store object per URL and endpoint, reused (a boto3 client is thread-safe and costly to make)."""
    u = urlparse(parse_remote(url))
    if u.scheme == "file":
        return FileStore(url, u.path)
    return S3Store(url, u.netloc, u.path.strip("/"), endpoint)


@dataclass
class FileStore:
    """A shared filesystem (NFS, Lustre, a second disk): temp file, fsync, rename, fsync dir.

    The tier is shared, so anything below its root may have been planted by someone else: every
    key is reached from the root's fd one component at a time with ``O_NOFOLLOW`` (a symlink at
    any depth fails the walk instead of being followed, for reads, writes and deletions alike),
    objects are opened ``O_NONBLOCK`` and must be regular files (a FIFO named like a commit
    object is an error at once, not a thread blocked forever), and a listing stops at
    ``MAX_LIST_KEYS`` keys or ``LIST_SECONDS`` with an error."""

    url: str
    root: str

    def _parts(self, key: str) -> list[str]:
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise RemoteError(f"invalid remote key {key!r}")
        return parts

    def _error(self, key: str, exc: OSError) -> RemoteError:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return RemoteError(
                f"{self.url}/{key}: a symbolic link or a file where a directory should be "
                "(never followed in a shared store)"
            )
        return RemoteError(f"{self.url}/{key}: {exc.strerror or exc}")

    def _dir(self, parts: list[str], create: bool) -> int:
        """The fd of the directory ``parts`` below the root, reached without following a link
        (``safepath.open_dir`` from the root); ``create``: each missing component made first."""
        if create:
            os.makedirs(self.root, exist_ok=True)
        if not os.path.isdir(self.root):
            raise RemoteError(f"{self.url}: {self.root} is not a directory (is the shared filesystem mounted?)")
        for i in range(len(parts) if create else 0):
            parent = open_dir(os.path.join(self.root, *parts[:i]), (self.root,))
            try:
                os.mkdir(parts[i], 0o755, dir_fd=parent)
            except FileExistsError:
                pass
            finally:
                os.close(parent)
        return open_dir(os.path.join(self.root, *parts), (self.root,))

    def _write(self, key: str, fill: Any) -> None:
        *parents, name = self._parts(key)
        try:
            dfd = self._dir(parents, create=True)
            try:
                tmp = TEMP + secrets.token_hex(6)
                out = os.open(
                    tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dfd
                )
                try:
                    with os.fdopen(out, "wb") as f:
                        fill(f)
                        f.flush()
                        os.fsync(f.fileno())
                    os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)  # replaces a link, never follows it
                except BaseException:
                    _unlink_at(dfd, tmp)
                    raise
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            raise self._error(key, exc) from None

    def put_file(self, local: str, key: str) -> None:
        def copy(dst: BinaryIO) -> None:
            with open(local, "rb") as src:
                shutil.copyfileobj(src, dst, 8 * MiB)

        self._write(key, copy)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write(key, lambda f: f.write(data))

    def matches(self, local: str, key: str) -> bool | None:
        return None  # a filesystem keeps no checksum; reading it back comes from the page cache

    def open(self, key: str) -> tuple[BinaryIO, int]:
        *parents, name = self._parts(key)
        try:
            dfd = self._dir(parents, create=False)
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            raise self._error(key, exc) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise RemoteError(f"{self.url}/{key}: not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0), st.st_size

    def list(self, prefix: str) -> dict[str, int]:
        parts = self._parts(prefix.strip("/")) if prefix.strip("/") else []
        out: dict[str, int] = {}
        deadline = time.monotonic() + LIST_SECONDS
        try:
            top = self._dir(parts, create=False)
        except FileNotFoundError:
            return out  # the root is there (``_dir`` says so otherwise), the job's prefix not yet
        except OSError as exc:
            raise self._error(prefix, exc) from None
        base = "/".join(parts)
        try:
            for dirpath, _, files, dfd in os.fwalk(".", dir_fd=top):  # follow_symlinks=False: links are not walked
                for name in files:
                    try:
                        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    except OSError:
                        continue
                    if name.startswith(TEMP) or not stat.S_ISREG(st.st_mode):
                        continue
                    rel = os.path.normpath(os.path.join(dirpath, name))
                    out[f"{base}/{rel}" if base else rel] = st.st_size
                    _bounded(self.url, prefix, len(out), deadline)
        finally:
            os.close(top)
        return out

    def delete(self, key: str) -> None:
        *parents, name = self._parts(key)
        try:
            dfd = self._dir(parents, create=False)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._error(key, exc) from None
        try:
            os.unlink(name, dir_fd=dfd)  # a link planted here is removed itself, never what it points to
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._error(key, exc) from None
        finally:
            os.close(dfd)


def _unlink_at(dfd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dfd)
    except OSError:
        pass


def _bounded(url: str, prefix: str, keys: int, deadline: float, pages: int = 0) -> None:
    """A listing that grows past what any job holds, or runs too long, is an error, not memory or time spent."""
    if keys > MAX_LIST_KEYS or pages > MAX_LIST_PAGES or time.monotonic() > deadline:
        raise RemoteError(
            f"{url}/{prefix}: listing stopped after {keys} keys, {pages} pages: over the bounds "
            f"({MAX_LIST_KEYS} keys, {MAX_LIST_PAGES} pages, {LIST_SECONDS:.0f} s); a store that "
            "lists without end is refused"
        )


class S3Store:
    """An S3 bucket (or an S3-compatible store at ``endpoint``), through boto3.

    Uploads go through boto3's managed transfer: multipart above 64 MiB, parts in parallel,
    read from the file part by part (bounded memory), and an upload that fails is aborted
    by boto3 itself; ``abort_stale_uploads`` clears those a killed process left behind.
    Checksums: every upload carries SHA-256 (per part, as S3 validates them on receipt and
    keeps their composite), which ``matches`` compares with the local file's, so the copy is
    verified without a second transfer; no other checksum is computed unless the store
    requires it (S3-compatible stores reject the newer default ones, boto/botocore#3352). A
    store that keeps no checksum gets its object read back and every tensor re-hashed.
    """

    def __init__(self, url: str, bucket: str, prefix: str, endpoint: str | None = None) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.url, self.bucket, self.prefix = url, bucket, prefix
        config = Config(
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
        self.transfer = TransferConfig(multipart_threshold=64 * MiB, multipart_chunksize=64 * MiB, max_concurrency=8)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            raise RemoteError(f"{self.url}: {what}: {err.get('Code', '?')}: {err.get('Message', exc)}") from None
        except (BotoCoreError, OSError) as exc:
            raise RemoteError(f"{self.url}: {what}: {exc}") from None

    def put_file(self, local: str, key: str) -> None:
        from boto3.exceptions import S3UploadFailedError

        try:
            self._call(
                f"upload {key}",
                self.client.upload_file,
                local,
                self.bucket,
                self._key(key),
                Config=self.transfer,
                ExtraArgs={"ChecksumAlgorithm": "SHA256"},
            )
        except S3UploadFailedError as exc:
            raise RemoteError(f"{self.url}: upload {key}: {exc}") from None

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(f"put {key}", self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def open(self, key: str) -> tuple[BinaryIO, int]:
        r = self._call(f"get {key}", self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        return r["Body"], int(r["ContentLength"])

    def list(self, prefix: str) -> dict[str, int]:
        """Page by page, bounded (``MAX_LIST_KEYS``, ``MAX_LIST_PAGES``, ``LIST_SECONDS``): an
        endpoint that lists without end costs an error, not the daemon's memory."""
        out: dict[str, int] = {}
        pages = iter(
            self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix))
        )
        strip = len(self.prefix) + 1 if self.prefix else 0
        deadline, n = time.monotonic() + LIST_SECONDS, 0
        while (page := self._call(f"list {prefix}", next, pages, None)) is not None:
            n += 1
            for obj in page.get("Contents", []):
                out[str(obj["Key"])[strip:]] = int(obj["Size"])
            _bounded(self.url, prefix, len(out), deadline, n)
        return out

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", self.client.delete_object, Bucket=self.bucket, Key=self._key(key))

    def matches(self, local: str, key: str) -> bool | None:
        head = self._call(
            f"head {key}", self.client.head_object, Bucket=self.bucket, Key=self._key(key), ChecksumMode="ENABLED"
        )
        stored = head.get("ChecksumSHA256")
        if not stored:
            return None
        size = os.path.getsize(local)
        part = self.transfer.multipart_chunksize if size >= self.transfer.multipart_threshold else None
        return str(stored).split("-")[0] == sha256_as_stored(local, part)

    def abort_stale_uploads(self, prefix: str) -> int:
        """Abort the multipart uploads under ``prefix`` that a killed process left (they cost storage)."""
        r = self._call(
            "list multipart uploads", self.client.list_multipart_uploads, Bucket=self.bucket, Prefix=self._key(prefix)
        )
        uploads = r.get("Uploads", [])
        for u in uploads:
            self._call(
                "abort multipart upload",
                self.client.abort_multipart_upload,
                Bucket=self.bucket,
                Key=u["Key"],
                UploadId=u["UploadId"],
            )
        return len(uploads)


def sha256_as_stored(path: str, part: int | None) -> str:
    """The SHA-256 S3 reports for this file uploaded whole (``part`` None) or in parts of
    ``part`` bytes (the SHA-256 of the parts' SHA-256s), base64 as in ``x-amz-checksum-sha256``.
    Read 8 MiB at a time: memory stays bounded whatever the part size."""
    parts: list[bytes] = []
    h, filled = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB if part is None else min(8 * MiB, part - filled)):
            h.update(chunk)
            filled += len(chunk)
            if part is not None and filled == part:
                parts.append(h.digest())
                h, filled = hashlib.sha256(), 0
    if part is None:
        return base64.b64encode(h.digest()).decode()
    if filled:
        parts.append(h.digest())
    return base64.b64encode(hashlib.sha256(b"".join(parts)).digest()).decode()

"""Remote stores for the remote tier (SPEC §11): an S3 bucket or a shared filesystem.

``remote = "s3://bucket/prefix"`` (with ``remote_endpoint`` for S3-compatible stores) or
``remote = "file:///mnt/shared/ckpt"``. Both stores offer the same five operations on
keys relative to the URL's prefix, which is all replication needs (``ckptd.store.replicate``
says what goes where and in which order). Credentials come from the standard AWS chain
(environment, profile, instance role) only: boto3 finds them, ckptd's config never holds them.

boto3 is imported only when an ``s3://`` store is opened, so neither the hook without a
remote nor the idle daemon pays for it.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol
from urllib.parse import urlparse

from ckptd.core.units import parse_remote
from ckptd.store.safepath import fsync_dir

__all__ = ["RemoteError", "Store", "FileStore", "S3Store", "open_store", "parse_remote"]

MiB = 1 << 20
TEMP = ".ckptd-upload-"


class RemoteError(Exception):
    """The store refused or failed; the message carries the store's own words."""


class Store(Protocol):
    url: str

    def put_file(self, local: str, key: str) -> None: ...

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def open(self, key: str) -> tuple[BinaryIO, int]: ...

    def list(self, prefix: str) -> dict[str, int]: ...

    def delete(self, key: str) -> None: ...


@functools.lru_cache(maxsize=64)
def open_store(url: str, endpoint: str | None = None) -> Store:
    """One store object per URL and endpoint, reused (a boto3 client is thread-safe and costly to make)."""
    u = urlparse(parse_remote(url))
    if u.scheme == "file":
        return FileStore(url, u.path)
    return S3Store(url, u.netloc, u.path.strip("/"), endpoint)


@dataclass
class FileStore:
    """A shared filesystem (NFS, Lustre, a second disk): temp file, fsync, rename, fsync dir."""

    url: str
    root: str

    def _path(self, key: str) -> str:
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise RemoteError(f"invalid remote key {key!r}")
        return os.path.join(self.root, *parts)

    def _write(self, key: str, fill: Any) -> None:
        path = self._path(key)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = os.path.join(os.path.dirname(path), TEMP + secrets.token_hex(6))
            try:
                with open(tmp, "wb") as f:
                    fill(f)
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            fsync_dir(os.path.dirname(path))
        except OSError as exc:
            raise RemoteError(f"{self.url}/{key}: {exc.strerror or exc}") from None

    def put_file(self, local: str, key: str) -> None:
        def copy(dst: BinaryIO) -> None:
            with open(local, "rb") as src:
                shutil.copyfileobj(src, dst, 8 * MiB)
        self._write(key, copy)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write(key, lambda f: f.write(data))

    def open(self, key: str) -> tuple[BinaryIO, int]:
        try:
            f = open(self._path(key), "rb")
            return f, os.fstat(f.fileno()).st_size
        except OSError as exc:
            raise RemoteError(f"{self.url}/{key}: {exc.strerror or exc}") from None

    def list(self, prefix: str) -> dict[str, int]:
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        out: dict[str, int] = {}
        if not os.path.isdir(self.root):
            raise RemoteError(f"{self.url}: {self.root} is not a directory (is the shared filesystem mounted?)")
        for dirpath, _, files in os.walk(base):
            for name in files:
                if not name.startswith(TEMP):
                    full = os.path.join(dirpath, name)
                    out[os.path.relpath(full, self.root)] = os.path.getsize(full)
        return out

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise RemoteError(f"{self.url}/{key}: {exc.strerror or exc}") from None


class S3Store:
    """An S3 bucket (or an S3-compatible store at ``endpoint``), through boto3.

    Uploads go through boto3's managed transfer: multipart above 64 MiB, parts in parallel,
    read from the file part by part (bounded memory), and an upload that fails is aborted
    by boto3 itself; ``abort_stale_uploads`` clears those a killed process left behind.
    Checksums are computed only where the store requires them (S3-compatible stores reject
    the newer default ones, boto/botocore#3352); ckptd verifies every tensor it uploaded.
    """

    def __init__(self, url: str, bucket: str, prefix: str, endpoint: str | None = None) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.url, self.bucket, self.prefix = url, bucket, prefix
        config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                        request_checksum_calculation="when_required", response_checksum_validation="when_required")
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
            self._call(f"upload {key}", self.client.upload_file, local, self.bucket, self._key(key), Config=self.transfer)
        except S3UploadFailedError as exc:
            raise RemoteError(f"{self.url}: upload {key}: {exc}") from None

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(f"put {key}", self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def open(self, key: str) -> tuple[BinaryIO, int]:
        r = self._call(f"get {key}", self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        return r["Body"], int(r["ContentLength"])

    def list(self, prefix: str) -> dict[str, int]:
        out: dict[str, int] = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix))
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in self._call(f"list {prefix}", list, pages):
            for obj in page.get("Contents", []):
                out[obj["Key"][strip:]] = int(obj["Size"])
        return out

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", self.client.delete_object, Bucket=self.bucket, Key=self._key(key))

    def abort_stale_uploads(self, prefix: str) -> int:
        """Abort the multipart uploads under ``prefix`` that a killed process left (they cost storage)."""
        r = self._call("list multipart uploads", self.client.list_multipart_uploads, Bucket=self.bucket,
                       Prefix=self._key(prefix))
        uploads = r.get("Uploads", [])
        for u in uploads:
            self._call("abort multipart upload", self.client.abort_multipart_upload, Bucket=self.bucket,
                       Key=u["Key"], UploadId=u["UploadId"])
        return len(uploads)

"""The S3 back-end (AWS S3, MinIO, Cloudflare R2, GCS's S3 interface, ...), on obstore.

`SECO_STORAGE_URL=s3://bucket/prefix`; the endpoint, region and credentials come from
the standard AWS variables (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, ...), read by obstore. Large files are
sent as multipart uploads from disk and read back as a stream, so neither direction
holds a whole object in memory; a PUT or a completed multipart upload is atomic, so
an object is never seen half-written.

Errors: obstore's messages carry request URLs (endpoint, bucket, key); they are logged
and replaced by a short reason (`StorageError.reason`) that names only the kind of
failure and the HTTP status.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import obstore
from obstore.exceptions import (
    BaseError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from obstore.store import S3Store

from service.record.settings import parse_storage_url
from service.record.storage.base import CHUNK_BYTES, Download, ObjectInfo, ObjectNotFound, Storage, StorageError

if TYPE_CHECKING:  # typing-only names in obstore
    from obstore.store import ClientConfig, RetryConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

PART_BYTES = 8 << 20
"""Multipart part size: files larger than this are uploaded in parts of this size."""
UPLOAD_CONCURRENCY = 4
"""Parts in flight at once per upload (memory: about this many parts)."""
RETRY: RetryConfig = {
    "max_retries": 4,
    "backoff": {"init_backoff": timedelta(milliseconds=200), "max_backoff": timedelta(seconds=4), "base": 2.0},
    "retry_timeout": timedelta(seconds=30),
}
"""Transient failures (5xx, connection errors) are retried for up to ~30 s, then the
operation fails: a job whose store is down fails with `storage_error` instead of hanging."""

_STATUS_RE = re.compile(r"status code: (\d{3})")


def _reason(exc: BaseError) -> str:
    """A user-safe description of an obstore error (no URL, bucket, key or credential)."""
    if isinstance(exc, PermissionDeniedError | UnauthenticatedError):
        return "access denied by the object store"
    text = str(exc)
    m = _STATUS_RE.search(text)
    if m:
        status = int(m.group(1))
        if status in (401, 403):
            return "access denied by the object store"
        return f"the object store answered HTTP {status}"
    if "error sending request" in text or "connect" in text.lower() or "timed out" in text.lower():
        return "the object store is unreachable"
    return "the object store failed"


class S3Storage(Storage):
    kind = "s3"
    setting = "SECO_STORAGE_URL"
    remedy = (
        "Check that the object store (SECO_STORAGE_URL) is reachable and that the worker's credentials may write to it."
    )

    def __init__(self, url: str) -> None:
        env = os.environ
        self.bucket, self.prefix = parse_storage_url(url)
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or ""
        client_options: ClientConfig = {"connect_timeout": "5s", "timeout": "120s"}
        if endpoint.startswith("http://"):
            client_options["allow_http"] = True  # a MinIO or test server on a private network
        self.store = S3Store(self.bucket, prefix=self.prefix or None, client_options=client_options, retry_config=RETRY)

    def _call(self, what: str, key: str, fn: Callable[[], T]) -> T:
        """Run one obstore call; its errors become StorageError / ObjectNotFound."""
        try:
            return fn()
        except (NotFoundError, FileNotFoundError):
            if what == "upload":  # a 404 to a PUT: the bucket itself is missing
                raise StorageError("the bucket does not exist") from None
            raise ObjectNotFound(key) from None
        except BaseError as e:
            log.warning("object store %s failed: %s", what, str(e).split("\n", 1)[0])
            raise StorageError(_reason(e)) from e

    # ---------------------------------------------------------------- writes

    def put_file(self, key: str, src: Path, *, move: bool = False) -> int:
        key = self.key(key)
        size = src.stat().st_size
        multipart = size > PART_BYTES
        self._call(
            "upload",
            key,
            lambda: obstore.put(
                self.store, key, src, use_multipart=multipart, chunk_size=PART_BYTES, max_concurrency=UPLOAD_CONCURRENCY
            ),
        )
        if move:
            src.unlink()
        return size

    def put_bytes(self, key: str, data: bytes) -> None:
        key = self.key(key)
        self._call("upload", key, lambda: obstore.put(self.store, key, data))

    # ---------------------------------------------------------------- reads

    def size(self, key: str) -> int | None:
        key = self.key(key)
        try:
            return int(self._call("head", key, lambda: obstore.head(self.store, key))["size"])
        except ObjectNotFound:
            return None

    def open(self, key: str) -> Download:
        key = self.key(key)
        result = self._call("download", key, lambda: obstore.get(self.store, key))
        stream = result.stream(min_chunk_size=CHUNK_BYTES)

        def chunks() -> Iterator[bytes]:
            while (block := self._call("download", key, lambda: next(stream, None))) is not None:
                yield bytes(block)

        return Download(size=int(result.meta["size"]), chunks=chunks())

    def list_under(self, prefix: str) -> list[ObjectInfo]:
        prefix = self.key(prefix)
        batches = self._call("list", prefix, lambda: list(obstore.list(self.store, prefix=prefix + "/")))
        out = [ObjectInfo(key=str(m["path"]), size=int(m["size"])) for batch in batches for m in batch]
        return sorted(out, key=lambda o: o.key)

    # ---------------------------------------------------------------- deletes

    def delete(self, key: str) -> None:
        key = self.key(key)
        with contextlib.suppress(ObjectNotFound):  # already gone: nothing to do
            self._call("delete", key, lambda: obstore.delete(self.store, key))

    def delete_under(self, prefix: str) -> int:
        keys = [o.key for o in self.list_under(prefix)]
        for i in range(0, len(keys), 1000):  # DeleteObjects takes up to 1000 keys per request
            batch = keys[i : i + 1000]
            self._call("delete", prefix, lambda b=batch: obstore.delete(self.store, b))  # type: ignore[misc]
        return len(keys)

    # ---------------------------------------------------------------- moves

    def copy(self, src: str, dest: str) -> None:
        src, dest = self.key(src), self.key(dest)
        self._call("copy", src, lambda: obstore.copy(self.store, src, dest))  # server-side: no bytes through us

    def describe(self) -> str:
        return f"s3 bucket {self.bucket}" + (f" under {self.prefix}/" if self.prefix else "")

"""Files' `expires_after` (OpenAI's `files.create`): when a file expires, and deleting it then.

An upload may ask to expire `seconds` after its `created_at` (the only anchor OpenAI
has), between one hour and 30 days. The file object then shows `expires_at`; once that
time has passed the file is no longer served, and the sweep (run by every API process
next to its reaper) deletes its record, its object and its bytes from the tenant's quota.
A file still needed by a queued, running or paused job is kept until that job ends, as
an explicit delete would be refused; the next sweep after that removes it.
"""

from __future__ import annotations

import logging
import re

from service.record.storage import Storage
from service.record.store import FileInUse, FileRecord, Store, now

log = logging.getLogger(__name__)

ANCHORS = ("created_at",)
MIN_SECONDS = 3600
MAX_SECONDS = 30 * 24 * 3600
_ASCII_SECONDS = re.compile(r"[0-9]{1,10}")
"""What `int()` may read: ASCII digits only (`str.isdigit()` also takes "²" and other scripts' digits)."""


class InvalidExpiry(ValueError):
    """An `expires_after` OpenAI would refuse; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def expires_at(created_at: int, anchor: str | None, seconds: str | None) -> int | None:
    """When a file created at `created_at` expires, from the upload's `expires_after[anchor]` and
    `expires_after[seconds]` form fields (None: both absent, it never expires)."""
    if anchor is None and seconds is None:
        return None
    if anchor is None:
        raise InvalidExpiry(
            "expires_after[anchor] is required with expires_after[seconds]; it must be 'created_at'",
            "expires_after.anchor",
        )
    if anchor not in ANCHORS:
        raise InvalidExpiry(f"expires_after[anchor] must be 'created_at' (got {anchor!r})", "expires_after.anchor")
    if seconds is None or not _ASCII_SECONDS.fullmatch(seconds):
        raise InvalidExpiry(
            f"expires_after[seconds] must be a whole number of seconds in ASCII digits (0-9), "
            f"between {MIN_SECONDS} and {MAX_SECONDS} (got {seconds!r})",
            "expires_after.seconds",
        )
    n = int(seconds)
    if not MIN_SECONDS <= n <= MAX_SECONDS:
        raise InvalidExpiry(
            f"expires_after[seconds] must be between {MIN_SECONDS} (1 hour) and {MAX_SECONDS} (30 days); got {n}",
            "expires_after.seconds",
        )
    return created_at + n


def is_expired(rec: FileRecord, at: int | None = None) -> bool:
    return rec.expires_at is not None and rec.expires_at <= (now() if at is None else at)


def delete_expired(store: Store, storage: Storage, rec: FileRecord) -> bool:
    """Delete an expired file now: record, quota bytes, then object. False while a job still needs it."""
    try:
        store.delete_file(rec)
    except FileInUse:
        return False
    storage.delete(rec.path)
    log.info("file expired and deleted", extra={"file_id": rec.id, "tenant": rec.tenant, "bytes": rec.bytes})
    return True


def expire_files(store: Store, storage: Storage, at: int | None = None) -> list[str]:
    """Delete every file whose `expires_at` has passed (safe to run from many processes at once);
    returns the ids deleted."""
    at = now() if at is None else at
    deleted: list[str] = []
    kept = 0  # expired files still needed by a job stay in the index: page past them
    while batch := store.expired_files(at, start=kept):
        for file_id in batch:
            rec = store.get_file(file_id)
            if rec is None:  # deleted meanwhile (by its owner or another sweep)
                store.forget_expiry(file_id)
            elif delete_expired(store, storage, rec):
                deleted.append(file_id)
            else:
                kept += 1
    return deleted

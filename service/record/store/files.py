"""File records: registration within the tenant's byte quota, pages, deletion, the expiry index."""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import redis

from service.record import ids
from service.record import redis_keys as K
from service.record.records import FileInUse, FileRecord, LimitExceeded, dumps, file_from_hash
from service.record.store.connection import Connection


def zpage(r: redis.Redis, key: str, after: str | None, order: str) -> Iterable[str]:
    """Ids of a sorted set from just past `after`, in batches (newest first for "desc");
    KeyError when `after` is not in it."""
    desc = order != "asc"
    if after is not None:
        score = r.zscore(key, after)
        if score is None:
            raise KeyError(after)
        bound = f"({int(score)}"
    else:
        bound = "+inf" if desc else "-inf"
    while True:
        if desc:
            batch = cast(
                list[tuple[str, float]], r.zrevrangebyscore(key, bound, "-inf", start=0, num=200, withscores=True)
            )
        else:
            batch = cast(
                list[tuple[str, float]], r.zrangebyscore(key, bound, "+inf", start=0, num=200, withscores=True)
            )
        if not batch:
            return
        for member, _ in batch:
            yield member
        bound = f"({int(batch[-1][1])}"


class Files:
    """File records of every tenant; the byte quota and the expiry index change with them, atomically."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.r = conn.r

    def create(self, rec: FileRecord, *, counted: bool, tenant_limit: int) -> None:
        """Register a file; `counted` uploads must fit the tenant's byte quota (else LimitExceeded)."""
        fields = {k: ("" if v is None else str(v)) for k, v in rec.model_dump().items()}
        args = {
            "id": rec.id,
            "fields": fields,
            "bytes": rec.bytes,
            "counted": counted,
            "limit": tenant_limit,
            "expires_at": rec.expires_at or 0,
        }
        keys = [K.file(rec.id), K.tenant_files(rec.tenant), K.tenant_file_bytes(rec.tenant), K.SEQ, K.FILES_EXPIRING]
        if int(self.conn.script("create_file")(keys=keys, args=[dumps(args)])) < 0:
            raise LimitExceeded("file storage quota exceeded")

    def get(self, file_id: str, tenant: str | None = None) -> FileRecord | None:
        """The file, or None when it does not exist or belongs to another tenant."""
        if not ids.is_file_id(file_id):
            return None
        h = cast(dict[str, str], self.r.hgetall(K.file(file_id)))
        if not h or (tenant is not None and h.get("tenant") != tenant):
            return None
        return file_from_hash(h)

    def page(
        self, tenant: str, *, after: str | None, limit: int, order: str = "desc", purpose: str | None = None
    ) -> tuple[list[FileRecord], bool]:
        """A page of the tenant's files; raises KeyError when `after` is not one of them."""
        out: list[FileRecord] = []
        for file_id in zpage(self.r, K.tenant_files(tenant), after, order):
            rec = self.get(file_id, tenant)
            if rec is None or (purpose and rec.purpose != purpose):
                continue
            if len(out) == limit:
                return out, True
            out.append(rec)
        return out, False

    def delete(self, rec: FileRecord) -> None:
        """Remove the record (FileInUse when an unfinished job still needs it)."""
        keys = [
            K.file(rec.id),
            K.tenant_files(rec.tenant),
            K.tenant_file_bytes(rec.tenant),
            K.file_jobs(rec.id),
            K.FILES_EXPIRING,
        ]
        counted = "1" if rec.purpose == "fine-tune" else "0"
        res = self.conn.script("delete_file")(keys=keys, args=[rec.id, counted])
        if res != 1:
            raise FileInUse(str(res))

    def expired(self, at: int, start: int = 0, limit: int = 100) -> list[str]:
        """Ids of files whose `expires_at` is at or before `at`, soonest first, from the `start`-th."""
        return cast(list[str], self.r.zrangebyscore(K.FILES_EXPIRING, "-inf", at, start=start, num=limit))

    def forget_expiry(self, file_id: str) -> None:
        """Drop a file id from the expiry index (its record is gone already)."""
        self.r.zrem(K.FILES_EXPIRING, file_id)

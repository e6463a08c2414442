"""What belongs to a tenant as a whole: its secret-derived id, its quotas, the renaming of its
records, and the locks and counters processes share."""

from __future__ import annotations

import secrets
from typing import cast

from service.record import redis_keys as K
from service.record.records import STATUSES, dumps
from service.record.store.connection import Connection


class Tenants:
    """Per-tenant state that is not a file or a job, and what processes share (locks, counters)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.r = conn.r
        self._lock_tokens: dict[str, str] = {}

    def secret(self) -> bytes:
        """The secret tenant ids derive from: created by the first process that asks, then the same for all."""
        self.r.set(K.TENANT_SECRET, secrets.token_hex(32), nx=True)
        return bytes.fromhex(cast(str, self.r.get(K.TENANT_SECRET)))

    def has_records(self, tenant: str) -> bool:
        return bool(self.r.exists(K.tenant_files(tenant), K.tenant_jobs(tenant)))

    def rename(self, old: str, new: str) -> int:
        """Give every record of tenant `old` to `new` (see tenants.migrate_tenant); returns how many."""
        args = {
            "old": old,
            "new": new,
            "file_pattern": K.lua_pattern(K.FILE),
            "job_pattern": K.lua_pattern(K.JOB),
            "checkpoints_pattern": K.lua_pattern(K.JOB_CHECKPOINTS),
            "renames": [[key.format(old), key.format(new)] for key in K.TENANT_OWNED],
        }
        keys = [K.tenant_files(old), K.tenant_jobs(old), K.tenant_streams(old), K.SCHED_SERVED]
        return int(self.conn.script("rename_tenant")(keys=keys, args=[dumps(args)]))

    def output_bytes(self, tenant: str) -> int:
        """What the tenant's jobs' outputs take in storage (checkpoints, adapters, metrics)."""
        return int(self.r.get(K.tenant_output_bytes(tenant)) or 0)

    def storage_bytes(self, tenant: str) -> int:
        """Everything counted against the tenant's storage quota: uploads and job outputs."""
        files, outputs = cast(list[str | None], self.r.mget(K.tenant_file_bytes(tenant), K.tenant_output_bytes(tenant)))
        return int(files or 0) + int(outputs or 0)

    def acquire_lock(self, name: str, ttl_seconds: int) -> bool:
        """Take a lock shared by every process (it expires after `ttl_seconds` if never released)."""
        token = secrets.token_hex(8)
        if self.r.set(K.lock(name), token, nx=True, ex=ttl_seconds):
            self._lock_tokens[name] = token
            return True
        return False

    def release_lock(self, name: str) -> None:
        token = self._lock_tokens.pop(name, None)
        if token is not None:
            self.conn.script("release_lock")(keys=[K.lock(name)], args=[token])

    def status_counts(self) -> dict[str, int]:
        """Jobs per status, kept by every transition (the Prometheus gauges)."""
        raw = cast(dict[str, str], self.r.hgetall(K.STATS_STATUS))
        return {s: int(raw.get(s, 0)) for s in STATUSES}

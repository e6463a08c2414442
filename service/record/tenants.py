"""Tenant ids: an HMAC of the API key with a server secret, and the move from the old ids.

A tenant id names a tenant in Redis keys and storage keys and is shown as `organization_id`.
It used to be `sha256(key)[:16]`: anyone who saw one (a log line, a bucket listing) could
test candidate keys offline, and a weak key would fall. It is now HMAC-SHA256 of the key
under a 32-byte secret the service generates once and keeps in Redis (`redis_keys.TENANT_SECRET`),
beside the records it protects: every API process (and anything else that ever needs to
derive a tenant id) reads the same one, it survives restarts exactly as long as the
records do, and there is nothing to configure.

Data written under an old id is moved once, when the API starts and finds records under
the old id of one of its keys: objects from `tenants/<old>/` to `tenants/<new>/` first
(each copied before it is deleted; on a local disk one rename), then every record in one
Lua script. A start cut short between the two redoes the move (the records still name the
old id) and finishes it. Workers should be stopped for that first start: a job they are
running writes under the old id.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time

from service.record.storage import Storage, keys
from service.record.store import Store

log = logging.getLogger(__name__)

MIGRATION_LOCK = "tenant-migration"
LOCK_SECONDS = 3600


def tenant_of(key: str, secret: bytes) -> str:
    """The tenant id of an API key: 16 hex digits of HMAC-SHA256(secret, key)."""
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()[:16]


def legacy_tenant_of(key: str) -> str:
    """The id older versions derived (unsalted), only to find data to move."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def resolve_tenants(store: Store, storage: Storage, api_keys: list[str]) -> dict[str, str]:
    """key -> tenant id, after moving any data still under a key's old id (one API process at a time)."""
    secret = store.tenant_secret()
    tenants = {key: tenant_of(key, secret) for key in api_keys}
    moves = {legacy_tenant_of(key): new for key, new in tenants.items()}
    while any(store.tenant_has_records(old) for old in moves):
        if not store.acquire_lock(MIGRATION_LOCK, LOCK_SECONDS):  # another API process is moving them
            time.sleep(1)
            continue
        try:
            for old, new in moves.items():
                if store.tenant_has_records(old):
                    migrate_tenant(store, storage, old, new)
        finally:
            store.release_lock(MIGRATION_LOCK)
    return tenants


def migrate_tenant(store: Store, storage: Storage, old: str, new: str) -> None:
    """Move one tenant's objects and records from id `old` to id `new`."""
    if store.tenant_has_records(new):
        raise RuntimeError(f"tenant {new} already has records; not merging the data of old id {old} into them")
    moved = storage.move_under(keys.tenant_prefix(old), keys.tenant_prefix(new))
    records = store.rename_tenant(old, new)
    log.warning(
        "moved a tenant's data to its new id",
        extra={"old_tenant": old, "tenant": new, "objects": moved, "records": records},
    )

"""Reads that only tests need, built on the store's public client and record parsers.

The store keeps to what the service calls; a test that wants every event of a job, or a
tenant's uploaded bytes alone, reads them here from the keys `service.record.redis_keys` names.
"""

from __future__ import annotations

from typing import cast

from service.record import ids
from service.record import redis_keys as K
from service.record.records import Checkpoint, Event, event_from_entry, page_checkpoints
from service.record.store import Store


def read_events(store: Store, job_id: str, after: str = "0-0") -> list[Event]:
    """Every event of the job after stream id `after`, oldest first."""
    if after == ids.MAX_STREAM_ID:  # nothing is newer, and Redis refuses the empty interval
        return []
    raw = cast(list[tuple[str, dict[str, str]]], store.r.xrange(K.job_events(job_id), f"({after}", "+"))
    return [event_from_entry(sid, f) for sid, f in raw]


def list_events(store: Store, job_id: str, *, after: str | None, limit: int) -> tuple[list[Event], bool]:
    """A page of the job's events, newest first, older than stream id `after` (as the API pages them)."""
    top = f"({after}" if after else "+"
    raw = cast(list[tuple[str, dict[str, str]]], store.r.xrevrange(K.job_events(job_id), top, "-", count=limit + 1))
    events = [event_from_entry(sid, f) for sid, f in raw]
    return events[:limit], len(events) > limit


def list_checkpoints(store: Store, job_id: str, *, after: str | None, limit: int) -> tuple[list[Checkpoint], bool]:
    """A page of the job's checkpoint records, newest first."""
    return page_checkpoints(cast(list[str], store.r.hvals(K.job_checkpoints(job_id))), after=after, limit=limit)


def tenant_file_bytes(store: Store, tenant: str) -> int:
    """The bytes of the tenant's uploads counted against its quota (job outputs not included)."""
    return int(cast(str | None, store.r.get(K.tenant_file_bytes(tenant))) or 0)

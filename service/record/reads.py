"""The API's hot reads, asynchronous and one Redis round trip each.

Status polls, job lists, event pages, checkpoint lists and event streams are what every
client does all day. Served by the sync `Store` they cost a thread-pool hop per call and
one round trip per Redis command (a job, then the queue snapshot for its position; a
page of jobs, then one hash per job). Here each request is one Lua script on the API's
asyncio client: the check that the job is the caller's, the data, and the queue snapshot
when a queued job needs its position, read atomically. A script answers one JSON string
(cjson): redis-py's RESP parser is Python and costs per element (a job hash is forty, a page
of events hundreds), where one `json.loads` is C. Records are parsed by the same
functions as the sync store (`job_from_hash`, `page_checkpoints`, `order_from_snapshot`),
so both sides agree on what a record is.

Nothing here writes. The client and its pool are the caller's: when Redis is down or
restarts, a read raises redis's ConnectionError/TimeoutError like the sync store does
(the API answers 503), and the pool reconnects by itself once Redis is back; scripts are
reloaded on NOSCRIPT (a restarted server has forgotten them) by redis-py.
"""

from __future__ import annotations

import json
from typing import Any, Protocol, cast

import redis.asyncio as aioredis

from service.record import ids, scripts
from service.record import redis_keys as K
from service.record.queue import order_from_snapshot, snapshot_args
from service.record.records import Checkpoint, JobRecord, job_from_hash, page_checkpoints

EVENT_BATCH = 500
"""Events an event stream reads at once."""
LIST_SCAN = 500
"""Jobs a list script looks at before it returns to let other clients in (a metadata filter
may have to skip many); the API calls it again from where it stopped."""


def _pairs(flat: list[str] | tuple[str, ...]) -> dict[str, str]:
    """A dict from a flat [field, value, ...] list (cjson writes an empty one as `{}`)."""
    return dict(zip(flat[::2], flat[1::2], strict=True)) if flat else {}


JobHash = tuple[str, ...]
"""A job's Redis hash as read, [field, value, ...]: immutable and hashable, so what is derived
from it can be memoised (the API's `public_job_json`)."""

Entry = tuple[str, dict[str, str]]
"""A stream entry: (stream id, fields); `records.event_from_entry` makes an `Event` of one."""


def _entries(raw: list[Any]) -> list[Entry]:
    """Stream entries from a script's [[id, [field, value, ...]], ...] (an empty one is `{}`)."""
    return [(sid, _pairs(fields)) for sid, fields in raw or ()]


def job_record(flat: JobHash) -> JobRecord:
    """The record of a job hash as read."""
    return job_from_hash(_pairs(flat))


def hash_field(flat: JobHash | list[str], name: str) -> str | None:
    """One field of a job hash as read, without parsing the record."""
    for i in range(0, len(flat), 2):
        if flat[i] == name:
            return flat[i + 1]
    return None


class QueuePositions(Protocol):
    """What the public job object needs to show a queued job's position: the sync `Store`
    (one snapshot per call) or `KnownPositions` (a snapshot already read)."""

    def queue_position(self, job_id: str) -> int | None: ...


class KnownPositions:
    """Queue positions from one snapshot, answered like `Store.queue_position` (1 = next to start)."""

    def __init__(self, order: list[str] | None = None) -> None:
        self._positions = {job_id: i + 1 for i, job_id in enumerate(order or [])}

    def queue_position(self, job_id: str) -> int | None:
        return self._positions.get(job_id)


class Reads:
    """The API process's async reads; share one per process (its pool is bounded)."""

    def __init__(self, client: aioredis.Redis, *, blocking: aioredis.Redis | None = None) -> None:
        self.r = client
        self.blocking = blocking or client
        """For the one blocking read (`wait_events`): a client whose socket timeout outlasts the block."""
        self._job = client.register_script(scripts.source("read_job"))
        self._jobs = client.register_script(scripts.source("read_jobs"))
        self._events = client.register_script(scripts.source("read_events"))
        self._checkpoints = client.register_script(scripts.source("read_checkpoints"))
        self._stream = client.register_script(scripts.source("read_stream"))
        self._open = client.register_script(scripts.source("open_stream"))

    @classmethod
    def from_url(
        cls, url: str, *, max_connections: int, name: str | None = None, blocking: aioredis.Redis | None = None
    ) -> Reads:
        """A pool of at most `max_connections`: the API passes its connection limit (uvicorn's
        `--limit-concurrency`), and a request holds at most one connection of it at a time, so it is
        never exhausted and needs no waiting (the blocking pool's timer and condition per command
        cost more than the read); a short connect timeout so an outage is a quick 503."""
        pool = aioredis.ConnectionPool.from_url(
            url,
            max_connections=max_connections,
            decode_responses=True,
            socket_connect_timeout=3,
            socket_timeout=15,
            health_check_interval=15,
            client_name=name,
        )
        return cls(aioredis.Redis.from_pool(pool), blocking=blocking)

    async def aclose(self) -> None:
        await self.r.aclose()

    async def job(self, job_id: str, tenant: str) -> tuple[JobHash, KnownPositions] | None:
        """The caller's job (its hash as read) with its queue position; None for another tenant's or no job."""
        if not ids.is_job_id(job_id):
            return None
        queue_keys, queue_args = snapshot_args()
        res = json.loads(await self._job(keys=[K.job(job_id), *queue_keys], args=queue_args))
        flat = tuple(res[0])
        if _pairs(res[0]).get("tenant") != tenant:
            return None
        return flat, KnownPositions(order_from_snapshot(res[1]) if len(res) > 1 else None)

    async def jobs(
        self, tenant: str, *, after: str | None, limit: int, metadata: dict[str, str] | None = None
    ) -> tuple[list[JobHash], bool, KnownPositions]:
        """A page of the caller's jobs (their hashes as read), newest first, and their queue positions
        (KeyError: unknown `after`)."""
        found: list[JobHash] = []
        snapshot: list[Any] | None = None
        bound = ""
        meta = json.dumps(metadata, separators=(",", ":")) if metadata else ""
        queue_keys, (job_pattern, tenant_jobs_pattern) = snapshot_args()
        while True:
            args: list[str | int] = [
                job_pattern,
                tenant,
                after or "",
                bound,
                limit - len(found),
                meta,
                tenant_jobs_pattern,
                LIST_SCAN,
            ]
            raw = await self._jobs(keys=[K.tenant_jobs(tenant), *queue_keys], args=args)
            state, hashes, bound, snap = json.loads(raw)
            if state == -1:
                raise KeyError(after)
            found += [tuple(h) for h in hashes]
            snapshot = snap or snapshot
            if state != 2:
                return found, state == 1, KnownPositions(order_from_snapshot(snapshot) if snapshot else None)

    async def events(
        self, job_id: str, tenant: str, *, after: str | None, limit: int
    ) -> tuple[list[Entry], bool] | None:
        """The caller's job's events (stream entries), newest first, older than stream id `after`;
        None: not its job."""
        if not ids.is_job_id(job_id):
            return None
        top = "" if after == ids.MIN_STREAM_ID else f"({after}" if after else "+"
        raw = await self._events(keys=[K.job(job_id), K.job_events(job_id)], args=[tenant, top, limit + 1])
        if raw is None:
            return None
        evs = _entries(json.loads(raw))
        return evs[:limit], len(evs) > limit

    async def checkpoints(
        self, job_id: str, tenant: str, *, after: str | None, limit: int
    ) -> tuple[JobRecord, list[Checkpoint], bool] | None:
        """The caller's job and a page of its checkpoints, newest first (KeyError: unknown `after`)."""
        if not ids.is_job_id(job_id):
            return None
        h, raw = json.loads(await self._checkpoints(keys=[K.job(job_id), K.job_checkpoints(job_id)]))
        job = _pairs(h)
        if job.get("tenant") != tenant:
            return None
        cks, more = page_checkpoints(raw, after=after, limit=limit)
        return job_from_hash(job), cks, more

    async def open_stream(self, job_id: str, tenant: str, after: str) -> tuple[JobHash, list[Entry]] | None:
        """The caller's job and its events after stream id `after` (oldest first, a batch), read together:
        when the job is finished and the batch is not full, these are all its events."""
        if not ids.is_job_id(job_id):
            return None
        h, entries = json.loads(await self._open(keys=[K.job(job_id), K.job_events(job_id)], args=[after, EVENT_BATCH]))
        if hash_field(h, "tenant") != tenant:
            return None
        return tuple(h), (_entries(entries[0][1]) if entries else [])

    async def stream(self, job_id: str, after: str) -> tuple[list[Entry], str | None]:
        """The job's events after stream id `after` (oldest first, a batch) and its status, read together."""
        entries, status = json.loads(
            await self._stream(keys=[K.job_events(job_id), K.job(job_id)], args=[after, EVENT_BATCH])
        )
        return (_entries(entries[0][1]) if entries else []), status or None

    async def wait_events(self, job_id: str, after: str, block_ms: int) -> list[Entry]:
        """The job's events after stream id `after` (oldest first, a batch), waiting up to `block_ms`
        for one to come; [] when none came (an event stream then sends its keep-alive)."""
        resp = cast(
            list[tuple[str, list[Entry]]],
            await self.blocking.xread({K.job_events(job_id): after}, count=EVENT_BATCH, block=block_ms),
        )
        return [entry for _, entries in resp or () for entry in entries]

"""Redis as the system of record: files, jobs, their state machine, events, checkpoints.

Shared by the API and the worker, so it imports only redis, pydantic and the standard
library (plus the small `service.record.ids` module). Every state change of a job is one Lua
script: the check ("is it still queued?", "does this worker own it?", "has its lease
expired?") and the change, its side indexes and its event happen atomically, so two
workers, two reapers or a cancel racing a start can never both win.

State machine::

    validating_files -> queued -> running -> succeeded | failed | cancelled
    validating_files -> failed | cancelled
    queued  -> cancelled
    running -> queued      only by the reaper, when the job's lease has expired
    validating_files | queued | running -> paused     (a running job by its worker, after a checkpoint)
    paused  -> queued | cancelled                     (resume, cancel)

A succeeded, failed or cancelled job never changes again.

Which queued job starts next is not first-come first-served but fair across tenants
(`service.record.scheduling`): a free worker claims the first job of `queue_order()`.

Keys (prefix `seco:`)::

    seq                           global counter: list order and queue order
    file:<id>                     hash per file
    tenant:<t>:files              zset of the tenant's file ids (score: seq)
    tenant:<t>:file_bytes         bytes of the tenant's uploaded files (quota)
    tenant:<t>:output_bytes       bytes of its jobs' outputs in storage (quota; job field output_bytes)
    file:<id>:jobs                set of unfinished jobs using the file (blocks delete)
    files:expiring                zset of file ids with an `expires_after` (score: expires_at)
    job:<id>                      hash per job
    job:<id>:events               stream of events; entry id = event id = SSE id
    job:<id>:metrics_step         last metrics step recorded (dedupe after a resume)
    job:<id>:checkpoints          hash step -> checkpoint JSON
    tenant:<t>:jobs               zset of the tenant's job ids (score: seq)
    tenant:<t>:active             set of the tenant's queued/running jobs (quota)
    tenant:<t>:streams            zset of its open event streams (service/api/streams.py)
    tenant_secret                 the secret tenant ids are derived with (service/record/tenants.py)
    lock:<name>                   a lock between processes (SET NX with an expiry)
    queue                         zset of queued job ids (score: seq when queued)
    running                       set of running job ids (what the reaper sweeps)
    sched:served                  hash tenant -> seq of its last job start (round-robin)
    lease:<job>                   owner worker id, with a TTL refreshed while training
    workers                       zset worker id -> Redis server time of its last heartbeat
    stats:status                  hash status -> number of jobs (Prometheus gauges)
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any, cast

import redis
from pydantic import BaseModel

from service.record import ids
from service.record.models import parse_model_name
from service.record.scheduling import Queued, fair_order
from service.record.stop_rule import CANCEL_FLAG, stop_action

log = logging.getLogger(__name__)

P = "seco:"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
STATUSES = ("validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled")
REQUEUE_MESSAGE = "worker lost; job requeued, will resume from its last checkpoint"
MAX_CONNECTIONS = 64
"""Redis connections per process and pool: above the API's thread pool (40) plus its reaper."""
POOL_WAIT_SECONDS = 5
"""How long a caller waits for a free pooled connection before the request fails (503)."""
CLAIM_ATTEMPTS = 100
"""Claims a worker tries before giving up; each failed one means another worker started a job."""


def now() -> int:
    return int(time.time())


# --------------------------------------------------------------------------- records


class FileRecord(BaseModel):
    id: str
    tenant: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    path: str  # relative to the data dir
    job_id: str | None = None  # for result files: the job that produced it
    kind: str | None = None  # training data: "supervised" or "preference" (formats.record_kind); None: unknown
    expires_at: int | None = None  # OpenAI's expires_after: deleted by `service.record.expiry` once past


class JobRecord(BaseModel):
    id: str
    tenant: str
    status: str
    created_at: int
    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: dict[str, Any]
    suffix: str | None = None
    seed: int
    metadata: dict[str, str] | None = None
    seco: dict[str, Any]
    method: str = "supervised"  # OpenAI's method.type: "supervised" or "dpo"
    worker: str | None = None
    cancel_requested: bool = False
    pause_requested: bool = False  # a running job stops at its next optimizer step, after a checkpoint
    attempts: int = 0
    started_at: int | None = None
    finished_at: int | None = None
    progress: float | None = None
    step: int | None = None
    total_steps: int | None = None
    trained_tokens: int | None = None
    estimated_finish: int | None = None
    peak_memory_bytes: int | None = None
    fine_tuned_model: str | None = None
    error: dict[str, Any] | None = None
    result_files: list[str] = []
    adapter_file: str | None = None

    @property
    def base_model(self) -> str:
        """The base model under the adapter this job trains: `model` itself, or the base of the
        fine-tuned model (or checkpoint) named as `model` that it continues from."""
        parsed = parse_model_name(self.model)
        return parsed.base if parsed is not None else self.model


# Job fields written at creation, kept as one JSON blob ("spec") in the hash. Only its
# hyperparameters change later: the worker replaces "auto" by the values it trains with
# (`resolve_hyperparameters`), which a retry or resume then reads back and uses as they are.
SPEC_FIELDS = ("model", "training_file", "validation_file", "hyperparameters", "suffix", "seed", "metadata", "seco",
               "method")  # fmt: skip


class Checkpoint(BaseModel):
    id: str
    job_id: str
    step: int
    created_at: int
    path: str
    metrics: dict[str, Any]


class Event(BaseModel):
    id: str  # "ftevent-<stream id>"
    stream_id: str
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None = None


class LimitExceeded(Exception):
    """A per-tenant quota would be exceeded (HTTP 429)."""


class FileInUse(Exception):
    """A file is still needed by an unfinished job."""


# --------------------------------------------------------------------------- Lua

# Generic guarded transition. ARGV[1] is a JSON object:
#   job_id, from (list), to, owner (required current owner or ""), new_owner, lease_ms,
#   require_no_lease (bool), set (field -> string), incr (field -> int), event (or null), now
# Returns {1, old_status} when applied, {0, current_status or ""} when refused.
_TRANSITION = """
local a = cjson.decode(ARGV[1])
local job, queue, running, lease, active, events, stats, seq = KEYS[1], KEYS[2], KEYS[3], KEYS[4],
  KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local status = redis.call('HGET', job, 'status')
if not status then return {0, ''} end
local ok = false
for _, s in ipairs(a['from']) do if s == status then ok = true end end
if not ok then return {0, status} end
-- the state machine itself: no caller can ask for an edge outside it
local EDGES = {validating_files = {queued = 1, failed = 1, cancelled = 1, paused = 1},
               queued = {running = 1, failed = 1, cancelled = 1, paused = 1},
               running = {succeeded = 1, failed = 1, cancelled = 1, queued = 1, paused = 1},
               paused = {queued = 1, cancelled = 1}}
if not EDGES[status] or not EDGES[status][a['to']] then return {0, status} end
if status == 'running' and a['to'] == 'queued' and not a['require_no_lease'] then return {0, status} end
-- a running job pauses only through the worker that owns it (or the reaper, once it is gone)
if status == 'running' and a['to'] == 'paused' and a['owner'] == '' and not a['require_no_lease'] then
  return {0, status}
end
if a['owner'] ~= '' and redis.call('HGET', job, 'worker') ~= a['owner'] then return {0, status} end
if a['require_no_lease'] and redis.call('EXISTS', lease) == 1 then return {0, status} end
if a['unless_set'] ~= '' and redis.call('HGET', job, a['unless_set']) == '1' then return {0, status} end
local to = a['to']
redis.call('HSET', job, 'status', to)
for k, v in pairs(a['set']) do redis.call('HSET', job, k, v) end
for k, v in pairs(a['incr']) do redis.call('HINCRBY', job, k, v) end
if to == 'queued' then
  redis.call('ZADD', queue, redis.call('INCR', seq), a['job_id'])
else
  redis.call('ZREM', queue, a['job_id'])
end
if to == 'running' then
  redis.call('SADD', running, a['job_id'])
  redis.call('HSET', job, 'worker', a['new_owner'])
  redis.call('SET', lease, a['new_owner'], 'PX', a['lease_ms'])
else
  redis.call('SREM', running, a['job_id'])
  redis.call('DEL', lease)
  if status == 'running' then redis.call('HDEL', job, 'worker') end
end
if to == 'succeeded' or to == 'failed' or to == 'cancelled' then
  redis.call('SREM', active, a['job_id'])
  for i = 9, #KEYS do redis.call('SREM', KEYS[i], a['job_id']) end
end
redis.call('HINCRBY', stats, status, -1)
redis.call('HINCRBY', stats, to, 1)
local e = a['event']
if type(e) == 'table' then
  redis.call('XADD', events, '*', 'type', 'message', 'level', e['level'], 'message', e['message'],
    'data', e['data'], 'created_at', a['now'])
end
return {1, status}
"""

# Create a job in validating_files, within the tenant's quota, if its files still exist.
# KEYS: job, tenant jobs, tenant active, seq, stats, events, train file, train file jobs,
#       [valid file, valid file jobs]. ARGV[1]: JSON {job_id, tenant, limit, fields, message, now}
_CREATE_JOB = """
local a = cjson.decode(ARGV[1])
if redis.call('SCARD', KEYS[3]) >= tonumber(a['limit']) then return -1 end
for i = 7, #KEYS, 2 do
  if redis.call('HGET', KEYS[i], 'tenant') ~= a['tenant'] then return -2 end
end
for k, v in pairs(a['fields']) do redis.call('HSET', KEYS[1], k, v) end
redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[4]), a['job_id'])
redis.call('SADD', KEYS[3], a['job_id'])
for i = 8, #KEYS, 2 do redis.call('SADD', KEYS[i], a['job_id']) end
redis.call('HINCRBY', KEYS[5], 'validating_files', 1)
redis.call('XADD', KEYS[6], '*', 'type', 'message', 'level', 'info', 'message', a['message'],
  'data', 'null', 'created_at', a['now'])
return 1
"""

# Register a file; counted files (uploads) must fit the tenant's byte quota. A file with an
# expiry (expires_at > 0) is indexed for the sweep in the same step.
# KEYS: file hash, tenant files, tenant bytes, seq, expiring. ARGV[1]: JSON {id, fields, bytes, counted, limit,
# expires_at}
_CREATE_FILE = """
local a = cjson.decode(ARGV[1])
if a['counted'] then
  local used = tonumber(redis.call('GET', KEYS[3]) or '0')
  if used + a['bytes'] > a['limit'] then return -1 end
  redis.call('INCRBY', KEYS[3], a['bytes'])
end
local existed = redis.call('EXISTS', KEYS[1])
for k, v in pairs(a['fields']) do redis.call('HSET', KEYS[1], k, v) end
if existed == 0 then redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[4]), a['id']) end
if a['expires_at'] > 0 then redis.call('ZADD', KEYS[5], a['expires_at'], a['id']) end
return 1
"""

# Delete a file unless an unfinished job still uses it.
# KEYS: file hash, tenant files, tenant bytes, file jobs, expiring. ARGV: id, counted ('1'/'0')
_DELETE_FILE = """
if redis.call('SCARD', KEYS[4]) > 0 then return redis.call('SRANDMEMBER', KEYS[4]) end
local b = tonumber(redis.call('HGET', KEYS[1], 'bytes') or '0')
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
if ARGV[2] == '1' then redis.call('DECRBY', KEYS[3], b) end
return 1
"""

# A metrics event, dropped when its step is not newer than the last one recorded (a
# resumed job re-runs steps after its checkpoint; the first report of a step wins) or
# when the caller no longer owns the job.
# KEYS: events, metrics_step, job. ARGV: step, created_at, message, data, owner, peak bytes
_METRICS = """
if redis.call('HGET', KEYS[3], 'worker') ~= ARGV[5] then return false end
local last = tonumber(redis.call('GET', KEYS[2]) or '-1')
if tonumber(ARGV[1]) <= last then return false end
redis.call('SET', KEYS[2], ARGV[1])
local peak = tonumber(ARGV[6])
if peak > tonumber(redis.call('HGET', KEYS[3], 'peak_memory_bytes') or '0') then
  redis.call('HSET', KEYS[3], 'peak_memory_bytes', ARGV[6])
end
return redis.call('XADD', KEYS[1], '*', 'type', 'metrics', 'level', 'info', 'message', ARGV[3],
  'data', ARGV[4], 'created_at', ARGV[2])
"""

# Refresh a lease only while the caller still owns the running job.
# KEYS: job, lease. ARGV: owner, ttl ms
_REFRESH_LEASE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
"""

# Set fields on a running job the caller owns (progress, ETA, trained tokens).
# KEYS: job. ARGV: owner, field, value, field, value...
_UPDATE_OWNED = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""

# Ask a running job to stop (cancel) or to pause; the worker sees the flag at its next
# optimizer step (a pause also writes a checkpoint). KEYS: job, events. ARGV: the flag's
# field (cancel_requested, pause_requested), message, now. Returns the current status.
_REQUEST_STOP = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' then return status or '' end
if redis.call('HGET', KEYS[1], ARGV[1]) ~= '1' then
  redis.call('HSET', KEYS[1], ARGV[1], '1')
  redis.call('XADD', KEYS[2], '*', 'type', 'message', 'level', 'info', 'message', ARGV[2],
    'data', 'null', 'created_at', ARGV[3])
end
return status
"""

# Record what a job's outputs (checkpoints, adapter, metrics) take in storage, measured by
# the caller; the tenant's total moves by the difference, so measuring twice counts once.
# KEYS: job, tenant output bytes. ARGV: bytes. Returns 0 when the job no longer exists.
_SET_OUTPUT_BYTES = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local old = tonumber(redis.call('HGET', KEYS[1], 'output_bytes') or '0')
redis.call('HSET', KEYS[1], 'output_bytes', ARGV[1])
redis.call('INCRBY', KEYS[2], tonumber(ARGV[1]) - old)
return 1
"""

# Forget a finished job's outputs: its checkpoint records and result files go in one step,
# so nothing serves part of them while the caller deletes the objects. KEYS: job,
# checkpoints, tenant files, then each result file's hash. ARGV: result file ids (JSON).
# Returns the job's status, which must be final for anything to happen.
_FORGET_OUTPUTS = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'succeeded' and status ~= 'failed' and status ~= 'cancelled' then return status or '' end
redis.call('DEL', KEYS[2])
for i, id in ipairs(cjson.decode(ARGV[1])) do
  redis.call('DEL', KEYS[3 + i])
  redis.call('ZREM', KEYS[3], id)
end
redis.call('HSET', KEYS[1], 'result_files', '[]', 'adapter_file', '')
return status
"""

# Remove a finished job that has no outputs left: its record, events and index entries.
# KEYS: job, events, metrics step, checkpoints, tenant jobs, stats. ARGV: job id.
_DELETE_JOB = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'succeeded' and status ~= 'failed' and status ~= 'cancelled' then return status or '' end
if tonumber(redis.call('HGET', KEYS[1], 'output_bytes') or '0') ~= 0 then return 'has_outputs' end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('HINCRBY', KEYS[6], status, -1)
return 'deleted'
"""

# Give every record of tenant ARGV[2] to tenant ARGV[3] (whose id replaced it; its objects
# have moved from tenants/<old>/ to tenants/<new>/ already): tenant fields, storage paths
# in file and checkpoint records, the tenant's own keys. ARGV: key prefix, old, new.
# Returns how many file and job records changed.
_RENAME_TENANT = """
local p, old, new = ARGV[1], ARGV[2], ARGV[3]
local oldp, newp = 'tenants/' .. old .. '/', 'tenants/' .. new .. '/'
local n = 0
for _, id in ipairs(redis.call('ZRANGE', p .. 'tenant:' .. old .. ':files', 0, -1)) do
  local k = p .. 'file:' .. id
  local path = redis.call('HGET', k, 'path')
  if path then
    if string.sub(path, 1, #oldp) == oldp then path = newp .. string.sub(path, #oldp + 1) end
    redis.call('HSET', k, 'tenant', new, 'path', path)
    n = n + 1
  end
end
for _, id in ipairs(redis.call('ZRANGE', p .. 'tenant:' .. old .. ':jobs', 0, -1)) do
  local k = p .. 'job:' .. id
  if redis.call('EXISTS', k) == 1 then
    redis.call('HSET', k, 'tenant', new)
    n = n + 1
    local ck = redis.call('HGETALL', k .. ':checkpoints')
    for i = 1, #ck, 2 do  -- ids are hex: no pattern characters in them
      local rec = string.gsub(ck[i + 1], '"path":"' .. oldp, '"path":"' .. newp)
      redis.call('HSET', k .. ':checkpoints', ck[i], rec)
    end
  end
end
for _, suffix in ipairs({':files', ':file_bytes', ':jobs', ':active', ':output_bytes'}) do
  if redis.call('EXISTS', p .. 'tenant:' .. old .. suffix) == 1 then
    redis.call('RENAME', p .. 'tenant:' .. old .. suffix, p .. 'tenant:' .. new .. suffix)
  end
end
redis.call('DEL', p .. 'tenant:' .. old .. ':streams')
local served = redis.call('HGET', p .. 'sched:served', old)
if served then
  redis.call('HSET', p .. 'sched:served', new, served)
  redis.call('HDEL', p .. 'sched:served', old)
end
return n
"""

_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Heartbeat of a worker process, timed by the Redis server's clock (no skew between hosts).
_HEARTBEAT = """
local t = redis.call('TIME')
local s = tonumber(t[1])
redis.call('ZADD', KEYS[1], s, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', s - 10 * tonumber(ARGV[2]))
return s
"""

# What the fair order is computed from, read in one step: every queued job with its tenant
# and its age (score in the tenant's job index), the tenant of every running job, and when
# each tenant was last served. Job hashes are read by the ids found (a single Redis, as
# everywhere here). A Lua function, so that the API's reads (`service.record.reads`) take
# the same snapshot in the script that reads a job. Returns {{id, tenant, seq}...}, {tenant...}, served.
QUEUE_SNAPSHOT_FN = """
local function queue_snapshot(p)
  local queued = {}
  for _, id in ipairs(redis.call('ZRANGE', p .. 'queue', 0, -1)) do
    local t = redis.call('HGET', p .. 'job:' .. id, 'tenant')
    if t then
      local seq = redis.call('ZSCORE', p .. 'tenant:' .. t .. ':jobs', id)
      table.insert(queued, {id, t, seq or '0'})
    end
  end
  local running = {}
  for _, id in ipairs(redis.call('SMEMBERS', p .. 'running')) do
    local t = redis.call('HGET', p .. 'job:' .. id, 'tenant')
    if t then table.insert(running, t) end
  end
  return {queued, running, redis.call('HGETALL', p .. 'sched:served')}
end
"""
# ARGV: key prefix.
_QUEUE_SNAPSHOT = QUEUE_SNAPSHOT_FN + "return queue_snapshot(ARGV[1])\n"

_LIVE_WORKERS = """
local t = redis.call('TIME')
return redis.call('ZRANGEBYSCORE', KEYS[1], tonumber(t[1]) - tonumber(ARGV[1]), '+inf')
"""


# --------------------------------------------------------------------------- store


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _opt_int(value: str | None) -> int | None:
    return None if value in (None, "") else int(cast(str, value))


def job_from_hash(h: dict[str, str]) -> JobRecord:
    """A job record from its Redis hash (shared by the sync store and the API's async reads)."""
    spec = json.loads(h["spec"])
    progress = h.get("progress")
    return JobRecord(
        id=h["id"], tenant=h["tenant"], status=h["status"], created_at=int(h["created_at"]), **spec,
        worker=h.get("worker") or None, cancel_requested=h.get("cancel_requested") == "1",
        pause_requested=h.get("pause_requested") == "1",
        attempts=int(h.get("attempts") or 0), started_at=_opt_int(h.get("started_at")),
        finished_at=_opt_int(h.get("finished_at")),
        progress=float(progress) if progress else None, step=_opt_int(h.get("step")),
        total_steps=_opt_int(h.get("total_steps")), trained_tokens=_opt_int(h.get("trained_tokens")),
        estimated_finish=_opt_int(h.get("estimated_finish")),
        peak_memory_bytes=_opt_int(h.get("peak_memory_bytes")),
        fine_tuned_model=h.get("fine_tuned_model") or None,
        error=json.loads(h["error"]) if h.get("error") else None,
        result_files=json.loads(h.get("result_files") or "[]"),
        adapter_file=h.get("adapter_file") or None,
    )  # fmt: skip


def order_from_snapshot(snapshot: list[Any]) -> list[str]:
    """Every queued job id in start order, from what `queue_snapshot` (Lua) returned."""
    queued, running, served = snapshot
    return fair_order(
        (Queued(job_id=j, tenant=t, seq=int(float(seq))) for j, t, seq in queued),
        Counter(running),
        {served[i]: int(served[i + 1]) for i in range(0, len(served), 2)},
    )


def page_checkpoints(raw: Iterable[str], *, after: str | None, limit: int) -> tuple[list[Checkpoint], bool]:
    """Newest (highest step) first from the stored checkpoint JSONs; KeyError when `after` is not among them."""
    cks = sorted((Checkpoint.model_validate_json(v) for v in raw), key=lambda c: -c.step)
    if after is not None:
        idx = next((i for i, c in enumerate(cks) if c.id == after), None)
        if idx is None:
            raise KeyError(after)
        cks = cks[idx + 1 :]
    return cks[:limit], len(cks) > limit


class Store:
    """Typed access to the Redis records. Cheap to build; share one per process."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._transition = self.r.register_script(_TRANSITION)
        self._create_job = self.r.register_script(_CREATE_JOB)
        self._create_file = self.r.register_script(_CREATE_FILE)
        self._delete_file = self.r.register_script(_DELETE_FILE)
        self._metrics = self.r.register_script(_METRICS)
        self._refresh_lease = self.r.register_script(_REFRESH_LEASE)
        self._update_owned = self.r.register_script(_UPDATE_OWNED)
        self._request_stop = self.r.register_script(_REQUEST_STOP)
        self._heartbeat = self.r.register_script(_HEARTBEAT)
        self._live_workers = self.r.register_script(_LIVE_WORKERS)
        self._queue_snapshot = self.r.register_script(_QUEUE_SNAPSHOT)
        self._set_output_bytes = self.r.register_script(_SET_OUTPUT_BYTES)
        self._forget_outputs = self.r.register_script(_FORGET_OUTPUTS)
        self._delete_job = self.r.register_script(_DELETE_JOB)
        self._rename_tenant = self.r.register_script(_RENAME_TENANT)
        self._release_lock = self.r.register_script(_RELEASE_LOCK)
        self._lock_tokens: dict[str, str] = {}

    @classmethod
    def from_url(cls, url: str, *, max_connections: int = MAX_CONNECTIONS, name: str | None = None) -> Store:
        """Short connect timeout: when Redis is down the API answers 503 quickly, not after a hang.

        The pool is bounded: a burst of requests waits up to a few seconds for a free
        connection (then a 503) instead of opening as many connections as there are
        requests. `name` shows in Redis's CLIENT LIST (who holds which connection).
        """
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=POOL_WAIT_SECONDS,
            decode_responses=True,
            socket_connect_timeout=3,
            socket_timeout=15,
            health_check_interval=15,
            client_name=name,
        )
        return cls(redis.Redis(connection_pool=pool))

    def ping(self) -> bool:
        return bool(self.r.ping())

    # ------------------------------------------------------------------ keys

    @staticmethod
    def _file_key(file_id: str) -> str:
        return f"{P}file:{file_id}"

    @staticmethod
    def _job_key(job_id: str) -> str:
        return f"{P}job:{job_id}"

    @staticmethod
    def _events_key(job_id: str) -> str:
        return f"{P}job:{job_id}:events"

    @staticmethod
    def events_key(job_id: str) -> str:
        """Exposed for the SSE route, which reads the stream with an asyncio client."""
        return f"{P}job:{job_id}:events"

    # ------------------------------------------------------------------ files

    def create_file(self, rec: FileRecord, *, counted: bool, tenant_limit: int) -> None:
        """Register a file; `counted` uploads must fit the tenant's byte quota (else LimitExceeded)."""
        fields = {k: ("" if v is None else str(v)) for k, v in rec.model_dump().items()}
        args = {"id": rec.id, "fields": fields, "bytes": rec.bytes, "counted": counted, "limit": tenant_limit,
                "expires_at": rec.expires_at or 0}  # fmt: skip
        keys = [self._file_key(rec.id), f"{P}tenant:{rec.tenant}:files", f"{P}tenant:{rec.tenant}:file_bytes",
                f"{P}seq", f"{P}files:expiring"]  # fmt: skip
        if int(self._create_file(keys=keys, args=[_dumps(args)])) < 0:
            raise LimitExceeded("file storage quota exceeded")

    def tenant_file_bytes(self, tenant: str) -> int:
        return int(self.r.get(f"{P}tenant:{tenant}:file_bytes") or 0)

    def tenant_output_bytes(self, tenant: str) -> int:
        """What the tenant's jobs' outputs take in storage (checkpoints, adapters, metrics)."""
        return int(self.r.get(f"{P}tenant:{tenant}:output_bytes") or 0)

    def tenant_storage_bytes(self, tenant: str) -> int:
        """Everything counted against the tenant's storage quota: uploads and job outputs."""
        files, outputs = cast(list[str | None], self.r.mget(f"{P}tenant:{tenant}:file_bytes",
                                                             f"{P}tenant:{tenant}:output_bytes"))  # fmt: skip
        return int(files or 0) + int(outputs or 0)

    def get_file(self, file_id: str, tenant: str | None = None) -> FileRecord | None:
        """The file, or None when it does not exist or belongs to another tenant."""
        if not ids.is_file_id(file_id):
            return None
        h = cast(dict[str, str], self.r.hgetall(self._file_key(file_id)))
        if not h or (tenant is not None and h.get("tenant") != tenant):
            return None
        return FileRecord(
            id=h["id"], tenant=h["tenant"], bytes=int(h["bytes"]), created_at=int(h["created_at"]),
            filename=h["filename"], purpose=h["purpose"], status=h.get("status") or "processed",
            path=h["path"], job_id=h.get("job_id") or None, kind=h.get("kind") or None,
            expires_at=_opt_int(h.get("expires_at")),
        )  # fmt: skip

    def list_files(
        self, tenant: str, *, after: str | None, limit: int, order: str = "desc", purpose: str | None = None
    ) -> tuple[list[FileRecord], bool]:
        """A page of the tenant's files; raises KeyError when `after` is not one of them."""
        key = f"{P}tenant:{tenant}:files"
        out: list[FileRecord] = []
        for file_id in self._zpage(key, after, order):
            rec = self.get_file(file_id, tenant)
            if rec is None or (purpose and rec.purpose != purpose):
                continue
            if len(out) == limit:
                return out, True
            out.append(rec)
        return out, False

    def delete_file(self, rec: FileRecord) -> None:
        """Remove the record (FileInUse when an unfinished job still needs it)."""
        keys = [self._file_key(rec.id), f"{P}tenant:{rec.tenant}:files", f"{P}tenant:{rec.tenant}:file_bytes",
                f"{self._file_key(rec.id)}:jobs", f"{P}files:expiring"]  # fmt: skip
        counted = "1" if rec.purpose == "fine-tune" else "0"
        res = self._delete_file(keys=keys, args=[rec.id, counted])
        if res != 1:
            raise FileInUse(str(res))

    def expired_files(self, at: int, start: int = 0, limit: int = 100) -> list[str]:
        """Ids of files whose `expires_at` is at or before `at`, soonest first, from the `start`-th."""
        return cast(list[str], self.r.zrangebyscore(f"{P}files:expiring", "-inf", at, start=start, num=limit))

    def forget_expiry(self, file_id: str) -> None:
        """Drop a file id from the expiry index (its record is gone already)."""
        self.r.zrem(f"{P}files:expiring", file_id)

    def _zpage(self, key: str, after: str | None, order: str) -> Iterable[str]:
        """Ids of a sorted set from just past `after`, in batches (newest first for "desc")."""
        desc = order != "asc"
        if after is not None:
            score = self.r.zscore(key, after)
            if score is None:
                raise KeyError(after)
            bound = f"({int(score)}"
        else:
            bound = "+inf" if desc else "-inf"
        while True:
            if desc:
                batch = cast(list[tuple[str, float]], self.r.zrevrangebyscore(
                    key, bound, "-inf", start=0, num=200, withscores=True))  # fmt: skip
            else:
                batch = cast(list[tuple[str, float]], self.r.zrangebyscore(
                    key, bound, "+inf", start=0, num=200, withscores=True))  # fmt: skip
            if not batch:
                return
            for member, _ in batch:
                yield member
            bound = f"({int(batch[-1][1])}"

    # ------------------------------------------------------------------ jobs

    def create_job(self, rec: JobRecord, *, tenant_limit: int) -> None:
        """Store a new job in `validating_files` (LimitExceeded beyond the tenant's quota;
        LookupError when one of its files was deleted meanwhile)."""
        spec = {k: getattr(rec, k) for k in SPEC_FIELDS}
        fields = {"id": rec.id, "tenant": rec.tenant, "status": "validating_files",
                  "created_at": str(rec.created_at), "spec": _dumps(spec), "attempts": "0",
                  "cancel_requested": "0", "result_files": "[]"}  # fmt: skip
        keys = [self._job_key(rec.id), f"{P}tenant:{rec.tenant}:jobs", f"{P}tenant:{rec.tenant}:active",
                f"{P}seq", f"{P}stats:status", self._events_key(rec.id),
                self._file_key(rec.training_file), f"{self._file_key(rec.training_file)}:jobs"]  # fmt: skip
        if rec.validation_file:
            keys += [self._file_key(rec.validation_file), f"{self._file_key(rec.validation_file)}:jobs"]
        args = {"job_id": rec.id, "tenant": rec.tenant, "limit": tenant_limit, "fields": fields,
                "message": f"Created fine-tuning job: {rec.id}", "now": str(now())}  # fmt: skip
        res = int(self._create_job(keys=keys, args=[_dumps(args)]))
        if res == -1:
            raise LimitExceeded(f"at most {tenant_limit} queued or running jobs per API key")
        if res == -2:
            raise LookupError("a file of this job no longer exists")

    def get_job(self, job_id: str, tenant: str | None = None) -> JobRecord | None:
        """The job, or None when it does not exist or belongs to another tenant."""
        if not ids.is_job_id(job_id):
            return None
        h = cast(dict[str, str], self.r.hgetall(self._job_key(job_id)))
        if not h or (tenant is not None and h.get("tenant") != tenant):
            return None
        return job_from_hash(h)

    def list_jobs(
        self, tenant: str, *, after: str | None, limit: int, metadata: dict[str, str] | None = None
    ) -> tuple[list[JobRecord], bool]:
        """A page of the tenant's jobs, newest first (KeyError when `after` is unknown)."""
        out: list[JobRecord] = []
        for job_id in self._zpage(f"{P}tenant:{tenant}:jobs", after, "desc"):
            rec = self.get_job(job_id, tenant)
            if rec is None:
                continue
            if metadata and any((rec.metadata or {}).get(k) != v for k, v in metadata.items()):
                continue
            if len(out) == limit:
                return out, True
            out.append(rec)
        return out, False

    def queue_position(self, job_id: str) -> int | None:
        """1 = the next job a free worker starts; None when the job is not queued.

        Its rank in the fair order (`service.record.scheduling`): how many queued jobs, of
        any tenant, start before it if no job is added, cancelled or finishes meanwhile.
        """
        order = self.queue_order()
        return order.index(job_id) + 1 if job_id in order else None

    def queue_order(self) -> list[str]:
        """Every queued job id, in the order free workers will start them."""
        keys = [f"{P}queue", f"{P}running", f"{P}sched:served"]  # declared, though the script derives them
        return order_from_snapshot(cast(list[Any], self._queue_snapshot(keys=keys, args=[P])))

    def claim_next(self, worker_id: str, lease_seconds: float) -> str | None:
        """Start the first job of the fair order for `worker_id`; its id, or None when none is queued.

        The start itself is the guarded queued -> running transition, so two workers racing
        for the same job cannot both get it: the loser takes the next one in a fresh order.
        """
        for _ in range(CLAIM_ATTEMPTS):
            order = self.queue_order()
            if not order:
                return None
            job_id = order[0]
            if self.start_job(job_id, worker_id, lease_seconds):
                tenant = self.r.hget(self._job_key(job_id), "tenant")
                if tenant:
                    self.r.hset(f"{P}sched:served", str(tenant), int(cast(int, self.r.incr(f"{P}seq"))))
                return job_id
        log.warning("no queued job could be claimed in %d attempts (workers racing for them)", CLAIM_ATTEMPTS)
        return None

    def transition(
        self,
        job_id: str,
        from_: Iterable[str],
        to: str,
        *,
        owner: str = "",
        new_owner: str = "",
        lease_seconds: float = 0,
        require_no_lease: bool = False,
        unless_set: str = "",
        set_fields: dict[str, Any] | None = None,
        incr: dict[str, int] | None = None,
        event: str | None = None,
        event_level: str = "info",
        event_data: dict[str, Any] | None = None,
    ) -> tuple[bool, str]:
        """Atomically move a job from one of `from_` to `to`; returns (applied, status before).

        `owner` demands that this worker holds the job; `require_no_lease` that its lease
        has expired (the reaper); `unless_set` that the job's flag of that name is not set
        (a pause is not applied once a cancel is pending: `stop_rule`). `event` is appended
        to the job's stream in the same step, so a reader never sees the new status without
        the event that explains it.
        """
        rec_key = self._job_key(job_id)
        h = cast(list[str | None], self.r.hmget(rec_key, ["tenant", "spec"]))
        if h[0] is None or h[1] is None:
            return False, ""
        tenant, spec = h[0], json.loads(h[1])
        file_sets = [f"{self._file_key(f)}:jobs" for f in (spec["training_file"], spec["validation_file"]) if f]
        keys = [rec_key, f"{P}queue", f"{P}running", f"{P}lease:{job_id}", f"{P}tenant:{tenant}:active",
                self._events_key(job_id), f"{P}stats:status", f"{P}seq", *file_sets]  # fmt: skip
        args = {
            "job_id": job_id, "from": list(from_), "to": to, "owner": owner, "new_owner": new_owner,
            "lease_ms": max(1, int(lease_seconds * 1000)), "require_no_lease": require_no_lease,
            "unless_set": unless_set,
            "set": {k: (v if isinstance(v, str) else _dumps(v)) for k, v in (set_fields or {}).items()},
            "incr": incr or {}, "now": str(now()),
            "event": None if event is None else
            {"level": event_level, "message": event, "data": _dumps(event_data)},
        }  # fmt: skip
        # cjson turns an empty Python dict into an empty Lua table either way; fine for pairs().
        applied, before = cast(list[Any], self._transition(keys=keys, args=[_dumps(args)]))
        return bool(applied), str(before)

    def request_cancel(self, job_id: str) -> str:
        """Cancel: queued (or validating) -> cancelled now; running -> flag for the worker.

        Returns the status after the call ("cancelled", "running" with the flag set, or the
        terminal status that made the request invalid).
        """
        applied, before = self.transition(job_id, ["queued", "validating_files", "paused"], "cancelled",
                                          set_fields={"finished_at": str(now())},
                                          event="Fine-tuning job cancelled")  # fmt: skip
        if applied:
            return "cancelled"
        if before != "running":
            return before
        msg = "Cancellation requested; the job stops after its current step"
        return self._flag_running(job_id, "cancel_requested", msg)

    def request_pause(self, job_id: str) -> str:
        """Pause: queued (or validating) -> paused now; running -> flag for the worker, which
        writes a checkpoint at its next optimizer step and stops (`pause_running`).

        Returns the status after the call ("paused", "running" with the flag set, or the
        status that made the request invalid: a finished one).
        """
        applied, before = self.transition(job_id, ["queued", "validating_files"], "paused",
                                          event="Fine-tuning job paused")  # fmt: skip
        if applied:
            return "paused"
        if before != "running":
            return before
        if stop_action(*self.stop_requests(job_id)) == "cancel":  # cancel wins: it stops for good
            return before
        msg = "Pause requested; the job stops after its current step, with a checkpoint"
        return self._flag_running(job_id, "pause_requested", msg)

    def _flag_running(self, job_id: str, flag: str, message: str) -> str:
        """Set `flag` on a running job (once, with an event); returns its status."""
        return str(self._request_stop(keys=[self._job_key(job_id), self._events_key(job_id)],
                                      args=[flag, message, str(now())]))  # fmt: skip

    def stop_requests(self, job_id: str) -> tuple[bool, bool]:
        """(cancel requested, pause requested) of a running job: what its worker polls, in one read."""
        cancel, pause = cast(
            list[str | None], self.r.hmget(self._job_key(job_id), ["cancel_requested", "pause_requested"])
        )
        return cancel == "1", pause == "1"

    def pause_running(self, job_id: str, worker_id: str, step: int) -> str:
        """running -> paused by the worker that owns it, once its checkpoint at `step` is stored;
        cancelled instead when a cancel is pending (`stop_rule`: cancel wins over pause).

        Returns "paused", "cancelled", or "" when the job is not this worker's to stop.
        """
        applied, _ = self.transition(job_id, ["running"], "paused", owner=worker_id, unless_set=CANCEL_FLAG,
                                     set_fields={"pause_requested": "0", "estimated_finish": ""},
                                     event=f"Fine-tuning job paused at step {step}; resume continues from "
                                     "its checkpoint", event_data={"step": step})  # fmt: skip
        if applied:
            return "paused"
        cancel, pause = self.stop_requests(job_id)
        if stop_action(cancel, pause) != "cancel":
            return ""
        done = self.finish_job(job_id, worker_id, "cancelled", event="Fine-tuning job cancelled (its cancel "
                               "came while a pause was pending; cancel wins)")  # fmt: skip
        return "cancelled" if done else ""

    def resume(self, job_id: str) -> tuple[bool, str]:
        """paused -> queued (the caller then enqueues it); returns (applied, the status before the call).

        A paused job with a pending cancel (`stop_rule`: cancel wins) is cancelled instead:
        (False, "cancelled")."""
        applied, before = self.transition(job_id, ["paused"], "queued", set_fields={"pause_requested": "0"},
                                          unless_set=CANCEL_FLAG,
                                          event="Fine-tuning job resumed; queued to continue from its last "
                                          "checkpoint")  # fmt: skip
        if applied or before != "paused" or stop_action(*self.stop_requests(job_id)) != "cancel":
            return applied, before
        cancelled, _ = self.transition(job_id, ["paused"], "cancelled", set_fields={"finished_at": str(now())},
                                       event="Fine-tuning job cancelled (its cancel was pending; cancel wins "
                                       "over resume)")  # fmt: skip
        return False, "cancelled" if cancelled else before

    # ------------------------------------------------------------------ worker side

    def start_job(self, job_id: str, worker_id: str, lease_seconds: float) -> bool:
        """queued -> running, owned by `worker_id` with a fresh lease. False: not ours to run."""
        rec = self.get_job(job_id)
        if rec is None:
            return False
        if rec.attempts:
            msg = f"Fine-tuning job resumed on {worker_id} (attempt {rec.attempts + 1})"
        else:
            msg = "Fine-tuning job started"
        fields: dict[str, Any] = {"started_at": str(rec.started_at or now())}
        applied, _ = self.transition(job_id, ["queued"], "running", new_owner=worker_id,
                                     lease_seconds=lease_seconds, set_fields=fields, event=msg)  # fmt: skip
        return applied

    def refresh_lease(self, job_id: str, worker_id: str, lease_seconds: float) -> bool:
        """Extend this worker's lease; False when the job is no longer its own (stop working)."""
        res = self._refresh_lease(keys=[self._job_key(job_id), f"{P}lease:{job_id}"],
                                  args=[worker_id, max(1, int(lease_seconds * 1000))])  # fmt: skip
        return bool(res)

    def update_running(self, job_id: str, worker_id: str, fields: dict[str, Any]) -> bool:
        flat: list[str] = [worker_id]
        for k, v in fields.items():
            flat += [k, "" if v is None else str(v)]
        return bool(self._update_owned(keys=[self._job_key(job_id)], args=flat))

    def resolve_hyperparameters(self, job_id: str, worker_id: str, resolved: dict[str, Any]) -> bool:
        """Record the hyperparameters the owning worker trains with in place of "auto".

        OpenAI's job object shows the values in use once training starts; a later attempt
        (resume after a crash) reads them back and trains with the same ones. Only the
        running job's owner writes; nothing else rewrites the spec after creation.
        """
        raw = cast(str | None, self.r.hget(self._job_key(job_id), "spec"))
        if raw is None:
            return False
        spec = json.loads(raw)
        spec["hyperparameters"] = {**spec.get("hyperparameters", {}), **resolved}
        return self.update_running(job_id, worker_id, {"spec": _dumps(spec)})

    def finish_job(
        self,
        job_id: str,
        worker_id: str,
        status: str,
        *,
        fields: dict[str, Any] | None = None,
        event: str,
        event_level: str = "info",
    ) -> bool:
        """running -> succeeded|failed|cancelled, only by the worker that owns it."""
        assert status in TERMINAL, status
        set_fields = {"finished_at": str(now()), **(fields or {})}
        applied, _ = self.transition(job_id, ["running"], status, owner=worker_id, set_fields=set_fields,
                                     event=event, event_level=event_level)  # fmt: skip
        return applied

    def fail_unstarted(self, job_id: str, message: str, code: str) -> bool:
        """validating_files|queued -> failed (the API could not queue it, or its files vanished)."""
        applied, _ = self.transition(
            job_id, ["validating_files", "queued"], "failed",
            set_fields={"finished_at": str(now()), "error": {"code": code, "message": message, "param": None}},
            event=message, event_level="error",
        )  # fmt: skip
        return applied

    def reap_expired(self, max_attempts: int) -> list[str]:
        """Requeue running jobs whose lease expired (their worker died). Returns the ids to enqueue.

        A job whose cancel was requested is cancelled instead; a job that lost its worker
        `max_attempts` times is failed (it may be what kills the worker, e.g. host OOM).
        Safe to run from any number of processes: the transition demands an expired lease.
        """
        requeue: list[str] = []
        for job_id in cast(set[str], self.r.smembers(f"{P}running")):
            if self.r.exists(f"{P}lease:{job_id}"):
                continue
            rec = self.get_job(job_id)
            if rec is None or rec.status != "running":
                self.r.srem(f"{P}running", job_id)
                continue
            action = stop_action(rec.cancel_requested, rec.pause_requested)
            if action == "cancel":
                applied, _ = self.transition(job_id, ["running"], "cancelled", require_no_lease=True,
                                             set_fields={"finished_at": str(now())},
                                             event="Fine-tuning job cancelled (its worker was lost)")  # fmt: skip
            elif action == "pause":  # resume continues from its last checkpoint, as a requeue would
                applied, _ = self.transition(job_id, ["running"], "paused", require_no_lease=True,
                                             unless_set=CANCEL_FLAG,
                                             set_fields={"pause_requested": "0", "estimated_finish": ""},
                                             event="Fine-tuning job paused (its worker was lost); resume "
                                             "continues from its last checkpoint")  # fmt: skip
            elif rec.attempts + 1 >= max_attempts:
                msg = f"worker lost {rec.attempts + 1} times; giving up"
                applied, _ = self.transition(
                    job_id, ["running"], "failed", require_no_lease=True, incr={"attempts": 1},
                    set_fields={"finished_at": str(now()),
                                "error": {"code": "worker_lost", "message": msg, "param": None}},
                    event=msg, event_level="error",
                )  # fmt: skip
            else:
                applied, _ = self.transition(job_id, ["running"], "queued", require_no_lease=True,
                                             incr={"attempts": 1}, event=REQUEUE_MESSAGE,
                                             event_level="warn")  # fmt: skip
                if applied:
                    requeue.append(job_id)
            if applied:
                log.warning("reaped job %s whose worker %s stopped renewing its lease", job_id, rec.worker)
        return requeue

    def worker_heartbeat(self, worker_id: str, ttl_seconds: int) -> None:
        self._heartbeat(keys=[f"{P}workers"], args=[worker_id, ttl_seconds])

    def remove_worker(self, worker_id: str) -> None:
        self.r.zrem(f"{P}workers", worker_id)

    def live_workers(self, ttl_seconds: int) -> list[str]:
        return cast(list[str], self._live_workers(keys=[f"{P}workers"], args=[ttl_seconds]))

    # ------------------------------------------------------------------ events

    def add_event(self, job_id: str, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> str:
        """Append a `message` event; returns its stream id."""
        fields = {"type": "message", "level": level, "message": message, "data": _dumps(data),
                  "created_at": str(now())}  # fmt: skip
        return cast(str, self.r.xadd(self._events_key(job_id), fields))  # type: ignore[arg-type]

    def add_metrics(self, job_id: str, worker_id: str, data: dict[str, Any], message: str) -> str | None:
        """Append a `metrics` event unless its step was already recorded; returns its id or None."""
        step = int(data["step"])
        peak = int(data.get("peak_memory_bytes") or 0)
        res = self._metrics(keys=[self._events_key(job_id), f"{P}job:{job_id}:metrics_step", self._job_key(job_id)],
                            args=[step, str(now()), message, _dumps(data), worker_id, peak])  # fmt: skip
        return cast(str | None, res or None)

    @staticmethod
    def event_from_entry(stream_id: str, fields: dict[str, str]) -> Event:
        return Event(
            id=ids.event_id(stream_id), stream_id=stream_id, created_at=int(fields.get("created_at") or 0),
            level=fields.get("level", "info"), message=fields.get("message", ""),
            type=fields.get("type", "message"), data=json.loads(fields.get("data") or "null"),
        )  # fmt: skip

    def list_events(self, job_id: str, *, after: str | None, limit: int) -> tuple[list[Event], bool]:
        """Newest first, like OpenAI; `after` is a stream id: return events older than it."""
        if after == ids.MIN_STREAM_ID:  # nothing is older, and Redis refuses the empty interval
            return [], False
        top = f"({after}" if after else "+"
        raw = cast(list[tuple[str, dict[str, str]]], self.r.xrevrange(self._events_key(job_id), top, "-",
                                                                      count=limit + 1))  # fmt: skip
        events = [self.event_from_entry(sid, f) for sid, f in raw]
        return events[:limit], len(events) > limit

    def read_events(self, job_id: str, after: str = "0-0") -> list[Event]:
        """Every event after stream id `after`, oldest first."""
        if after == ids.MAX_STREAM_ID:  # nothing is newer, and Redis refuses the empty interval
            return []
        raw = cast(list[tuple[str, dict[str, str]]], self.r.xrange(self._events_key(job_id), f"({after}", "+"))
        return [self.event_from_entry(sid, f) for sid, f in raw]

    # ------------------------------------------------------------------ checkpoints

    def add_checkpoint(self, job_id: str, step: int, path: str, metrics: dict[str, Any]) -> Checkpoint:
        ck = Checkpoint(id=ids.checkpoint_id(job_id, step), job_id=job_id, step=step, created_at=now(),
                        path=path, metrics=metrics)  # fmt: skip
        self.r.hset(f"{P}job:{job_id}:checkpoints", str(step), ck.model_dump_json())
        return ck

    def get_checkpoint(self, job_id: str, step: int) -> Checkpoint | None:
        raw = cast(str | None, self.r.hget(f"{P}job:{job_id}:checkpoints", str(step)))
        return Checkpoint.model_validate_json(raw) if raw else None

    def list_checkpoints(self, job_id: str, *, after: str | None, limit: int) -> tuple[list[Checkpoint], bool]:
        """Newest (highest step) first; KeyError when `after` is not one of this job's checkpoints."""
        raw = cast(list[str], self.r.hvals(f"{P}job:{job_id}:checkpoints"))
        return page_checkpoints(raw, after=after, limit=limit)

    def remove_checkpoints(self, job_id: str, steps: Iterable[int]) -> None:
        """Drop checkpoint records (their objects were pruned from storage)."""
        fields = [str(step) for step in steps]
        if fields:
            self.r.hdel(f"{P}job:{job_id}:checkpoints", *fields)

    # ------------------------------------------------------------------ outputs

    def set_output_bytes(self, job_id: str, tenant: str, size: int) -> bool:
        """Record the measured size of a job's outputs (False when the job no longer exists)."""
        keys = [self._job_key(job_id), f"{P}tenant:{tenant}:output_bytes"]
        return bool(self._set_output_bytes(keys=keys, args=[size]))

    def forget_outputs(self, rec: JobRecord) -> str:
        """Unregister a finished job's checkpoints and result files; returns its status (a final
        one when this happened; otherwise nothing changed)."""
        files = list(rec.result_files)
        keys = [self._job_key(rec.id), f"{P}job:{rec.id}:checkpoints", f"{P}tenant:{rec.tenant}:files",
                *(self._file_key(f) for f in files)]  # fmt: skip
        return str(self._forget_outputs(keys=keys, args=[_dumps(files)]))

    def forget_fine_tuned_model(self, job_id: str, name: str) -> None:
        """The job's model was deleted (its outputs are gone): it no longer names one."""
        self.r.hset(self._job_key(job_id), mapping={"fine_tuned_model": "", "model_deleted_at": str(now())})
        self.add_event(job_id, f"Fine-tuned model deleted: {name}")

    def delete_job(self, rec: JobRecord) -> str:
        """Remove a finished job whose outputs are gone: "deleted", "has_outputs", or its status."""
        keys = [self._job_key(rec.id), self._events_key(rec.id), f"{P}job:{rec.id}:metrics_step",
                f"{P}job:{rec.id}:checkpoints", f"{P}tenant:{rec.tenant}:jobs", f"{P}stats:status"]  # fmt: skip
        return str(self._delete_job(keys=keys, args=[rec.id]))

    # ------------------------------------------------------------------ tenants

    def tenant_secret(self) -> bytes:
        """The secret tenant ids derive from: created by the first process that asks, then the same for all."""
        self.r.set(f"{P}tenant_secret", secrets.token_hex(32), nx=True)
        return bytes.fromhex(cast(str, self.r.get(f"{P}tenant_secret")))

    def tenant_has_records(self, tenant: str) -> bool:
        return bool(self.r.exists(f"{P}tenant:{tenant}:files", f"{P}tenant:{tenant}:jobs"))

    def rename_tenant(self, old: str, new: str) -> int:
        """Give every record of tenant `old` to `new` (see tenants.migrate_tenant); returns how many."""
        return int(self._rename_tenant(keys=[], args=[P, old, new]))

    def acquire_lock(self, name: str, ttl_seconds: int) -> bool:
        """Take a lock shared by every process (it expires after `ttl_seconds` if never released)."""
        token = secrets.token_hex(8)
        if self.r.set(f"{P}lock:{name}", token, nx=True, ex=ttl_seconds):
            self._lock_tokens[name] = token
            return True
        return False

    def release_lock(self, name: str) -> None:
        token = self._lock_tokens.pop(name, None)
        if token is not None:
            self._release_lock(keys=[f"{P}lock:{name}"], args=[token])

    # ------------------------------------------------------------------ metrics

    def status_counts(self) -> dict[str, int]:
        raw = cast(dict[str, str], self.r.hgetall(f"{P}stats:status"))
        return {s: int(raw.get(s, 0)) for s in STATUSES}

    def queue_length(self) -> int:
        return int(cast(int, self.r.zcard(f"{P}queue")))

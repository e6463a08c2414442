"""Every Redis key of the system of record, named once.

The store (`service.record.store`), the API's async reads (`service.record.reads`), the event
stream slots (`service.api.streams`) and the Lua scripts (`service/record/lua/`) all take
their keys from here: a script gets the keys it touches as KEYS, and, where it discovers ids
itself (a job id read from the queue, a file id from a tenant's index), a pattern from
`lua_pattern` as an ARGV, so no key is spelled in two places.

Keys (prefix `seco:`)::

    seq                           global counter: list order and queue order
    file:<id>                     hash per file
    file:<id>:jobs                set of unfinished jobs using the file (blocks delete)
    files:expiring                zset of file ids with an `expires_after` (score: expires_at)
    job:<id>                      hash per job
    job:<id>:events               stream of events; entry id = event id = SSE id
    job:<id>:metrics_step         last metrics step recorded (dedupe after a resume)
    job:<id>:checkpoints          hash step -> checkpoint JSON
    tenant:<t>:files              zset of the tenant's file ids (score: seq)
    tenant:<t>:file_bytes         bytes of the tenant's uploaded files (quota)
    tenant:<t>:output_bytes       bytes of its jobs' outputs in storage (quota; job field output_bytes)
    tenant:<t>:jobs               zset of the tenant's job ids (score: seq)
    tenant:<t>:active             set of the tenant's queued/running jobs (quota)
    tenant:<t>:streams            zset of its open event streams (service/api/streams.py)
    tenant:<t>:generations        zset of its completions being generated (service/api/streams.py)
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

PREFIX = "seco:"

SEQ = f"{PREFIX}seq"
FILES_EXPIRING = f"{PREFIX}files:expiring"
QUEUE = f"{PREFIX}queue"
RUNNING = f"{PREFIX}running"
SCHED_SERVED = f"{PREFIX}sched:served"
WORKERS = f"{PREFIX}workers"
STATS_STATUS = f"{PREFIX}stats:status"
TENANT_SECRET = f"{PREFIX}tenant_secret"

# Patterns of the keys named by an id; `{}` is the id.
FILE = f"{PREFIX}file:{{}}"
FILE_JOBS = f"{PREFIX}file:{{}}:jobs"
JOB = f"{PREFIX}job:{{}}"
JOB_EVENTS = f"{PREFIX}job:{{}}:events"
JOB_METRICS_STEP = f"{PREFIX}job:{{}}:metrics_step"
JOB_CHECKPOINTS = f"{PREFIX}job:{{}}:checkpoints"
LEASE = f"{PREFIX}lease:{{}}"
LOCK = f"{PREFIX}lock:{{}}"
TENANT_FILES = f"{PREFIX}tenant:{{}}:files"
TENANT_FILE_BYTES = f"{PREFIX}tenant:{{}}:file_bytes"
TENANT_OUTPUT_BYTES = f"{PREFIX}tenant:{{}}:output_bytes"
TENANT_JOBS = f"{PREFIX}tenant:{{}}:jobs"
TENANT_ACTIVE = f"{PREFIX}tenant:{{}}:active"
TENANT_STREAMS = f"{PREFIX}tenant:{{}}:streams"
TENANT_GENERATIONS = f"{PREFIX}tenant:{{}}:generations"

TENANT_OWNED = (TENANT_FILES, TENANT_FILE_BYTES, TENANT_JOBS, TENANT_ACTIVE, TENANT_OUTPUT_BYTES)
"""The keys a tenant owns outright: they move with it when its id changes (`rename_tenant`)."""


def lua_pattern(pattern: str) -> str:
    """The pattern for `string.format` in a Lua script (`%s` for the id; the prefix holds no `%`)."""
    return pattern.replace("{}", "%s")


def file(file_id: str) -> str:
    return FILE.format(file_id)


def file_jobs(file_id: str) -> str:
    return FILE_JOBS.format(file_id)


def job(job_id: str) -> str:
    return JOB.format(job_id)


def job_events(job_id: str) -> str:
    return JOB_EVENTS.format(job_id)


def job_metrics_step(job_id: str) -> str:
    return JOB_METRICS_STEP.format(job_id)


def job_checkpoints(job_id: str) -> str:
    return JOB_CHECKPOINTS.format(job_id)


def lease(job_id: str) -> str:
    return LEASE.format(job_id)


def lock(name: str) -> str:
    return LOCK.format(name)


def tenant_files(tenant: str) -> str:
    return TENANT_FILES.format(tenant)


def tenant_file_bytes(tenant: str) -> str:
    return TENANT_FILE_BYTES.format(tenant)


def tenant_output_bytes(tenant: str) -> str:
    return TENANT_OUTPUT_BYTES.format(tenant)


def tenant_jobs(tenant: str) -> str:
    return TENANT_JOBS.format(tenant)


def tenant_active(tenant: str) -> str:
    return TENANT_ACTIVE.format(tenant)


def tenant_streams(tenant: str) -> str:
    return TENANT_STREAMS.format(tenant)


def tenant_generations(tenant: str) -> str:
    return TENANT_GENERATIONS.format(tenant)

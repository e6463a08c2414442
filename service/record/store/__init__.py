"""Redis as the system of record: files, jobs, their state machine, events, checkpoints.

Shared by the API and the worker, so it imports only redis, pydantic and the standard
library. Split by resource, each part small and built on one `Connection`:

- `files`: file records, the tenant's byte quota, the expiry index;
- `jobs`: job records, the state machine (every change one guarded Lua script), checkpoints
  and outputs;
- `events`: a job's event stream;
- `merges`: a succeeded job's merged model (base weights with the adapter merged), built on request;
- `service.record.queue`: the queue's contract (fair order, claim, lease, requeue);
- `tenants`: tenant secret, renaming, quotas, locks, status counters.

Keys are named in `service.record.redis_keys`, the scripts are `service/record/lua/*.lua`,
the records `service.record.records`. `Store` is the one object a process shares: the parts
as attributes, and each operation under the name callers use (`store.get_job`).
"""

from __future__ import annotations

import redis

from service.record.queue import REQUEUE_MESSAGE, Queue
from service.record.records import (
    SPEC_FIELDS,
    STATUSES,
    TERMINAL,
    Checkpoint,
    Event,
    FileInUse,
    FileRecord,
    JobRecord,
    LimitExceeded,
    event_from_entry,
    job_from_hash,
    now,
    page_checkpoints,
)
from service.record.store.connection import MAX_CONNECTIONS, POOL_WAIT_SECONDS, Connection
from service.record.store.events import Events
from service.record.store.files import Files
from service.record.store.jobs import Jobs
from service.record.store.merges import Merges
from service.record.store.tenants import Tenants

__all__ = [
    "MAX_CONNECTIONS",
    "POOL_WAIT_SECONDS",
    "REQUEUE_MESSAGE",
    "SPEC_FIELDS",
    "STATUSES",
    "TERMINAL",
    "Checkpoint",
    "Event",
    "FileInUse",
    "FileRecord",
    "JobRecord",
    "LimitExceeded",
    "Store",
    "event_from_entry",
    "job_from_hash",
    "now",
    "page_checkpoints",
]


class Store:
    """Typed access to the Redis records. Cheap to build; share one per process."""

    event_from_entry = staticmethod(event_from_entry)

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        conn = Connection(client)
        self.files = files = Files(conn)
        self.events = events = Events(conn)
        self.jobs = jobs = Jobs(conn, events)
        self.queue = queue = Queue(conn, jobs)
        self.tenants = tenants = Tenants(conn)
        self.merges = Merges(conn)
        # files
        self.create_file = files.create
        self.get_file = files.get
        self.list_files = files.page
        self.delete_file = files.delete
        self.expired_files = files.expired
        self.forget_expiry = files.forget_expiry
        # jobs
        self.create_job = jobs.create
        self.get_job = jobs.get
        self.list_jobs = jobs.page
        self.transition = jobs.transition
        self.request_cancel = jobs.request_cancel
        self.request_pause = jobs.request_pause
        self.stop_requests = jobs.stop_requests
        self.pause_running = jobs.pause_running
        self.resume = jobs.resume
        self.update_running = jobs.update_running
        self.resolve_hyperparameters = jobs.resolve_hyperparameters
        self.finish_job = jobs.finish
        self.fail_unstarted = jobs.fail_unstarted
        self.add_checkpoint = jobs.add_checkpoint
        self.get_checkpoint = jobs.get_checkpoint
        self.checkpoint_steps = jobs.checkpoint_steps
        self.remove_checkpoints = jobs.remove_checkpoints
        self.set_output_bytes = jobs.set_output_bytes
        self.forget_outputs = jobs.forget_outputs
        self.forget_fine_tuned_model = jobs.forget_fine_tuned_model
        self.delete_job = jobs.delete
        # events
        self.add_event = events.add
        self.add_metrics = events.add_metrics
        # the queue
        self.queue_order = queue.order
        self.queue_position = queue.position
        self.queue_length = queue.length
        self.claim_next = queue.claim_next
        self.start_job = queue.start
        self.refresh_lease = queue.refresh_lease
        self.reap_expired = queue.reap_expired
        self.worker_heartbeat = queue.worker_heartbeat
        self.remove_worker = queue.remove_worker
        self.live_workers = queue.live_workers
        # tenants, quotas, locks, counters
        self.tenant_secret = tenants.secret
        self.tenant_has_records = tenants.has_records
        self.rename_tenant = tenants.rename
        self.tenant_output_bytes = tenants.output_bytes
        self.tenant_storage_bytes = tenants.storage_bytes
        self.acquire_lock = tenants.acquire_lock
        self.release_lock = tenants.release_lock
        self.status_counts = tenants.status_counts

    @classmethod
    def from_url(cls, url: str, *, max_connections: int = MAX_CONNECTIONS, name: str | None = None) -> Store:
        """A store on a bounded pool (`Connection.pool`: quick 503s when Redis is down)."""
        return cls(Connection.pool(url, max_connections=max_connections, name=name))

    def ping(self) -> bool:
        return bool(self.r.ping())

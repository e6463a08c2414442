"""The queue's contract, one place for both sides: the fair order, claiming a job, its lease,
and requeueing a job whose worker died.

A queued job waits in `redis_keys.QUEUE`; which one a free worker starts is not first-come
first-served but fair across tenants (`service.record.scheduling`): the worker claims the
first job of `order()`, and the claim is the guarded queued -> running transition, so two
workers racing for one job cannot both get it. While it trains, the worker renews the job's
lease; a job whose lease expired (its worker died) is requeued by any reaper (the API's or
a worker's), and resumes from its last checkpoint.

How a worker hears that a job is waiting: one Celery message per queued job (`enqueue`),
published by task name, so the API never imports the worker. The message names the job
that was queued, but the task trains whichever job `claim_next` picks (`TASK_NAME`:
"train the next job"): one message per queued job, any worker, the choice made when a
worker is free.

Delivery guarantees: `acks_late` + `reject_on_worker_lost` put a message back on the queue
if the process running it dies; the claim makes a duplicate delivery a no-op. The broker's
visibility timeout is long (7 days) so a long job is never handed to a second worker while
the first still runs it; a dead worker is detected much sooner by the job's lease.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING, Any, cast

from celery import Celery

from service.record import redis_keys as K
from service.record.records import now
from service.record.scheduling import Queued, fair_order
from service.record.settings import Settings
from service.record.stop_rule import CANCEL_FLAG, stop_action

if TYPE_CHECKING:  # types only: the store package builds a Queue, so importing it here would be circular
    from service.record.store.connection import Connection
    from service.record.store.jobs import Jobs

log = logging.getLogger(__name__)

REQUEUE_MESSAGE = "worker lost; job requeued, will resume from its last checkpoint"
CLAIM_ATTEMPTS = 100
"""Claims a worker tries before giving up; each failed one means another worker started a job."""
TASK_NAME = "seco.train_next"
"""The worker's one task: a job was queued; train the next job of the fair order."""
MERGE_TASK_NAME = "seco.merge_adapter"
"""The worker's other task: build a succeeded job's merged model (`service.record.store.merges`)."""
LEGACY_TASK_NAMES = ("seco.train_job",)
"""Names the task was published under before; a worker still runs such messages left in the broker."""
VISIBILITY_TIMEOUT = 7 * 24 * 3600
_RETRY_POLICY = {"max_retries": 3, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}


def make_celery(settings: Settings, *, include: tuple[str, ...] = ()) -> Celery:
    """The Celery app both sides configure alike: the API to publish (`include` empty), the worker
    to consume (`include`: its task module)."""
    app = Celery("seco", broker=settings.redis_url or "redis://127.0.0.1:6379/0", include=list(include))
    app.conf.update(
        # JSON only, stated rather than left to the default: a pickled message would run
        # whatever code it names in the worker. Task arguments are job ids.
        accept_content=["json"],
        task_serializer="json",
        result_accept_content=["json"],
        task_default_queue=settings.queue,
        task_ignore_result=True,  # state lives in our own records, not a result backend
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a worker holds one job, never a backlog another could run
        worker_cancel_long_running_tasks_on_connection_loss=False,  # keep training through a broker blip
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


def publish(celery: Celery, settings: Settings, queued_job_id: str) -> None:
    """Ask for a worker because `queued_job_id` was just queued (created, resumed or requeued)."""
    celery.send_task(TASK_NAME, args=[queued_job_id], queue=settings.queue, retry=True, retry_policy=_RETRY_POLICY)


def publish_merge(celery: Celery, settings: Settings, job_id: str, token: str) -> None:
    """Ask a worker to build job `job_id`'s merged model, the build `token` names (the one the
    job's record waits for: `Merges.request`)."""
    celery.send_task(
        MERGE_TASK_NAME, args=[job_id, token], queue=settings.queue, retry=True, retry_policy=_RETRY_POLICY
    )


class Enqueue:
    """`enqueue(job_id)` (and `enqueue.merge`) for a process that only publishes (the API): its
    Celery app is built at the first message, not when the process starts or imports this module."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._celery: Celery | None = None

    def _app(self) -> Celery:
        if self._celery is None:
            self._celery = make_celery(self.settings)
        return self._celery

    def __call__(self, queued_job_id: str) -> None:
        publish(self._app(), self.settings, queued_job_id)

    def merge(self, job_id: str, token: str) -> None:
        publish_merge(self._app(), self.settings, job_id, token)


def snapshot_args() -> tuple[list[str], list[str]]:
    """(KEYS, ARGV) that `queue_snapshot.lua` takes after a script's own: the queue's keys and the
    patterns of the keys it reads by id."""
    return [K.QUEUE, K.RUNNING, K.SCHED_SERVED], [K.lua_pattern(K.JOB), K.lua_pattern(K.TENANT_JOBS)]


def order_from_snapshot(snapshot: list[Any]) -> list[str]:
    """Every queued job id in start order, from what `queue_snapshot` (Lua) returned."""
    queued, running, served = snapshot
    return fair_order(
        (Queued(job_id=j, tenant=t, seq=int(float(seq))) for j, t, seq in queued),
        Counter(running),
        {served[i]: int(served[i + 1]) for i in range(0, len(served), 2)},
    )


class Queue:
    """The queue on the job records: which job starts next, its start, its lease, its requeue."""

    def __init__(self, conn: Connection, jobs: Jobs) -> None:
        self.conn = conn
        self.r = conn.r
        self.jobs = jobs

    def order(self) -> list[str]:
        """Every queued job id, in the order free workers will start them."""
        keys, args = snapshot_args()
        return order_from_snapshot(cast(list[Any], self.conn.script("queue_order")(keys=keys, args=args)))

    def position(self, job_id: str) -> int | None:
        """1 = the next job a free worker starts; None when the job is not queued.

        Its rank in the fair order (`service.record.scheduling`): how many queued jobs, of
        any tenant, start before it if no job is added, cancelled or finishes meanwhile.
        """
        order = self.order()
        return order.index(job_id) + 1 if job_id in order else None

    def length(self) -> int:
        return int(cast(int, self.r.zcard(K.QUEUE)))

    def claim_next(self, worker_id: str, lease_seconds: float) -> str | None:
        """Start the first job of the fair order for `worker_id`; its id, or None when none is queued.

        The start itself is the guarded queued -> running transition, so two workers racing
        for the same job cannot both get it: the loser takes the next one in a fresh order.
        """
        for _ in range(CLAIM_ATTEMPTS):
            order = self.order()
            if not order:
                return None
            job_id = order[0]
            if self.start(job_id, worker_id, lease_seconds):
                tenant = self.r.hget(K.job(job_id), "tenant")
                if tenant:
                    self.r.hset(K.SCHED_SERVED, str(tenant), int(cast(int, self.r.incr(K.SEQ))))
                return job_id
        log.warning("no queued job could be claimed in %d attempts (workers racing for them)", CLAIM_ATTEMPTS)
        return None

    def start(self, job_id: str, worker_id: str, lease_seconds: float) -> bool:
        """queued -> running, owned by `worker_id` with a fresh lease. False: not ours to run."""
        rec = self.jobs.get(job_id)
        if rec is None:
            return False
        if rec.attempts:
            msg = f"Fine-tuning job resumed on {worker_id} (attempt {rec.attempts + 1})"
        else:
            msg = "Fine-tuning job started"
        fields: dict[str, Any] = {"started_at": str(rec.started_at or now())}
        applied, _ = self.jobs.transition(
            job_id,
            ["queued"],
            "running",
            new_owner=worker_id,
            lease_seconds=lease_seconds,
            set_fields=fields,
            event=msg,
        )
        return applied

    def refresh_lease(self, job_id: str, worker_id: str, lease_seconds: float) -> bool:
        """Extend this worker's lease; False when the job is no longer its own (stop working)."""
        res = self.conn.script("refresh_lease")(
            keys=[K.job(job_id), K.lease(job_id)], args=[worker_id, max(1, int(lease_seconds * 1000))]
        )
        return bool(res)

    def reap_expired(self, max_attempts: int) -> list[str]:
        """Requeue running jobs whose lease expired (their worker died). Returns the ids to enqueue.

        A job whose cancel was requested is cancelled instead; a job that lost its worker
        `max_attempts` times is failed (it may be what kills the worker, e.g. host OOM).
        Safe to run from any number of processes: the transition demands an expired lease.
        """
        requeue: list[str] = []
        for job_id in cast(set[str], self.r.smembers(K.RUNNING)):
            if self.r.exists(K.lease(job_id)):
                continue
            rec = self.jobs.get(job_id)
            if rec is None or rec.status != "running":
                self.r.srem(K.RUNNING, job_id)
                continue
            transition = self.jobs.transition
            action = stop_action(rec.cancel_requested, rec.pause_requested)
            if action == "cancel":
                applied, _ = transition(
                    job_id,
                    ["running"],
                    "cancelled",
                    require_no_lease=True,
                    set_fields={"finished_at": str(now())},
                    event="Fine-tuning job cancelled (its worker was lost)",
                )
            elif action == "pause":  # resume continues from its last checkpoint, as a requeue would
                applied, _ = transition(
                    job_id,
                    ["running"],
                    "paused",
                    require_no_lease=True,
                    unless_set=CANCEL_FLAG,
                    set_fields={"pause_requested": "0", "estimated_finish": ""},
                    event="Fine-tuning job paused (its worker was lost); resume continues from its last checkpoint",
                )
            elif rec.attempts + 1 >= max_attempts:
                msg = f"worker lost {rec.attempts + 1} times; giving up"
                applied, _ = transition(
                    job_id,
                    ["running"],
                    "failed",
                    require_no_lease=True,
                    incr={"attempts": 1},
                    set_fields={
                        "finished_at": str(now()),
                        "error": {"code": "worker_lost", "message": msg, "param": None},
                    },
                    event=msg,
                    event_level="error",
                )
            else:
                applied, _ = transition(
                    job_id,
                    ["running"],
                    "queued",
                    require_no_lease=True,
                    incr={"attempts": 1},
                    event=REQUEUE_MESSAGE,
                    event_level="warn",
                )
                if applied:
                    requeue.append(job_id)
            if applied:
                log.warning("reaped job %s whose worker %s stopped renewing its lease", job_id, rec.worker)
        return requeue

    def worker_heartbeat(self, worker_id: str, ttl_seconds: int) -> None:
        self.conn.script("heartbeat")(keys=[K.WORKERS], args=[worker_id, ttl_seconds])

    def remove_worker(self, worker_id: str) -> None:
        self.r.zrem(K.WORKERS, worker_id)

    def live_workers(self, ttl_seconds: int) -> list[str]:
        return cast(list[str], self.conn.script("live_workers")(keys=[K.WORKERS], args=[ttl_seconds]))

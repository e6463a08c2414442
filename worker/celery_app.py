"""The Celery application: Redis broker, one queue, one long job at a time per worker.

Imported by the API too (to publish by task name), so it imports only celery and the
settings; the task module is loaded by workers only (`include`).

Delivery guarantees: `acks_late` + `reject_on_worker_lost` put a job back on the queue
if the process running it dies; the task's state-machine check makes a duplicate
delivery a no-op. The broker's visibility timeout is long (7 days) so a long job is
never handed to a second worker while the first still runs it; a dead worker is
detected much sooner by the job lease (service/record/store.py) and its reaper.
"""

from __future__ import annotations

from celery import Celery
from celery.signals import setup_logging

from service.record.logs import configure_logging
from service.record.settings import Settings, get_settings

VISIBILITY_TIMEOUT = 7 * 24 * 3600
TASK_NAME = "seco.train_job"
_RETRY_POLICY = {"max_retries": 3, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("seco", broker=settings.redis_url or "redis://127.0.0.1:6379/0", include=["worker.tasks"])
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


def enqueue(celery: Celery, settings: Settings, job_id: str) -> None:
    """Ask for a worker for a job that was just queued: the one way a job reaches the workers.

    Used by job creation (through the API's `make_enqueue`) and by every reaper's requeue.
    The message names the job, but a worker that takes it starts whichever queued job the
    fair order puts first (`Store.claim_next`): one message per queued job, any worker, and
    the choice made when a worker is free. Published by task name, so the API never imports
    the training code.
    """
    celery.send_task(TASK_NAME, args=[job_id], queue=settings.queue, retry=True, retry_policy=_RETRY_POLICY)


@setup_logging.connect
def _logging(**_: object) -> None:
    """Our JSON logs instead of Celery's own format."""
    configure_logging(get_settings().log_level)


app = make_celery()

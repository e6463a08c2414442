"""The worker's Celery app, the module `celery -A worker.celery_app worker` loads.

Configured by the queue's contract (`service.record.queue.make_celery`), which the API
uses too to publish; only the worker builds this app and loads the task modules (`include`):
training (`worker.tasks`) and the merged model (`worker.merge`).
"""

from __future__ import annotations

from celery.signals import setup_logging

from service.record.logs import configure_logging
from service.record.queue import make_celery
from service.record.settings import get_settings


@setup_logging.connect
def _logging(**_: object) -> None:
    """Our JSON logs instead of Celery's own format."""
    configure_logging(get_settings().log_level)


app = make_celery(get_settings(), include=("worker.tasks", "worker.merge"))

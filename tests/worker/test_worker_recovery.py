"""A worker process killed with SIGKILL mid-job: the lease expires, the reaper requeues the
job, a fresh worker process resumes it from its last checkpoint, and it finishes once with
every metrics step exactly once."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.record.store import REQUEUE_MESSAGE
from tests.record_reads import list_checkpoints


@pytest.fixture(scope="module")
def svc(launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    s = launch_service(
        redis_url, tmp_path_factory.mktemp("recovery"), workers=1, SECO_CHECKPOINT_EVERY="3", SECO_LEASE_SECONDS="4"
    )
    yield s
    s.close()


def test_sigkill_mid_job_resumes_from_checkpoint(svc: Any, tmp_path: Path, wait: Callable[..., Any]) -> None:
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps({"text": f"record {i} " + "abc def ghi " * 5}) + "\n" for i in range(30)))
    client = svc.client()
    fid = client.files.create(file=p.open("rb"), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=fid,
        hyperparameters={"n_epochs": 2, "batch_size": 1},
        extra_body={"seco": {"chunk_size": 16, "max_length": 64, "lora": {"r": 4}}},
    )
    store = svc.store()
    wait(
        lambda: len(list_checkpoints(store, job.id, after=None, limit=100)[0]) >= 2, timeout=240, what="two checkpoints"
    )
    rec = store.get_job(job.id)
    assert rec.status == "running" and rec.worker
    victim = int(rec.worker.rsplit(":", 1)[1])  # the pool process running the job
    os.kill(victim, signal.SIGKILL)

    done = wait(
        lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed") and j,
        timeout=300,
        interval=0.5,
        what="the job to finish after the kill",
    )
    assert done.status == "succeeded", (done.error, svc.logs())
    assert (done.model_extra or {})["attempts"] == 1
    events = list(reversed(list(client.fine_tuning.jobs.list_events(job.id, limit=1000))))
    messages = [e.message for e in events]
    assert REQUEUE_MESSAGE in messages
    assert any(m.startswith("resumed from checkpoint at step") for m in messages), messages
    steps = [e.data["step"] for e in events if e.type == "metrics"]  # type: ignore[index]
    total = events[[e.type for e in events].index("metrics")].data["total_steps"]  # type: ignore[index]
    assert steps == list(range(1, total + 1)), "every step exactly once, in order"
    assert messages.count("The job has successfully completed") == 1
    assert len(done.result_files) == 2 and len({f.id for f in client.files.list(purpose="fine-tune-results")}) == 2


def test_a_pickled_task_message_is_refused(svc: Any, tmp_path: Path, wait: Callable[..., Any]) -> None:
    """The worker accepts JSON messages only: a pickled one (which could name any code to run
    when it is loaded) is refused and starts nothing; a JSON one then starts the job."""
    import time

    from service.record.queue import TASK_NAME, make_celery, publish
    from service.record.settings import Settings
    from tests.service.record.test_store import make_job

    p = tmp_path / "train.jsonl"
    p.write_text(json.dumps({"text": "abc def ghi " * 5}) + "\n")
    file_id = svc.client().files.create(file=p.open("rb"), purpose="fine-tune").id
    store = svc.store()
    job_id = make_job(store, file_id, svc.tenant("a"))  # queued, but no message asks for a worker yet
    settings = Settings(redis_url=svc.redis_url)
    celery = make_celery(settings)
    celery.send_task(TASK_NAME, args=[job_id], queue=settings.queue, serializer="pickle")
    log = svc.log_dir / "worker-0.log"
    wait(
        lambda: "untrusted content of type pickle" in log.read_text(errors="replace"),
        timeout=30,
        what="the worker to refuse the pickled message",
    )
    time.sleep(1)
    assert store.get_job(job_id).status == "queued", "the refused message started nothing"  # type: ignore[union-attr]
    publish(celery, settings, job_id)
    done = wait(lambda: (r := store.get_job(job_id)).status in ("succeeded", "failed") and r, timeout=120)
    assert done.status == "succeeded", svc.logs()

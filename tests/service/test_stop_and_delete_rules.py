"""What pause, cancel and deletion do to each other, through the real API (uvicorn), a real
Celery worker training the demo model and the official `openai` SDK:

- a cancel sent while a pause is pending wins: the job ends cancelled, not paused;
- a paused job that continues a fine-tuned model resumes from its own checkpoint, and that
  model cannot be deleted while unfinished jobs build on it (a 409 naming them);
- a model's adapter result file cannot be deleted through the files API (a 400 pointing to
  `DELETE /v1/models/{name}`), so no model is left listed without its adapter.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import flush_db

SECO = {"chunk_size": 16, "max_length": 48, "lora": {"r": 4}}


@pytest.fixture(scope="module")
def svc(launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    flush_db(redis_url)
    s = launch_service(redis_url, tmp_path_factory.mktemp("stop-rules"), workers=1, SECO_CHECKPOINT_EVERY="1000")
    yield s
    s.close()


def upload(svc: Any, tmp: Path, n: int) -> str:
    p = tmp / f"train-{n}.jsonl"
    p.write_text("".join(json.dumps({"text": f"record {i} " + "abc def ghi " * 4}) + "\n" for i in range(n)))
    with p.open("rb") as fh:
        return str(svc.client().files.create(file=fh, purpose="fine-tune").id)


def create(svc: Any, fid: str, n_epochs: int = 2, model: str = "tiny") -> Any:
    return svc.client().fine_tuning.jobs.create(
        model=model,
        training_file=fid,
        seed=3,
        hyperparameters={"n_epochs": n_epochs, "batch_size": 1},
        extra_body={"seco": SECO} if model == "tiny" else None,
    )


def step(svc: Any, job_id: str) -> int:
    return int((svc.client().fine_tuning.jobs.retrieve(job_id).model_extra or {}).get("step") or 0)


def finished(svc: Any, job_id: str, wait: Callable[..., Any], timeout: float = 300) -> Any:
    jobs = svc.client().fine_tuning.jobs
    return wait(
        lambda: (j := jobs.retrieve(job_id)).status in ("succeeded", "failed", "cancelled", "paused") and j,
        timeout=timeout,
        interval=0.2,
        what=f"job {job_id} to stop",
    )


def test_a_cancel_sent_while_a_pause_is_pending_wins(svc: Any, tmp_path: Path, wait: Callable[..., Any]) -> None:
    client = svc.client()
    job = create(svc, upload(svc, tmp_path, 40))
    wait(lambda: step(svc, job.id) >= 2, timeout=240, interval=0.1, what="the job to run two steps")
    asked = client.fine_tuning.jobs.pause(job.id)
    assert asked.status == "running" and (asked.model_extra or {})["pause_requested"] is True
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert (cancelled.model_extra or {})["cancel_requested"] is True or cancelled.status == "cancelled"
    done = finished(svc, job.id, wait)
    assert done.status == "cancelled", (done.status, svc.logs())
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.resume(job.id)
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000)]
    assert any(m.startswith("Fine-tuning job cancelled") for m in messages), messages
    assert not any(m.startswith("Fine-tuning job paused") for m in messages), messages


def succeeded_model(svc: Any, tmp_path: Path, wait: Callable[..., Any]) -> Any:
    """A small job trained to the end: its fine-tuned model exists."""
    job = create(svc, upload(svc, tmp_path, 3), n_epochs=1)
    done = finished(svc, job.id, wait)
    assert done.status == "succeeded" and done.fine_tuned_model, (done.error, svc.logs())
    return done


def test_a_paused_job_on_a_model_resumes_from_its_own_checkpoint_and_holds_the_model(
    svc: Any, tmp_path: Path, wait: Callable[..., Any]
) -> None:
    client = svc.client()
    parent = succeeded_model(svc, tmp_path, wait)
    model = parent.fine_tuned_model
    child = create(svc, upload(svc, tmp_path, 30), model=model)
    wait(lambda: step(svc, child.id) >= 2, timeout=240, interval=0.1, what="the child job to run two steps")
    client.fine_tuning.jobs.pause(child.id)
    assert finished(svc, child.id, wait).status == "paused", svc.logs()

    with pytest.raises(openai.ConflictError) as e:  # the paused job builds on the model: kept, the users named
        client.models.delete(model)
    assert e.value.code == "model_in_use" and child.id in e.value.message, e.value.message
    with svc.http() as http:  # deleting the parent job would take the model too (the SDK has no jobs.delete)
        r = http.delete(f"/v1/fine_tuning/jobs/{parent.id}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_in_use", r.text
    assert child.id in r.json()["error"]["message"], r.text
    assert client.models.retrieve(model).id == model

    # the start adapter lost from storage (an operator's cleanup, a bucket policy): the resume
    # needs only the child's own checkpoint
    adapter = svc.store().get_file((parent.model_extra or {})["adapter_file"])
    svc.storage().delete(adapter.path)
    client.fine_tuning.jobs.resume(child.id)
    done = finished(svc, child.id, wait)
    assert done.status == "succeeded", (done.error, svc.logs())
    messages = [ev.message for ev in client.fine_tuning.jobs.list_events(child.id, limit=1000)]
    assert any(m.startswith("resumed from checkpoint at step ") for m in messages), messages

    assert client.models.delete(model).deleted, "no unfinished job builds on it any more"


def test_a_models_adapter_file_is_deleted_with_the_model_only(
    svc: Any, tmp_path: Path, wait: Callable[..., Any]
) -> None:
    client = svc.client()
    done = succeeded_model(svc, tmp_path, wait)
    adapter_file = (done.model_extra or {})["adapter_file"]
    with pytest.raises(openai.BadRequestError) as e:
        client.files.delete(adapter_file)
    assert e.value.code == "file_in_use" and f"DELETE /v1/models/{done.fine_tuned_model}" in e.value.message
    assert client.files.retrieve(adapter_file).id == adapter_file
    assert done.fine_tuned_model in [m.id for m in client.models.list()]
    child = create(svc, upload(svc, tmp_path, 2), n_epochs=1, model=done.fine_tuned_model)
    assert finished(svc, child.id, wait).status == "succeeded", "the model still works as a starting point"

    assert client.models.delete(done.fine_tuned_model).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(adapter_file)
    assert done.fine_tuned_model not in [m.id for m in client.models.list()]

"""A job's outputs on the real service, on both storage back-ends: pruned to the newest
checkpoints, counted against the tenant's storage quota, and deleted with the job.

Before, every checkpoint of every job stayed forever, outputs did not count against the
quota, and there was no way to delete them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from service.record.storage import keys
from tests.conftest import flush_db, wait_for
from tests.reliability.helpers import create_job, docs, finished, upload

KEEP = 2
QUOTA = 4 << 20


@pytest.fixture(scope="module")
def svc(
    launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory, storage_backend: str
) -> Iterator[Any]:
    flush_db(redis_url)
    s = launch_service(
        redis_url,
        tmp_path_factory.mktemp(f"outputs-{storage_backend}"),
        storage=storage_backend,
        workers=1,
        SECO_CHECKPOINT_EVERY="1",
        SECO_KEEP_CHECKPOINTS=str(KEEP),
        SECO_MAX_FILE_BYTES=str(QUOTA),
        SECO_MAX_UPLOAD_BYTES=str(QUOTA),
    )
    yield s
    s.close()


def _jsonl_of_size(path: Path, size: int) -> Path:
    """One JSONL record of exactly `size` bytes."""
    pad = size - len(json.dumps({"text": ""})) - 1
    path.write_text(json.dumps({"text": "x" * pad}) + "\n")
    assert path.stat().st_size == size
    return path


def test_outputs_are_pruned_counted_and_deleted_with_the_job(svc: Any, tmp_path: Path) -> None:
    client, tenant, storage, store = svc.client(), svc.tenant("a"), svc.storage(), svc.store()
    train_file = upload(svc, tmp_path, docs(5))
    train_bytes = client.files.retrieve(train_file).bytes
    job_id = create_job(svc, train_file)  # a checkpoint after each step
    done = wait_for(lambda: finished(svc, job_id), 180, interval=0.5, what="the job")
    assert done.status == "succeeded", (done.error, svc.logs())

    # pruned: the newest KEEP checkpoints (the last is the final state), in storage and in the API
    prefix = keys.job_prefix(tenant, job_id)
    stored = {k.removeprefix(prefix + "/") for k in svc.objects(prefix)}
    last = done.model_extra["step"]
    assert last > KEEP + 1
    assert {k.split("/")[1] for k in stored if k.startswith("checkpoints/")} == {
        keys.checkpoint_name(last - 1),
        keys.checkpoint_name(last),
    }
    assert {"adapter.tar.gz", "metrics.csv"} <= stored
    assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job_id).data] == [last, last - 1]

    # counted: the outputs, as measured in storage, next to the upload
    outputs = storage.size_under(prefix)
    assert outputs > 0 and store.tenant_output_bytes(tenant) == outputs
    assert store.tenant_storage_bytes(tenant) == train_bytes + outputs
    # an upload that fits beside the files alone but not beside the outputs too is refused
    filler = _jsonl_of_size(tmp_path / "filler.jsonl", QUOTA - train_bytes - outputs + 1)
    with pytest.raises(openai.RateLimitError) as e:
        client.files.create(file=filler.open("rb"), purpose="fine-tune")
    assert "job outputs" in e.value.message
    filler = _jsonl_of_size(tmp_path / "filler.jsonl", QUOTA - train_bytes - outputs)  # exactly full
    filler_id = client.files.create(file=filler.open("rb"), purpose="fine-tune").id
    with pytest.raises(openai.RateLimitError) as e:  # full: no new job, whose outputs would not fit
        create_job(svc, train_file)
    assert e.value.code == "quota_exceeded" and "finished jobs" in e.value.message

    # deleted: a running or queued job cannot be; another tenant's is a 404; a finished one goes whole
    with svc.http("b") as http:
        assert http.delete(f"/v1/fine_tuning/jobs/{job_id}").status_code == 404
    with svc.http() as http:
        r = http.delete(f"/v1/fine_tuning/jobs/{job_id}")
        assert r.status_code == 200 and r.json() == {"id": job_id, "object": "fine_tuning.job", "deleted": True}
        assert http.delete(f"/v1/fine_tuning/jobs/{job_id}").status_code == 404
    assert svc.objects(prefix) == {}, "every output object is gone"
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve(job_id)
    for result_file in done.result_files:
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(result_file)
    assert job_id not in [j.id for j in client.fine_tuning.jobs.list()]
    assert store.tenant_output_bytes(tenant) == 0
    assert store.tenant_storage_bytes(tenant) == train_bytes + filler.stat().st_size
    # room again: a new job may be created (and is cancelled here)
    again = create_job(svc, train_file)
    client.fine_tuning.jobs.cancel(again)
    client.files.delete(filler_id)


def test_a_job_that_has_not_finished_cannot_be_deleted(svc: Any, tmp_path: Path) -> None:
    client = svc.client()
    job_id = create_job(svc, upload(svc, tmp_path, docs(30)))
    wait_for(
        lambda: client.fine_tuning.jobs.checkpoints.list(job_id).data,
        120,
        interval=0.2,
        what="the job's first checkpoint",
    )
    with svc.http() as http:
        r = http.delete(f"/v1/fine_tuning/jobs/{job_id}")
    assert r.status_code == 400 and r.headers["x-should-retry"] == "false", r.text
    assert r.json()["error"]["code"] == "invalid_state" and "cancel it first" in r.json()["error"]["message"]
    client.fine_tuning.jobs.cancel(job_id)
    done = wait_for(lambda: finished(svc, job_id), 120, interval=0.5, what="the job to stop")
    assert done.status == "cancelled"
    prefix = keys.job_prefix(svc.tenant("a"), job_id)
    assert svc.store().tenant_output_bytes(svc.tenant("a")) == svc.storage().size_under(prefix) > 0
    with svc.http() as http:  # a cancelled job's checkpoints go with it
        assert http.delete(f"/v1/fine_tuning/jobs/{job_id}").status_code == 200
    assert svc.objects(prefix) == {} and svc.store().tenant_output_bytes(svc.tenant("a")) == 0

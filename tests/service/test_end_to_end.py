"""The whole path: openai SDK -> real API -> Redis -> real Celery worker -> real trainer
(the tiny demo Llama on CPU) -> events, checkpoints, adapter download; on both storage
back-ends (local directory, S3)."""

from __future__ import annotations

import csv
import io
import json
import tarfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from service.record.storage import keys
from tests.conftest import flush_db

SMALL = {"n_epochs": 1, "batch_size": 2}
SECO = {"chunk_size": 16, "max_length": 64, "lora": {"r": 4, "alpha": 8}}


@pytest.fixture(scope="module")
def svc(
    launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory, storage_backend: str
) -> Iterator[Any]:
    flush_db(redis_url)
    s = launch_service(
        redis_url,
        tmp_path_factory.mktemp(f"e2e-{storage_backend}"),
        workers=1,
        storage=storage_backend,
        SECO_CHECKPOINT_EVERY="2",
    )
    yield s
    s.close()


@pytest.fixture(scope="module")
def files(svc: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("e2e-data")
    train = d / "train.jsonl"
    train.write_text(
        "".join(json.dumps({"text": f"document {i}: " + "the quick brown fox jumps. " * 3}) + "\n" for i in range(8))
    )
    valid = d / "valid.jsonl"
    valid.write_text(json.dumps({"text": "the quick brown fox jumps over the lazy dog."}) + "\n")
    long = d / "long.jsonl"
    long.write_text("".join(json.dumps({"text": "lorem ipsum dolor sit amet " * 8}) + "\n" for _ in range(40)))
    c = svc.client()
    return {
        name: c.files.create(file=p.open("rb"), purpose="fine-tune").id
        for name, p in (("train", train), ("valid", valid), ("long", long))
    }


def test_cancel_a_running_job(svc: Any, files: dict[str, str], wait: Callable[..., Any]) -> None:
    client = svc.client()
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=files["long"],
        hyperparameters={"n_epochs": 50, "batch_size": 1},
        extra_body={"seco": SECO},
    )

    def has_metrics() -> bool:
        return any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id, limit=50).data)

    wait(has_metrics, timeout=240, interval=0.5, what="the first metrics event")
    resp = client.fine_tuning.jobs.cancel(job.id)
    assert resp.status == "running" and (resp.model_extra or {})["cancel_requested"] is True
    done = wait(
        lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status != "running" and j,
        timeout=60,
        what="the cancel to take effect",
    )
    assert done.status == "cancelled" and done.fine_tuned_model is None and done.result_files == []
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert messages[0] == "Fine-tuning job cancelled"
    assert "Cancellation requested; the job stops after its current step" in messages


def test_a_job_runs_to_an_adapter(svc: Any, files: dict[str, str], wait: Callable[..., Any]) -> None:
    """Runs after the cancel test: the same worker survived it and takes this job."""
    client = svc.client()
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=files["train"],
        validation_file=files["valid"],
        suffix="e2e",
        hyperparameters=SMALL,
        extra_body={"seco": SECO},
    )
    assert job.hyperparameters.learning_rate_multiplier == "auto"  # as asked, until the worker resolves it
    # follow it live over SSE to the end
    streamed: list[dict[str, Any]] = []
    end: dict[str, Any] = {}

    def follow() -> None:
        with svc.http() as http, http.stream("GET", f"/v1/fine_tuning/jobs/{job.id}/events/stream", timeout=300) as r:
            event = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    (end.update if event == "end" else streamed.append)(json.loads(line[6:]))

    t = threading.Thread(target=follow)
    t.start()
    t.join(300)
    assert not t.is_alive() and end == {"status": "succeeded"}, svc.logs()

    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded"
    assert done.fine_tuned_model == f"ft:tiny:{done.organization_id}:e2e:{job.id.removeprefix('ftjob-')}"
    assert done.trained_tokens and done.trained_tokens > 0 and done.finished_at and len(done.result_files) == 2
    extra = done.model_extra or {}
    assert extra["progress"] == 1.0 and extra["peak_memory_bytes"] > 0
    # the values it trained with, "auto" resolved, on the job and in its method
    hp = done.hyperparameters
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (1, 2, 1.0)
    assert done.method and done.method.supervised and done.method.supervised.hyperparameters
    assert done.method.supervised.hyperparameters.learning_rate_multiplier == 1.0

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    assert [e.id for e in reversed(events)] == [e["id"] for e in streamed], "SSE and the paged list agree"
    metrics = [e.data for e in reversed(events) if e.type == "metrics"]
    # step 0: the starting model's validation (the job has a validation file), then every step
    assert metrics and [m["step"] for m in metrics] == list(range(len(metrics)))  # type: ignore[index]
    assert "valid_loss" in metrics[0] and "train_loss" not in metrics[0]  # type: ignore[operator]
    for key in ("step", "train_loss", "learning_rate", "tokens_per_second", "peak_memory_bytes", "total_steps"):
        assert key in metrics[-1], key  # type: ignore[operator]
    assert "valid_loss" in metrics[-1]  # type: ignore[operator]
    assert all(0 <= m["train_mean_token_accuracy"] <= 1 for m in metrics[1:])
    last = metrics[-1]
    assert last["full_valid_loss"] == last["valid_loss"]
    assert 0 <= last["full_valid_mean_token_accuracy"] == last["valid_mean_token_accuracy"] <= 1
    assert events[0].message == "The job has successfully completed"

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and checkpoints[0].step_number == metrics[-1]["step"]  # type: ignore[index]
    assert checkpoints[0].fine_tuning_job_id == job.id and "train_loss" in checkpoints[0].metrics.model_dump()
    final = checkpoints[0].metrics
    assert final.full_valid_loss == last["full_valid_loss"] and final.valid_mean_token_accuracy is not None
    assert final.full_valid_mean_token_accuracy == last["full_valid_mean_token_accuracy"]
    assert final.train_mean_token_accuracy == last["train_mean_token_accuracy"]

    # result_files[0] is the metrics CSV with OpenAI's columns first; the adapter is result_files[1],
    # named by adapter_file; it and /adapter serve the same archive, PEFT files at its root
    adapter_id = extra["adapter_file"]
    assert done.result_files[1] == adapter_id
    adapter = client.files.content(adapter_id).read()
    with svc.http() as http:
        r = http.get(f"/v1/fine_tuning/jobs/{job.id}/adapter")
        assert r.status_code == 200 and r.content == adapter
    with tarfile.open(fileobj=io.BytesIO(adapter), mode="r:gz") as tar:
        names = set(tar.getnames())
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    assert client.files.retrieve(adapter_id).purpose == "fine-tune-results"
    csv_text = client.files.content(done.result_files[0]).read().decode()
    assert csv_text.startswith("step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy,")
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    assert [int(r["step"]) for r in rows] == [m["step"] for m in metrics]
    assert float(rows[-1]["train_accuracy"]) == pytest.approx(last["train_mean_token_accuracy"])
    assert float(rows[-1]["valid_mean_token_accuracy"]) == pytest.approx(last["valid_mean_token_accuracy"])
    assert any(r["valid_loss"] == "" for r in rows), "steps without validation leave the cell empty"

    # in storage: the result files and every checkpoint (complete) under the job's prefix,
    # and nothing left in the worker's scratch space once the job has ended
    prefix = keys.job_prefix(svc.tenant("a"), job.id)
    stored = svc.objects(prefix)
    assert stored[f"{prefix}/adapter.tar.gz"] == len(adapter) and stored[f"{prefix}/metrics.csv"] == len(csv_text)
    complete = svc.storage().complete_dirs(f"{prefix}/checkpoints", "checkpoint.json")
    assert complete == sorted(f"step-{c.step_number:06d}" for c in checkpoints)
    wait(lambda: not list(svc.data_dir.glob(f"scratch/*/jobs/{job.id}.*")), timeout=10, what="scratch cleaned")

    assert done.fine_tuned_model in [m.id for m in client.models.list()]
    assert done.fine_tuned_model not in [m.id for m in svc.client("b").models.list()]
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.cancel(job.id)
    assert "already succeeded" in e.value.message and e.value.response.headers["x-should-retry"] == "false"
    with pytest.raises(openai.NotFoundError):
        svc.client("b").files.content(done.result_files[0])
    with svc.http("b") as http:
        assert http.get(f"/v1/fine_tuning/jobs/{job.id}/adapter").status_code == 404
        assert http.get("/readyz").json()["workers"] == 1

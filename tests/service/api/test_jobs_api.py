"""/v1/fine_tuning/jobs with no worker running: creation, validation, listing, events,
SSE, cancel of a queued job, tenant isolation, limits, health and errors."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import sse_events

MAX_JOBS = 6


@pytest.fixture(scope="module")
def svc(launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    s = launch_service(redis_url, tmp_path_factory.mktemp("jobs-api"), SECO_MAX_QUEUED_JOBS=str(MAX_JOBS))
    yield s
    s.close()


@pytest.fixture(scope="module")
def train_file(svc: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    p = tmp_path_factory.mktemp("jobs-data") / "train.jsonl"
    p.write_text('{"text": "hello world"}\n')
    return str(svc.client().files.create(file=p.open("rb"), purpose="fine-tune").id)


@pytest.fixture
def cancel_all(svc: Any) -> Iterator[None]:
    """Leave no queued job behind (they count against the tenant's limit)."""
    yield
    for tenant in ("a", "b"):
        c = svc.client(tenant)
        for job in c.fine_tuning.jobs.list(limit=100):
            if job.status == "queued":
                c.fine_tuning.jobs.cancel(job.id)


def test_create_and_retrieve(svc: Any, train_file: str, cancel_all: None) -> None:
    client = svc.client()
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=train_file,
        suffix="my-run_1",
        seed=42,
        metadata={"project": "x"},
        hyperparameters={"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 0.5},
        extra_body={
            "seco": {
                "mode": "spaco",
                "budget": 2,
                "chunk_size": 64,
                "sampling": "fixed",
                "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            }
        },
    )
    assert job.id.startswith("ftjob-") and job.object == "fine_tuning.job"
    assert job.status == "queued" and job.model == "tiny" and job.training_file == train_file
    assert job.seed == 42 and job.metadata == {"project": "x"} and job.fine_tuned_model is None
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == "auto"
    assert job.hyperparameters.learning_rate_multiplier == 0.5 and job.result_files == []
    extra = job.model_extra or {}
    assert extra["queue_position"] >= 1 and extra["cancel_requested"] is False
    assert extra["seco"]["mode"] == "spaco" and extra["seco"]["budget"] == 2 and extra["seco"]["lora"]["r"] == 4
    assert (
        extra["seco"]["lora"]["target_modules"] == ["q_proj", "v_proj"] and extra["user_provided_suffix"] == "my-run_1"
    )
    assert client.fine_tuning.jobs.retrieve(job.id).model_dump() == job.model_dump()
    # defaults: a seed is chosen and echoed, hyperparameters "auto", plain SeCO
    job2 = client.fine_tuning.jobs.create(model="tiny", training_file=train_file)
    assert isinstance(job2.seed, int) and job2.hyperparameters.n_epochs == "auto"
    assert (job2.model_extra or {})["seco"]["mode"] == "seco"
    assert (job2.model_extra or {})["queue_position"] == extra["queue_position"] + 1
    # OpenAI's newer `method` form carries the hyperparameters too
    job3 = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=train_file,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}},
    )
    assert job3.hyperparameters.n_epochs == 3


@pytest.mark.parametrize(
    ("kwargs", "param", "fragment"),
    [
        ({"model": "gpt-4o"}, "model", "choose one of: tiny"),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs", "greater than or equal to 1"),
        ({"hyperparameters": {"n_epochs": 101}}, "hyperparameters.n_epochs", "less than or equal to 100"),
        ({"hyperparameters": {"batch_size": 4096}}, "hyperparameters.batch_size", "less than or equal to 1024"),
        (
            {"hyperparameters": {"learning_rate_multiplier": -1}},
            "hyperparameters.learning_rate_multiplier",
            "greater than 0",
        ),
        ({"hyperparameters": {"n_epochs": "many"}}, "hyperparameters.n_epochs", ""),
        ({"suffix": "../etc"}, "suffix", "letters, digits"),
        ({"training_file": "file-000000000000000000000000"}, "training_file", "no such file"),
        ({"training_file": "../../etc/passwd"}, "training_file", "no such file"),
        ({"extra_body": {"seco": {"mode": "spaco"}}}, "seco", "budget is required"),
        ({"extra_body": {"seco": {"chunk_size": 8}}}, "seco.chunk_size", "greater than or equal to 16"),
        ({"extra_body": {"seco": {"lora": {"r": 0}}}}, "seco.lora.r", "greater than or equal to 1"),
        ({"extra_body": {"seco": {"lora": {"dropout": 1.0}}}}, "seco.lora.dropout", "less than 1"),
        ({"extra_body": {"seco": {"sampling": "magic"}}}, "seco.sampling", "bernoulli"),
        ({"extra_body": {"seco": {"foo": 1, "bar": 2}}}, "seco.foo", "Unknown field(s) 'foo', 'bar' in 'seco'"),
        ({"extra_body": {"frobnicate": True}}, "frobnicate", "Unknown field(s) 'frobnicate'"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "at most 16"),
        ({"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}, "integrations", "not supported"),
    ],
)
def test_invalid_job_requests_name_the_field(
    svc: Any, train_file: str, kwargs: dict[str, Any], param: str, fragment: str
) -> None:
    args = {"model": "tiny", "training_file": train_file, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        svc.client().fine_tuning.jobs.create(**args)
    assert e.value.param == param, e.value.message
    assert fragment in e.value.message
    assert e.value.response.headers.get("x-should-retry") == "false"


def test_list_pagination_and_metadata_filter(svc: Any, train_file: str, cancel_all: None) -> None:
    client = svc.client()
    made = [
        client.fine_tuning.jobs.create(model="tiny", training_file=train_file, metadata={"batch": str(i % 2)}).id
        for i in range(5)
    ]
    page = client.fine_tuning.jobs.list(limit=2)
    assert page.has_more and [j.id for j in page.data] == made[::-1][:2]
    everything = [j.id for j in client.fine_tuning.jobs.list(limit=2)]  # SDK follows `after`
    assert everything[:5] == made[::-1]
    assert len(everything) == len(set(everything))
    odd = [j.id for j in client.fine_tuning.jobs.list(metadata={"batch": "1"})]
    assert odd == [made[3], made[1]]
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.list(after="ftjob-000000000000000000000000")


def test_job_limit_is_429(svc: Any, train_file: str, cancel_all: None) -> None:
    client = svc.client("b")
    pb = Path(svc.data_dir).parent / "b.jsonl"
    pb.write_text('{"text": "b"}\n')
    fb = client.files.create(file=pb.open("rb"), purpose="fine-tune").id
    jobs = [client.fine_tuning.jobs.create(model="tiny", training_file=fb).id for _ in range(MAX_JOBS)]
    with pytest.raises(openai.RateLimitError) as e:
        client.fine_tuning.jobs.create(model="tiny", training_file=fb)
    assert f"{MAX_JOBS} queued or running" in e.value.message
    client.fine_tuning.jobs.cancel(jobs[0])
    client.fine_tuning.jobs.create(model="tiny", training_file=fb)  # a slot is free again
    with pytest.raises(openai.BadRequestError) as e2:
        client.files.delete(fb)
    assert e2.value.code == "file_in_use"


def test_events_and_cancel_of_a_queued_job(svc: Any, train_file: str) -> None:
    client = svc.client()
    job = client.fine_tuning.jobs.create(model="tiny", training_file=train_file)
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled", "cancel is idempotent"
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    messages = [e.message for e in events]
    assert messages == [
        "Fine-tuning job cancelled",
        "Files validated, moving job to queued state",
        f"Validating training file: {train_file}",
        f"Created fine-tuning job: {job.id}",
    ]
    assert all(e.object == "fine_tuning.job.event" and e.type == "message" and e.level == "info" for e in events)
    page = client.fine_tuning.jobs.list_events(job.id, limit=1)
    assert page.has_more and page.data[0].id == events[0].id
    rest = client.fine_tuning.jobs.list_events(job.id, limit=10, after=page.data[0].id)
    assert [e.id for e in rest.data] == [e.id for e in events[1:]] and not rest.has_more
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data == []
    with svc.http() as http:
        r = http.get(f"/v1/fine_tuning/jobs/{job.id}/adapter")
        assert r.status_code == 400 and r.headers["x-should-retry"] == "false"
        assert "is cancelled" in r.json()["error"]["message"]


def test_sse_replays_and_resumes_with_last_event_id(svc: Any, train_file: str) -> None:
    client = svc.client()
    job = client.fine_tuning.jobs.create(model="tiny", training_file=train_file)
    client.fine_tuning.jobs.cancel(job.id)
    path = f"/v1/fine_tuning/jobs/{job.id}/events/stream"
    with svc.http() as http, http.stream("GET", path) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        evs = [e for e in sse_events(r) if "data" in e]
    assert evs[-1]["event"] == "end" and json.loads(evs[-1]["data"]) == {"status": "cancelled"}
    data = [json.loads(e["data"]) for e in evs[:-1]]
    assert data[0]["message"] == f"Created fine-tuning job: {job.id}"
    assert data[-1]["message"] == "Fine-tuning job cancelled"
    assert all(d["id"] == f"ftevent-{e['id']}" for d, e in zip(data, evs, strict=False))
    # resume after the second event: exactly the remaining ones, once
    with svc.http() as http, http.stream("GET", path, headers={"Last-Event-ID": evs[1]["id"]}) as r:
        resumed = [e for e in sse_events(r) if "data" in e]
    assert [e["id"] for e in resumed[:-1]] == [e["id"] for e in evs[2:-1]]
    # ?after= with an ftevent id works the same
    with svc.http() as http, http.stream("GET", path, params={"after": data[1]["id"]}) as r:
        assert [e.get("id") for e in sse_events(r) if "data" in e][:-1] == [e["id"] for e in evs[2:-1]]


U64 = 2**64 - 1


def test_event_ids_beyond_what_redis_accepts_are_400_not_500(svc: Any, train_file: str) -> None:
    """Each half of a stream id is an unsigned 64-bit integer: twenty digits can pass a pattern
    check and still be refused by Redis, which must not surface as a 500."""
    client = svc.client()
    job = client.fine_tuning.jobs.create(model="tiny", training_file=train_file)
    client.fine_tuning.jobs.cancel(job.id)
    events = f"/v1/fine_tuning/jobs/{job.id}/events"
    too_big = [
        f"ftevent-{U64 + 1}-0",
        f"ftevent-0-{U64 + 1}",
        "ftevent-99999999999999999999-99999999999999999999",
        f"{U64 + 1}-1",
    ]
    with svc.http() as http:
        for bad in too_big:
            r = http.get(events, params={"after": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "after", (bad, r.text)
            r = http.get(events + "/stream", params={"after": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "after", (bad, r.text)
            r = http.get(events + "/stream", headers={"Last-Event-ID": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "Last-Event-ID", (bad, r.text)
        # the edges Redis does accept: nothing is older than 0-0, nothing newer than max-max
        r = http.get(events, params={"after": "ftevent-0-0"})
        assert r.status_code == 200 and r.json()["data"] == [] and r.json()["has_more"] is False, r.text
        r = http.get(events, params={"after": f"ftevent-{U64}-{U64}"})
        assert r.status_code == 200 and len(r.json()["data"]) == 4, r.text
        with http.stream("GET", events + "/stream", params={"after": f"ftevent-{U64}-{U64}"}) as r:
            assert [e["event"] for e in sse_events(r) if "data" in e] == ["end"]
    assert "Traceback" not in (svc.log_dir / "api.log").read_text()


def test_sse_follows_a_live_job(svc: Any, train_file: str) -> None:
    """A stream opened on a queued job receives the cancel as it happens, then ends."""
    client = svc.client()
    job = client.fine_tuning.jobs.create(model="tiny", training_file=train_file)
    got: list[dict[str, str]] = []
    opened = threading.Event()

    def follow() -> None:
        with svc.http() as http, http.stream("GET", f"/v1/fine_tuning/jobs/{job.id}/events/stream") as r:
            for ev in sse_events(r):
                got.append(ev)
                if len(got) >= 3:
                    opened.set()

    t = threading.Thread(target=follow)
    t.start()
    assert opened.wait(20)
    client.fine_tuning.jobs.cancel(job.id)
    t.join(30)
    assert not t.is_alive(), "the stream ends once the job is finished"
    assert json.loads(got[-2]["data"])["message"] == "Fine-tuning job cancelled" and got[-1]["event"] == "end"


def test_tenant_isolation_on_every_verb(svc: Any, train_file: str) -> None:
    job = svc.client("a").fine_tuning.jobs.create(model="tiny", training_file=train_file)
    b = svc.client("b")
    jobs = b.fine_tuning.jobs
    for call in (jobs.retrieve, jobs.cancel, jobs.list_events, jobs.checkpoints.list):
        with pytest.raises(openai.NotFoundError):
            call(job.id)
    assert job.id not in [j.id for j in b.fine_tuning.jobs.list()]
    with pytest.raises(openai.BadRequestError) as e:  # a's file is "no such file" for b
        b.fine_tuning.jobs.create(model="tiny", training_file=train_file)
    assert e.value.param == "training_file"
    with svc.http("b") as http:
        for suffix in ("/events/stream", "/adapter"):
            assert http.get(f"/v1/fine_tuning/jobs/{job.id}{suffix}").status_code == 404
        assert http.get("/v1/fine_tuning/jobs/..%2F..%2Fapi_key").status_code == 404
    assert svc.client("a").fine_tuning.jobs.cancel(job.id).status == "cancelled", "b could not cancel it"


def test_models_health_metrics_openapi(svc: Any) -> None:
    models = svc.client().models.list()
    assert [(m.id, m.owned_by) for m in models.data] == [("tiny", "system")]
    with pytest.raises(openai.NotFoundError):
        svc.client().models.retrieve("nope")
    with svc.http(tenant=None) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        r = http.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "no_workers"
        text = http.get("/metrics").text
        assert 'seco_jobs{status="cancelled"}' in text and "seco_http_requests_total" in text
        spec = http.get("/openapi.json").json()
        assert "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events/stream" in spec["paths"]
        assert "multipart/form-data" in spec["paths"]["/v1/files"]["post"]["requestBody"]["content"]
        r = http.get("/v1/nothing-here", headers={"Authorization": f"Bearer {svc.key('a')}"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        # FastAPI's reference pages load their scripts from a CDN: off unless SECO_API_DOCS is set
        for page in ("/docs", "/redoc", "/docs/swagger-ui/swagger-ui-bundle.js"):
            assert http.get(page).status_code == 404, page


def test_redis_down_is_503(launch_service: Callable[..., Any], tmp_path: Path) -> None:
    """An API whose Redis is unreachable answers 503 with an OpenAI error body, quickly."""
    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = launch_service(f"redis://127.0.0.1:{port}/0", tmp_path)
    try:
        with s.http() as http:
            for path in ("/v1/files", "/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/ftjob-000000000000000000000000"):
                r = http.get(path)
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "store_unavailable"
            assert http.get("/healthz").status_code == 200
            assert http.get("/readyz").status_code == 503
    finally:
        s.close()

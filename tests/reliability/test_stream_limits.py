"""What one key, or one client, can hold open on the real API process.

- Event streams (SSE) per key: SECO_MAX_STREAMS open at once (a clear 429 beyond), counted
  in Redis, so another key is unaffected and a closed stream gives its slot back.
- Connections per API process: SECO_MAX_CONCURRENCY (uvicorn answers 503 beyond it, rather
  than accepting connections until memory or file descriptors run out).
- Redis connections: the API's pools are bounded (and named, so CLIENT LIST tells who holds
  which), whatever the number of open streams.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import wait_for
from tests.reliability.helpers import create_job, docs, upload

MAX_STREAMS = 3
MAX_CONCURRENCY = 12


@pytest.fixture(scope="module")
def svc(launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    s = launch_service(
        redis_url,
        tmp_path_factory.mktemp("stream-limits"),
        SECO_MAX_STREAMS=str(MAX_STREAMS),
        SECO_MAX_CONCURRENCY=str(MAX_CONCURRENCY),
    )
    yield s
    s.close()


@pytest.fixture(scope="module")
def jobs(svc: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A queued job per tenant (no worker: their streams stay open, waiting for news)."""
    tmp = tmp_path_factory.mktemp("stream-data")
    return {t: create_job(svc, upload(svc, tmp, docs(2), tenant=t), tenant=t) for t in ("a", "b")}


class Streams:
    """Open SSE streams, each kept open until `close`; `open` returns the status it got."""

    def __init__(self, svc: Any) -> None:
        self.svc = svc
        self.stack = contextlib.ExitStack()
        self.open_ones: list[tuple[httpx.Client, Any, Iterator[str]]] = []

    def open(self, tenant: str, job_id: str) -> httpx.Response:
        http = self.stack.enter_context(self.svc.http(tenant))
        r = self.stack.enter_context(http.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events/stream"))
        if r.status_code == 200:
            lines = r.iter_lines()  # kept: dropping the iterator would close the connection
            assert next(lines).startswith("retry:")  # the stream is live
            self.open_ones.append((http, r, lines))
        else:
            r.read()
        return r

    def close_one(self) -> None:
        http, r, _ = self.open_ones.pop()
        r.close()
        http.close()

    def close(self) -> None:
        self.stack.close()


def _api_connections(svc: Any) -> dict[str, int]:
    """Redis connections of the API process, by client name."""
    client = redis.Redis.from_url(svc.redis_url, decode_responses=True)
    names: dict[str, int] = {}
    for c in client.client_list():
        if c.get("name", "").startswith("seco-api"):
            names[c["name"]] = names.get(c["name"], 0) + 1
    client.close()
    return names


def test_a_key_holds_at_most_max_streams_open(svc: Any, jobs: dict[str, str]) -> None:
    streams = Streams(svc)
    try:
        for _ in range(MAX_STREAMS):
            assert streams.open("a", jobs["a"]).status_code == 200
        r = streams.open("a", jobs["a"])
        assert r.status_code == 429, r.text
        err = r.json()["error"]
        assert err["code"] == "too_many_streams" and f"{MAX_STREAMS} open event streams" in err["message"], err
        assert r.headers["x-should-retry"] == "false"
        assert streams.open("b", jobs["b"]).status_code == 200, "another key is not affected"
        assert svc.client("a").fine_tuning.jobs.list_events(jobs["a"]).data, "polling still works"
        # each open stream holds at most one connection of the API's bounded asyncio pool
        assert _api_connections(svc).get("seco-api-async", 0) <= MAX_STREAMS + 1 + 2
        streams.close_one()  # B's
        streams.close_one()  # one of A's: its slot comes back once the server sees the disconnect
        wait_for(
            lambda: streams.open("a", jobs["a"]).status_code == 200,
            timeout=10,
            interval=0.5,
            what="the closed stream's slot to be given back",
        )
    finally:
        streams.close()


def test_the_api_serves_at_most_max_concurrency_connections(svc: Any) -> None:
    """Idle connections count as uvicorn counts them: past the limit, a request gets a 503 at once."""
    held: list[socket.socket] = []
    try:
        for _ in range(MAX_CONCURRENCY):
            held.append(socket.create_connection(("127.0.0.1", int(svc.url.rsplit(":", 1)[1]))))
        r = httpx.get(svc.url + "/healthz", timeout=10)
        assert r.status_code == 503, r.text
    finally:
        for s in held:
            s.close()
    wait_for(
        lambda: httpx.get(svc.url + "/healthz", timeout=10).status_code == 200,
        timeout=10,
        what="the API to serve again once the connections are closed",
    )

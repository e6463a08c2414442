"""Inputs a black-box probe sent to the real API process (uvicorn subprocess, real Valkey):
invented HTTP methods and paths against `/metrics`, non-ASCII digits in `expires_after`, a
lone surrogate in a JSONL record, an unbounded SpaCO budget, and checkpoint names spelled
with leading zeros. Each is refused (or counted) from a fixed set, never a 500.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import flush_db

FLOOD = 300  # invented methods, and as many invented paths: each one a series before the fix


@pytest.fixture(scope="module")
def svc(launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    flush_db(redis_url)
    s = launch_service(redis_url, tmp_path_factory.mktemp("probe-inputs"))
    yield s
    s.close()


def request_series(text: str) -> list[str]:
    """The `seco_http_requests_total` series of a /metrics scrape (one line each)."""
    return [line for line in text.splitlines() if line.startswith("seco_http_requests_total{")]


def test_invented_methods_and_paths_add_no_metrics_series(svc: Any) -> None:
    with httpx.Client(base_url=svc.url, timeout=30) as http:  # no key: anyone reaching the port can do this
        http.get("/healthz")
        http.get("/nowhere")
        http.request("PURGE", "/healthz")
        before = request_series(http.get("/metrics").text)
        for i in range(FLOOD):
            http.request(f"Y{i:06d}", "/healthz")
            http.request(f"Z{i:06d}", f"/v1/files/file-{i}")
            http.get(f"/invented/{i}/path")
        after_text = http.get("/metrics").text
    after = request_series(after_text)
    labels = {m for line in after for m in re.findall(r'method="([^"]*)"', line)}
    assert labels <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}, labels
    routes = {m for line in after for m in re.findall(r'route="([^"]*)"', line)}
    assert not any("invented" in r or re.search(r"file-\d", r) for r in routes), routes
    # the flood adds at most the few (method, route, status) combinations "other" makes
    assert len(after) <= len(before) + 6, (len(before), len(after))
    assert len(after_text) < 200_000

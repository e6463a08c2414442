"""Per-tenant limits hold under concurrent requests (tests/service covers them one request
at a time): N parallel job creations or uploads racing for the last slots never overshoot
the quota, because the check and the write are one Lua script in Redis."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import flush_db
from tests.record_reads import tenant_file_bytes

MAX_JOBS = 5
FILE_QUOTA = 100_000
UPLOAD = 30_000  # three fit in the quota, the fourth does not


@pytest.fixture(scope="module")
def svc(
    launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory, storage_backend: str
) -> Iterator[Any]:
    flush_db(redis_url)
    s = launch_service(
        redis_url,
        tmp_path_factory.mktemp(f"limits-{storage_backend}"),
        storage=storage_backend,
        SECO_MAX_QUEUED_JOBS=str(MAX_JOBS),
        SECO_MAX_FILE_BYTES=str(FILE_QUOTA),
        # the quota is what is under test: let all ten uploads in at once
        SECO_MAX_UPLOADS_PER_KEY="16",
        SECO_MAX_UPLOADS="16",
    )
    yield s
    s.close()


def _parallel(svc: Any, n: int, call: Callable[[httpx.Client], httpx.Response]) -> list[httpx.Response]:
    def one(_: int) -> httpx.Response:
        with svc.http("b") as http:
            return call(http)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_parallel_uploads_never_exceed_the_byte_quota(svc: Any, tmp_path: Path) -> None:
    record = json.dumps({"text": "z" * (UPLOAD - 13)}) + "\n"
    assert len(record) == UPLOAD
    answers = _parallel(
        svc,
        10,
        lambda http: http.post(
            "/v1/files", files={"file": ("q.jsonl", record.encode()), "purpose": (None, "fine-tune")}
        ),
    )
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] * (FILE_QUOTA // UPLOAD) + [429] * (10 - FILE_QUOTA // UPLOAD), codes
    for r in answers:
        if r.status_code == 429:
            assert "quota" in r.json()["error"]["message"] and r.headers["x-should-retry"] == "false"
    assert tenant_file_bytes(svc.store(), svc.tenant("b")) == UPLOAD * (FILE_QUOTA // UPLOAD)
    assert not svc.upload_leftovers()
    stored = svc.objects(f"tenants/{svc.tenant('b')}/files")
    assert len(stored) == FILE_QUOTA // UPLOAD, "refused uploads left no file"


def test_parallel_job_creations_never_exceed_the_job_limit(svc: Any) -> None:
    with svc.http("b") as http:
        file_id = next(f["id"] for f in http.get("/v1/files").json()["data"])
    answers = _parallel(
        svc, 16, lambda http: http.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id})
    )
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] * MAX_JOBS + [429] * (16 - MAX_JOBS), codes
    assert all(f"{MAX_JOBS} queued or running" in r.json()["error"]["message"] for r in answers if r.status_code == 429)
    assert svc.store().queue_length() == MAX_JOBS

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


def upload_raw(svc: Any, body: bytes, **form: str) -> httpx.Response:
    with svc.http() as http:
        return http.post(
            "/v1/files", data={"purpose": "fine-tune", **form}, files={"file": ("t.jsonl", body, "application/jsonl")}
        )


GOOD = b'{"text": "a document"}\n'


@pytest.mark.parametrize(
    "seconds",
    [
        "\u00b2",
        "\u0664\u0660\u0660\u0660",
        "\uff14\uff10\uff10\uff10",
        "3600\u00b9",
        "+3600",
        " 3600",
        "3_600",
        "-3600",
    ],
)
def test_expiry_seconds_take_ascii_digits_only(svc: Any, seconds: str) -> None:
    r = upload_raw(svc, GOOD, **{"expires_after[anchor]": "created_at", "expires_after[seconds]": seconds})
    assert r.status_code == 400, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["param"] == "expires_after.seconds" and "expires_after[seconds]" in err["message"], err


def test_expiry_seconds_in_ascii_digits_still_work(svc: Any) -> None:
    r = upload_raw(svc, GOOD, **{"expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"})
    assert r.status_code == 200, r.text
    assert r.json()["expires_at"] == r.json()["created_at"] + 3600


@pytest.mark.parametrize(
    "line",
    [
        b'{"text": "ok \\ud800 then"}',
        b'{"text": "low \\udc00"}',
        b'{"messages": [{"role": "user", "content": "\\udbff"}, {"role": "assistant", "content": "x"}]}',
        b'{"prompt": "p", "completion": "\\ud800\\ud800"}',
    ],
)
def test_a_lone_surrogate_is_refused_at_upload_naming_the_line(svc: Any, line: bytes) -> None:
    r = upload_raw(svc, GOOD + GOOD + line + b"\n")
    assert r.status_code == 400, (r.status_code, r.text)
    message = r.json()["error"]["message"]
    assert "line 3" in message and "surrogate" in message, message


def test_a_surrogate_pair_is_a_character_and_accepted(svc: Any) -> None:
    r = upload_raw(svc, b'{"text": "emoji \\ud83d\\ude00 here"}\n')
    assert r.status_code == 200, r.text


def create_job(svc: Any, **body: Any) -> httpx.Response:
    with svc.http() as http:
        return http.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": "file-x", **body})


@pytest.mark.parametrize(
    ("seco", "bound"),
    [
        ({"mode": "spaco", "budget": 10**9}, 262144),
        ({"mode": "spaco", "budget": 5, "chunk_size": 16, "max_length": 64}, 4),
        ({"mode": "spaco", "budget": 65, "chunk_size": 16, "max_length": 1024}, 64),
    ],
)
def test_spaco_budget_is_bounded_by_the_chunks_a_window_can_have(svc: Any, seco: dict[str, Any], bound: int) -> None:
    r = create_job(svc, seco=seco)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"] or "").startswith("seco") and "budget" in err["message"] and str(bound) in err["message"], err


def test_a_spaco_budget_within_the_window_passes_validation(svc: Any) -> None:
    fid = upload_raw(svc, GOOD).json()["id"]
    r = create_job(svc, training_file=fid, seco={"mode": "spaco", "budget": 4, "chunk_size": 16, "max_length": 64})
    assert r.status_code == 200, r.text
    with svc.http() as http:
        http.post(f"/v1/fine_tuning/jobs/{r.json()['id']}/cancel")


def test_a_checkpoint_name_has_one_spelling(svc: Any) -> None:
    """`ckpt-step-0045` is not another name of `ckpt-step-45`: a 400 naming the canonical spelling."""
    org = "org-" + svc.tenant()
    name = f"ft:tiny:{org}::{'0' * 23}1:ckpt-step-0045"
    with svc.http() as http:
        for r in (http.get(f"/v1/models/{name}"), http.delete(f"/v1/models/{name}")):
            assert r.status_code == 400, r.text
            assert "ckpt-step-45" in r.json()["error"]["message"], r.text
    r = create_job(svc, model=name)
    assert r.status_code == 400 and "ckpt-step-45" in r.json()["error"]["message"], r.text
    with svc.http() as http:  # the canonical spelling of a missing checkpoint stays a 404
        assert http.get(f"/v1/models/{name.replace('0045', '45')}").status_code == 404

"""Concurrent uploads are bounded per key (429 with Retry-After) and per API process (503 with
Retry-After), through the real API process: uploads held open mid-body on raw sockets take
the slots, as a slow client's large upload does."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

from tests.conftest import KEY_A, KEY_B, flush_db

KEY_C = "sk-test-tenant-c-5555555555"
GOOD = b'{"text": "a document"}\n'
BOUNDARY = "held0upload"


@pytest.fixture(scope="module")
def svc(launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    flush_db(redis_url)
    s = launch_service(
        redis_url,
        tmp_path_factory.mktemp("upload-slots"),
        SECO_API_KEYS=f"{KEY_A},{KEY_B},{KEY_C}",
        SECO_MAX_UPLOADS_PER_KEY="1",
        SECO_MAX_UPLOADS="2",
    )
    yield s
    s.close()


class HeldUpload:
    """An upload whose body stops half-way until `finish()`: it holds its slot meanwhile."""

    def __init__(self, url: str, key: str) -> None:
        u = urlparse(url)
        assert u.hostname is not None and u.port is not None
        head = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n'
            "Content-Type: application/jsonl\r\n\r\n"
        ).encode()
        self.rest = GOOD * 1000 + f"\r\n--{BOUNDARY}--\r\n".encode()
        body_len = len(head) + len(GOOD) + len(self.rest)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=30)
        self.sock.sendall(
            f"POST /v1/files HTTP/1.1\r\nHost: {u.netloc}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {body_len}\r\n\r\n".encode()
            + head
            + GOOD
        )

    def finish(self) -> bytes:
        self.sock.sendall(self.rest)
        data = b""
        while b'"id"' not in data and b'"error"' not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            data += chunk
        self.sock.close()
        return data


def upload(url: str, key: str) -> httpx.Response:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        return http.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", GOOD)})


def refused_with(url: str, key: str, status: int, timeout: float = 15) -> httpx.Response:
    """Upload until the answer is `status` (the held upload's handler takes its slot within ms)."""
    deadline = time.monotonic() + timeout
    while True:
        r = upload(url, key)
        if r.status_code == status or time.monotonic() > deadline:
            return r
        time.sleep(0.1)


def test_uploads_are_bounded_per_key_and_per_process(svc: Any) -> None:
    held_a = HeldUpload(svc.url, KEY_A)
    r = refused_with(svc.url, KEY_A, 429)
    assert r.status_code == 429, (r.status_code, r.text)
    assert (
        r.json()["error"]["code"] == "too_many_uploads" and "SECO_MAX_UPLOADS_PER_KEY" in r.json()["error"]["message"]
    )
    assert int(r.headers["retry-after"]) > 0
    assert upload(svc.url, KEY_B).status_code == 200, "another key still uploads"

    held_b = HeldUpload(svc.url, KEY_B)  # the process now has its 2 uploads in progress
    r = refused_with(svc.url, KEY_C, 503)
    assert r.status_code == 503, (r.status_code, r.text)
    assert r.json()["error"]["code"] == "server_busy" and int(r.headers["retry-after"]) > 0

    assert b'"id":"file-' in held_a.finish() and b'"id":"file-' in held_b.finish()
    for key in (KEY_A, KEY_B, KEY_C):  # every slot was given back
        assert upload(svc.url, key).status_code == 200


def test_a_refused_upload_gives_its_slot_back(svc: Any) -> None:
    with httpx.Client(base_url=svc.url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=30) as http:
        for _ in range(3):
            r = http.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", b"not json\n")})
            assert r.status_code == 400, r.text
    assert upload(svc.url, KEY_A).status_code == 200

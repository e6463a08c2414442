"""An unexpected exception in a route is a 500 in OpenAI's error body, and the keep-alive
connection it came on serves the next request (the real uvicorn API; a test-only route
that raises, added by tests/reliability/raising_api/sitecustomize.py)."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from tests.conftest import ROOT, flush_db

HOOK = Path(__file__).parent / "raising_api"


@pytest.fixture(scope="module")
def svc(launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    flush_db(redis_url)
    s = launch_service(
        redis_url, tmp_path_factory.mktemp("raising-api"), PYTHONPATH=f"{HOOK}:{ROOT}", SECO_TEST_RAISE_ROUTE="1"
    )
    yield s
    s.close()


def exchange(sock: socket.socket, request: bytes) -> tuple[bytes, bytes]:
    """Send one request on `sock`; (head, body) of one whole response (Content-Length framed)."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection was closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    found = re.search(rb"(?im)^content-length: *(\d+)", head)
    assert found is not None, head
    while len(body) < int(found.group(1)):
        chunk = sock.recv(65536)
        assert chunk, "the connection was closed mid-body"
        body += chunk
    return head, body


def test_a_500_keeps_the_connection_for_the_next_request(svc: Any) -> None:
    url = urlparse(svc.url)
    assert url.hostname is not None and url.port is not None
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        for _ in range(2):  # twice: the connection outlives each 500
            head, body = exchange(sock, f"GET /test/raise HTTP/1.1\r\nHost: {url.netloc}\r\n\r\n".encode())
            assert head.startswith(b"HTTP/1.1 500"), head
            assert b'"code":"internal_error"' in body and b"unexpected failure" not in body, body
            assert b"connection: close" not in head.lower(), head
            head, body = exchange(sock, f"GET /healthz HTTP/1.1\r\nHost: {url.netloc}\r\n\r\n".encode())
            assert head.startswith(b"HTTP/1.1 200"), head
    log = (svc.log_dir / "api.log").read_text(errors="replace")
    cause = "RuntimeError: an unexpected failure inside a route"
    assert log.count(cause) == 2, "each 500 is logged once, with its cause"

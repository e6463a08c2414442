"""The API while the object store is down: uploads and downloads get a 503
`storage_unavailable` that the SDK retries, with no URL or credential in the answer, and
work again once the store is back."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import S3_BUCKET, S3_CREDENTIALS
from tests.reliability.s3_proxy import FaultProxy


def test_uploads_and_downloads_get_503_while_the_store_is_down(
    launch_service: Callable[..., Any], redis_url: str, s3_server: Any, tmp_path: Path
) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "a document"}) + "\n")
    with FaultProxy(s3_server.endpoint) as proxy:
        svc = launch_service(redis_url, tmp_path / "svc", storage="s3", s3_endpoint=proxy.endpoint)
        try:
            client = svc.client()
            stored = client.files.create(file=path.open("rb"), purpose="fine-tune")
            down = proxy.add("down", "tenants/", methods=("GET", "HEAD", "PUT", "POST", "DELETE"))
            for call in (
                lambda: client.files.create(file=path.open("rb"), purpose="fine-tune"),
                lambda: client.files.content(stored.id).read(),
            ):
                with pytest.raises(openai.InternalServerError) as e:
                    call()
                err = e.value.response.json()["error"]
                assert e.value.status_code == 503 and err["code"] == "storage_unavailable", err
                assert "the object store is unreachable" in err["message"]
                for secret in ("127.0.0.1", "http", S3_BUCKET, *S3_CREDENTIALS.values()):
                    assert secret not in json.dumps(err)
            assert not svc.upload_leftovers(), "the refused upload left nothing in scratch"
            proxy.remove(down)
            assert client.files.content(stored.id).read() == path.read_bytes()
            assert [f.id for f in client.files.list()] == [stored.id], "the failed upload was not registered"
        finally:
            svc.close()

"""/v1/files through the official openai SDK against the real API process and Redis,
on both storage back-ends (local directory, S3)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from service.record.storage import keys
from tests.conftest import flush_db
from tests.record_reads import tenant_file_bytes

UPLOAD_LIMIT = 64 * 1024
TENANT_QUOTA = 1 << 20


@pytest.fixture(scope="module")
def svc(
    launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory, storage_backend: str
) -> Iterator[Any]:
    flush_db(redis_url)
    s = launch_service(
        redis_url,
        tmp_path_factory.mktemp(f"files-api-{storage_backend}"),
        storage=storage_backend,
        SECO_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT),
        SECO_MAX_FILE_BYTES=str(TENANT_QUOTA),
    )
    yield s
    s.close()


def test_upload_list_retrieve_content_delete(svc: Any, jsonl: Callable[..., Path]) -> None:
    client = svc.client()
    path = jsonl([{"text": "first document"}, {"text": "second document"}], name="docs.jsonl")
    f = client.files.create(file=path.open("rb"), purpose="fine-tune")
    assert f.id.startswith("file-") and f.object == "file"
    assert (f.bytes, f.filename, f.purpose, f.status) == (path.stat().st_size, "docs.jsonl", "fine-tune", "processed")
    assert client.files.retrieve(f.id).model_dump() == f.model_dump()
    assert client.files.content(f.id).read() == path.read_bytes()
    key = keys.file_key(svc.tenant("a"), f.id)
    assert b"".join(svc.storage().open(key).chunks) == path.read_bytes(), "stored under the tenant's prefix"
    assert f.id in [x.id for x in client.files.list()]
    gone = client.files.delete(f.id)
    assert gone.deleted and gone.id == f.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
    assert not svc.storage().exists(key), "deleting the file deleted its object"
    assert not svc.upload_leftovers()


def test_pagination_and_order(svc: Any, jsonl: Callable[..., Path]) -> None:
    client = svc.client("b")
    made = [
        client.files.create(file=jsonl([{"text": f"doc {i}"}]).open("rb"), purpose="fine-tune").id for i in range(4)
    ]
    page = client.files.list(limit=2)
    assert page.has_more and [f.id for f in page.data] == made[::-1][:2]
    page2 = client.files.list(limit=2, after=page.data[-1].id)
    assert [f.id for f in page2.data] == made[::-1][2:4]
    everything = [f.id for f in client.files.list(limit=3)]  # auto-pagination follows `after`
    assert everything[:4] == made[::-1]
    asc = [f.id for f in client.files.list(order="asc")]
    assert asc[-4:] == made
    for fid in made:
        client.files.delete(fid)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"text": "ok"}\n{"text": "ok"}\n{"text": 3}\n', "line 3: 'text' must be a string, got int"),
        (b'{"text": "ok"}\n\n{oops\n', "line 3: invalid JSON"),
        (b"", "the file is empty"),
        (b'{"text": "\xc3\x28"}\n', "line 1: not valid UTF-8"),
        (b'{"prompt": "a", "completion": "b", "extra": 1}\n', "line 1: unknown field(s) ['extra']"),
    ],
)
def test_bad_files_name_the_line(svc: Any, tmp_path: Path, content: bytes, message: str) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    with pytest.raises(openai.BadRequestError) as e:
        svc.client().files.create(file=p.open("rb"), purpose="fine-tune")
    assert message in e.value.message and e.value.param == "file" and e.value.code == "invalid_file"
    assert e.value.response.headers.get("x-should-retry") == "false"
    assert not svc.upload_leftovers(), "no partial file left"
    assert not svc.objects(f"tenants/{svc.tenant('a')}/files"), "nothing published"


def test_over_the_size_limit_is_413_and_leaves_nothing(svc: Any, tmp_path: Path) -> None:
    p = tmp_path / "big.jsonl"
    line = b'{"text": "' + b"x" * 1000 + b'"}\n'
    p.write_bytes(line * (UPLOAD_LIMIT // len(line) + 5))
    before = svc.objects()
    with pytest.raises(openai.APIStatusError) as e:
        svc.client().files.create(file=p.open("rb"), purpose="fine-tune")
    assert e.value.status_code == 413 and str(UPLOAD_LIMIT) in e.value.message
    assert svc.objects() == before and not svc.upload_leftovers()
    # also when the client streams it without a Content-Length (chunked)
    with svc.http() as http:

        def body() -> Iterator[bytes]:
            yield b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="x.jsonl"\r\n\r\n'
            for _ in range(UPLOAD_LIMIT // len(line) + 5):
                yield line
            yield b"\r\n--B--\r\n"

        r = http.post("/v1/files", content=body(), headers={"content-type": "multipart/form-data; boundary=B"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
    assert svc.objects() == before and not svc.upload_leftovers()


def test_bad_upload_requests(svc: Any, jsonl: Callable[..., Path]) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        svc.client().files.create(file=jsonl([{"text": "x"}]).open("rb"), purpose="assistants")
    assert e.value.param == "purpose"
    with svc.http() as http:
        r = http.post("/v1/files", json={"file": "x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "file"
        r = http.post("/v1/files", files={"purpose": (None, "fine-tune")})
        assert r.status_code == 400 and "Missing the 'file' part" in r.json()["error"]["message"]


PURPOSE_PART = b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
FILE_PART = b'--B\r\nContent-Disposition: form-data; name="file"; filename="x.jsonl"\r\n\r\n{"text": "hi"}\n\r\n'
END = b"--B--\r\n"
MULTIPART = {"content-type": "multipart/form-data; boundary=B"}


class Body:
    """A streamed (chunked) request body that records how much of it the client got to send."""

    def __init__(self, *chunks: bytes, repeat: bytes = b"", times: int = 0, tail: bytes = b"") -> None:
        self.chunks, self.repeat, self.times, self.tail = chunks, repeat, times, tail
        self.sent = 0
        self.total = sum(map(len, chunks)) + len(repeat) * times + len(tail)

    def __iter__(self) -> Iterator[bytes]:
        for chunk in [*self.chunks, *([self.repeat] * self.times), self.tail]:
            self.sent += len(chunk)
            yield chunk


def _post(svc: Any, body: Body) -> Any:
    import httpx

    with svc.http() as http:
        try:
            return http.post("/v1/files", content=iter(body), headers=MULTIPART, timeout=60)
        except httpx.HTTPError as e:  # the server answered and closed before the client finished writing
            raise AssertionError(f"no response after {body.sent} of {body.total} bytes: {e!r}") from e


def test_extra_form_fields_are_refused_without_reading_them(svc: Any) -> None:
    """25,000 extra 4 KB fields (~100 MB) around a tiny file used to be read and accepted on an
    instance whose upload limit is 64 KiB; an unknown field is now refused as its headers arrive."""
    extra = b'--B\r\nContent-Disposition: form-data; name="x"\r\n\r\n' + b"v" * 4000 + b"\r\n"
    before = svc.objects()
    body = Body(PURPOSE_PART, repeat=extra, times=25_000, tail=FILE_PART + END)
    r = _post(svc, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "x" and err["code"] == "invalid_upload" and "Unknown form field 'x'" in err["message"]
    assert body.sent < body.total / 2, f"the client sent {body.sent} of {body.total} bytes"
    # each documented field once
    r = _post(svc, Body(PURPOSE_PART, repeat=PURPOSE_PART, times=3, tail=FILE_PART + END))
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose", r.text
    assert "more than once" in r.json()["error"]["message"]
    r = _post(svc, Body(PURPOSE_PART, FILE_PART, FILE_PART, END))
    assert r.status_code == 400 and r.json()["error"]["param"] == "file", r.text
    # a field's value and a part's headers are bounded too
    long_purpose = b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n' + b"p" * 5000 + b"\r\n"
    r = _post(svc, Body(long_purpose, FILE_PART, END))
    assert r.status_code == 400 and "longer than 4096 bytes" in r.json()["error"]["message"], r.text
    fat_header = b'--B\r\nContent-Disposition: form-data; name="file"; filename="x.jsonl"\r\nX-Pad: ' + b"h" * 20_000
    r = _post(svc, Body(PURPOSE_PART, fat_header + b'\r\n\r\n{"text": "hi"}\n\r\n', END))
    assert r.status_code == 400 and "Maximum header size exceeded" in r.json()["error"]["message"], r.text
    assert svc.objects() == before and not svc.upload_leftovers()


def test_every_byte_of_the_body_counts_against_the_limit(svc: Any) -> None:
    """Bytes after the closing boundary are legal multipart and skipped by the parser; they
    still count: a tiny file with 64 MiB behind it is over a 64 KiB upload limit."""
    before = svc.objects()
    body = Body(PURPOSE_PART, FILE_PART, END, repeat=b"e" * 4096, times=16384)
    r = _post(svc, body)
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large", r.text
    assert body.sent < body.total / 2, f"the client sent {body.sent} of {body.total} bytes"
    assert svc.objects() == before and not svc.upload_leftovers()
    ok = _post(svc, Body(PURPOSE_PART, FILE_PART, END))  # the same upload without the padding is fine
    assert ok.status_code == 200, ok.text
    svc.client().files.delete(ok.json()["id"])


def test_auth_required(svc: Any) -> None:
    with svc.http(tenant=None) as http:
        for method, path in [
            ("GET", "/v1/files"),
            ("POST", "/v1/files"),
            ("GET", "/v1/fine_tuning/jobs"),
            ("GET", "/v1/models"),
            ("POST", "/v1/fine_tuning/jobs"),
        ]:
            r = http.request(method, path, content=b"{not json")
            assert r.status_code == 401, (method, path)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = http.get("/v1/files", headers={"Authorization": "Basic abc"})
        assert r.status_code == 401
    with pytest.raises(openai.AuthenticationError) as e:
        svc.client("sk-wrong-key").files.list()
    assert e.value.code == "invalid_api_key" and "sk-wrong-key" not in e.value.message
    assert "sk-wrong-key" not in svc.logs(tail=100_000) and svc.key("a") not in svc.logs(tail=100_000)


def test_tenant_isolation(svc: Any, jsonl: Callable[..., Path]) -> None:
    a, b = svc.client("a"), svc.client("b")
    f = a.files.create(file=jsonl([{"text": "secret of a"}]).open("rb"), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError):
        b.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        b.files.content(f.id)
    with pytest.raises(openai.NotFoundError):
        b.files.delete(f.id)
    assert f.id not in [x.id for x in b.files.list()]
    assert a.files.retrieve(f.id).id == f.id, "still there for its owner"


@pytest.mark.parametrize(
    "bad", ["..%2F..%2Fetc%2Fpasswd", "file-..", "..", "file-0123456789abcdef01234567%2F..", "%2e%2e%2fapi_key"]
)
def test_ids_with_path_characters_are_404(svc: Any, bad: str) -> None:
    with svc.http() as http:
        for suffix in ("", "/content"):
            r = http.get(f"/v1/files/{bad}{suffix}")
            assert r.status_code == 404, (bad, suffix, r.text)
            assert "root:" not in r.text


def test_tenant_storage_quota_is_429(svc: Any, tmp_path: Path) -> None:
    client = svc.client("b")
    line = b'{"text": "' + b"y" * 1000 + b'"}\n'
    p = tmp_path / "chunk.jsonl"
    p.write_bytes(line * 60)  # ~60 KB, under the per-upload limit
    made = []
    with pytest.raises(openai.RateLimitError) as e:
        for _ in range(TENANT_QUOTA // p.stat().st_size + 2):
            made.append(client.files.create(file=p.open("rb"), purpose="fine-tune").id)
    assert "quota" in e.value.message and e.value.response.headers.get("x-should-retry") == "false"
    assert len(made) == TENANT_QUOTA // p.stat().st_size
    client.files.delete(made[0])
    made[0] = client.files.create(file=p.open("rb"), purpose="fine-tune").id  # room again after a delete
    for fid in made:
        client.files.delete(fid)


def test_expires_after_is_shown_and_the_file_is_deleted_once_expired(
    svc: Any, jsonl: Callable[..., Path], wait: Callable[..., Any]
) -> None:
    client = svc.client()
    tenant = svc.tenant("a")
    store = svc.store()
    used = tenant_file_bytes(store, tenant)
    path = jsonl([{"text": "short-lived"}], name="tmp.jsonl")
    f = client.files.create(
        file=path.open("rb"), purpose="fine-tune", expires_after={"anchor": "created_at", "seconds": 3600}
    )
    assert f.expires_at == f.created_at + 3600
    assert client.files.retrieve(f.id).expires_at == f.expires_at
    assert tenant_file_bytes(store, tenant) == used + f.bytes
    key = keys.file_key(tenant, f.id)
    files_prefix = f"tenants/{tenant}/files"
    assert svc.objects(files_prefix)[key] == f.bytes
    assert client.files.create(file=path.open("rb"), purpose="fine-tune").expires_at is None

    # an hour later, as far as the records know: the API's sweep deletes record, object and quota bytes
    store.r.hset(f"seco:file:{f.id}", "expires_at", str(f.created_at - 1))
    store.r.zadd("seco:files:expiring", {f.id: f.created_at - 1})
    wait(lambda: store.get_file(f.id) is None, timeout=30, what="the expiry sweep")
    assert key not in svc.objects(files_prefix), "the object is gone from storage"
    assert tenant_file_bytes(store, tenant) == used + path.stat().st_size, "only the file without expiry counts"
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
    assert f.id not in [x.id for x in client.files.list()]


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        (
            {"expires_after[anchor]": "created_at", "expires_after[seconds]": "3599"},
            "expires_after.seconds",
            "between 3600 (1 hour) and 2592000 (30 days); got 3599",
        ),
        (
            {"expires_after[anchor]": "created_at", "expires_after[seconds]": "2592001"},
            "expires_after.seconds",
            "got 2592001",
        ),
        (
            {"expires_after[anchor]": "created_at", "expires_after[seconds]": "soon"},
            "expires_after.seconds",
            "whole number of seconds",
        ),
        (
            {"expires_after[anchor]": "last_active_at", "expires_after[seconds]": "3600"},
            "expires_after.anchor",
            "must be 'created_at' (got 'last_active_at')",
        ),
        ({"expires_after[seconds]": "3600"}, "expires_after.anchor", "expires_after[anchor] is required"),
        ({"expires_after[anchor]": "created_at"}, "expires_after.seconds", "(got None)"),
    ],
)
def test_a_bad_expires_after_is_a_400_naming_the_field(
    svc: Any, jsonl: Callable[..., Path], fields: dict[str, str], param: str, message: str
) -> None:
    path = jsonl([{"text": "x"}])
    before = svc.objects(f"tenants/{svc.tenant('a')}/files")
    with svc.http() as http:
        r = http.post(
            "/v1/files", data={"purpose": "fine-tune", **fields}, files={"file": ("x.jsonl", path.read_bytes())}
        )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == "invalid_expires_after" and message in err["message"], err
    assert svc.objects(f"tenants/{svc.tenant('a')}/files") == before, "nothing stored"

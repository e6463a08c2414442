"""Hostile uploads and requests against the real API process: what tests/service does not
cover already (see test_files_api.py, test_jobs_api.py, test_jsonl.py).

- A 100 MB single line and a 300 MB body are refused while the API's memory stays flat
  (the upload is streamed to disk and the line check reads at most its cap).
- Files in the wrong encoding are refused naming line 1.
- Ids with path characters are a 404 on every job route and verb.
- Absurd numbers in a job are a 400 that names the field and its allowed range.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

from tests.conftest import flush_db

MiB = 1 << 20
MAX_UPLOAD = 128 * MiB
MAX_LINE = 4 * MiB
RSS_SLACK = 48 * MiB  # far below the 100 MB+ a buffered upload would cost


@pytest.fixture(scope="module")
def svc(
    launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory, storage_backend: str
) -> Iterator[Any]:
    flush_db(redis_url)
    s = launch_service(
        redis_url,
        tmp_path_factory.mktemp(f"upload-abuse-{storage_backend}"),
        storage=storage_backend,
        SECO_MAX_UPLOAD_BYTES=str(MAX_UPLOAD),
        SECO_MAX_LINE_BYTES=str(MAX_LINE),
    )
    yield s
    s.close()


class PeakRss(threading.Thread):
    """Samples a process's RSS every few milliseconds; `growth` is the peak above the start."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.start_rss = self.peak = self.proc.memory_info().rss
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self.join()

    @property
    def growth(self) -> int:
        return self.peak - self.start_rss


def _multipart(file_chunks: Iterator[bytes]) -> Iterator[bytes]:
    """A multipart body streamed from a generator (nothing of it held in the test's memory)."""
    yield b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
    yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
    yield from file_chunks
    yield b"\r\n--B--\r\n"


def _no_partial_files(svc: Any) -> bool:
    """Nothing left in the API's scratch space, no temporary name (local back-end) in storage."""
    return not svc.upload_leftovers() and not list(svc.data_dir.glob("tenants/**/.*"))


def test_a_100mb_line_is_refused_without_buffering_it(svc: Any) -> None:
    def one_line() -> Iterator[bytes]:
        yield b'{"text": "'
        block = b"x" * MiB
        for _ in range(100):
            yield block  # 100 MiB, no newline

    with svc.http() as http, PeakRss(svc.api.pid) as rss:
        t0 = time.monotonic()
        r = http.post(
            "/v1/files",
            content=_multipart(one_line()),
            timeout=120,
            headers={"content-type": "multipart/form-data; boundary=B"},
        )
        seconds = time.monotonic() - t0
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "file" and err["code"] == "invalid_file"
    assert f"line 1: longer than the limit of {MAX_LINE} bytes" in err["message"], err
    assert rss.growth < RSS_SLACK, f"API RSS grew by {rss.growth / MiB:.0f} MiB for a 100 MiB line"
    assert _no_partial_files(svc) and seconds < 60


def test_an_upload_over_the_limit_is_cut_off_without_buffering_it(svc: Any) -> None:
    def too_much() -> Iterator[bytes]:
        line = b'{"text": "' + b"y" * (MiB - 20) + b'"}\n'
        for _ in range(300):  # 300 MiB of valid JSONL, over the 128 MiB limit
            yield line

    with svc.http() as http, PeakRss(svc.api.pid) as rss:
        r = http.post(
            "/v1/files",
            content=_multipart(too_much()),
            timeout=120,
            headers={"content-type": "multipart/form-data; boundary=B"},
        )
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "file_too_large" and str(MAX_UPLOAD) in r.json()["error"]["message"]
    assert rss.growth < RSS_SLACK, f"API RSS grew by {rss.growth / MiB:.0f} MiB for a 300 MiB upload"
    assert _no_partial_files(svc)
    assert svc.client().files.list().data == [], "nothing was registered"


@pytest.mark.parametrize(
    ("encoding", "expected"),
    [
        ("utf-16", "not valid UTF-8"),
        ("utf-32", "not valid UTF-8"),
        ("latin-1", "not valid UTF-8"),
        ("utf-16-le", "line 1: "),
    ],
)
def test_wrong_encodings_are_refused(svc: Any, encoding: str, expected: str) -> None:
    content = '{"text": "café crème"}\n{"text": "naïve"}\n'.encode(encoding)
    with svc.http() as http:
        r = http.post("/v1/files", files={"file": ("x.jsonl", content), "purpose": (None, "fine-tune")})
    assert r.status_code == 400, (encoding, r.text)
    err = r.json()["error"]
    assert err["code"] == "invalid_file" and err["param"] == "file"
    assert err["message"].startswith("Invalid training file: line 1: ") and expected in err["message"], err
    assert _no_partial_files(svc)


BAD_IDS = [
    "..",
    "../../etc/passwd",
    "..%2F..%2Fetc%2Fpasswd",
    "%2e%2e%2f%2e%2e%2fapi_key",
    "ftjob-..%2F..%2Ffiles",
    "ftjob-0123456789abcdef01234567%2F..",
    "%00",
    "ftjob-" + "0" * 5000,
]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_job_ids_with_path_characters_are_404_on_every_route(svc: Any, bad: str) -> None:
    routes = [
        ("GET", ""),
        ("POST", "/cancel"),
        ("GET", "/events"),
        ("GET", "/events/stream"),
        ("GET", "/checkpoints"),
        ("GET", "/adapter"),
    ]
    with svc.http() as http:
        for method, suffix in routes:
            r = http.request(method, f"/v1/fine_tuning/jobs/{bad}{suffix}")
            assert r.status_code == 404, (bad, method, suffix, r.status_code, r.text[:200])
            assert "root:" not in r.text
        for method in ("GET", "DELETE"):
            r = http.request(method, f"/v1/files/{bad}")
            assert r.status_code == 404, (bad, method, r.text[:200])


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        (
            {"hyperparameters": {"learning_rate_multiplier": 1e9}},
            "hyperparameters.learning_rate_multiplier",
            "less than or equal to 100",
        ),
        ({"hyperparameters": {"batch_size": -5}}, "hyperparameters.batch_size", "greater than or equal to 1"),
        ({"hyperparameters": {"n_epochs": 10**30}}, "hyperparameters.n_epochs", "less than or equal to 100"),
        ({"hyperparameters": {"n_epochs": True}}, "hyperparameters.n_epochs", ""),
        ({"hyperparameters": {"n_epochs": 2.5}}, "hyperparameters.n_epochs", ""),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        ({"seed": 2**63}, "seed", "less than or equal to 2147483647"),
        ({"seco": {"max_length": 2**40}}, "seco.max_length", "less than or equal to 4194304"),
        ({"seco": {"chunk_size": -16}}, "seco.chunk_size", "greater than or equal to 16"),
        ({"seco": {"mode": "spaco", "budget": 0}}, "seco.budget", "greater than or equal to 1"),
        ({"seco": {"max_compensation": 0.5}}, "seco.max_compensation", "greater than or equal to 1"),
        ({"seco": {"lora": {"r": 10**6}}}, "seco.lora.r", "less than or equal to 1024"),
        ({"seco": {"lora": {"alpha": -1}}}, "seco.lora.alpha", "greater than 0"),
        ({"seco": {"lora": {"target_modules": [""]}}}, "seco.lora.target_modules.0", "at least 1 character"),
        ({"model": "../../models/secret"}, "model", "not offered by this server"),
        ({"model": "x" * 10_000}, "model", "at most 256 characters"),
        ({"training_file": "file-" + "a" * 500}, "training_file", "at most 64 characters"),
    ],
)
def test_absurd_job_settings_name_the_field_and_range(
    svc: Any, body: dict[str, Any], param: str, fragment: str
) -> None:
    with svc.http() as http:
        r = http.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": "file-" + "0" * 24, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and fragment in err["message"], err
    assert r.headers["x-should-retry"] == "false"


def test_non_finite_numbers_are_refused(svc: Any) -> None:
    """Python's JSON parser accepts NaN and Infinity; the schema must still refuse them."""
    for token in ("NaN", "Infinity", "-Infinity"):
        raw = '{"model": "tiny", "training_file": "file-%s", "hyperparameters": {"learning_rate_multiplier": %s}}'
        with svc.http() as http:
            r = http.post(
                "/v1/fine_tuning/jobs", content=raw % ("0" * 24, token), headers={"content-type": "application/json"}
            )
        assert r.status_code == 400, (token, r.text)
        assert r.json()["error"]["param"] == "hyperparameters.learning_rate_multiplier"


def test_a_24mb_json_body_is_refused_at_the_body_limit_without_reading_it(svc: Any) -> None:
    """A huge `integrations` list used to be read whole and parsed (1.3 GiB of RSS) before a 400;
    now the body stops at 1 MiB (SECO_MAX_BODY_BYTES), declared length or chunked alike."""
    item = b'{"type": "wandb", "wandb": {"project": "p", "tags": ["x"]}},'
    count = (24 * MiB) // len(item)
    head = b'{"model": "tiny", "training_file": "file-' + b"0" * 24 + b'", "integrations": ['

    def chunked() -> Iterator[bytes]:
        yield head
        for _ in range(count // 1000 + 1):
            yield item * 1000
        yield b'{"type": "wandb", "wandb": {"project": "p"}}]}'

    body = b"".join(chunked())
    assert len(body) > 24 * MiB
    with svc.http() as http, PeakRss(svc.api.pid) as rss:
        for content in (body, chunked()):
            r = http.post("/v1/fine_tuning/jobs", content=content, headers={"content-type": "application/json"})
            assert r.status_code == 413, r.text[:300]
            err = r.json()["error"]
            assert err["code"] == "request_too_large" and str(MiB) in err["message"], err
            assert r.headers["x-should-retry"] == "false"
    assert rss.growth < 16 * MiB, f"API RSS grew by {rss.growth / MiB:.0f} MiB for a 24 MiB body"
    with svc.http() as http:  # just under the limit: parsed and judged on its content
        r = http.post(
            "/v1/fine_tuning/jobs",
            json={"model": "tiny", "training_file": "file-" + "0" * 24, "suffix": "s" * (MiB - 200)},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "suffix", r.text[:300]
        r = http.post("/v1/fine_tuning/jobs", content=body, headers={"authorization": "Bearer sk-not-a-key"})
        assert r.status_code == 401, "the key is checked before any body is read"


def test_huge_and_deep_json_bodies(svc: Any) -> None:
    with svc.http() as http:
        deep = "[" * 100_000 + "]" * 100_000
        r = http.post("/v1/fine_tuning/jobs", content=deep, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text[:300]
        r = http.post(
            "/v1/fine_tuning/jobs",
            content='{"model": "tiny", "seed": ' + "9" * 10_000 + "}",
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400, r.text[:300]
        body = {"model": "tiny", "training_file": "f", "metadata": {"k": "v" * 600}}
        r = http.post("/v1/fine_tuning/jobs", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("metadata"), r.text
    assert json.loads(svc.http().get("/healthz").text) == {"status": "ok"}

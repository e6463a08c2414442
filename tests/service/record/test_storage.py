"""The storage interface on both back-ends: the local directory and a real S3 server (moto).

Every operation the API and the workers use, with the guarantees they rely on: atomic
publication, a directory complete only with its marker, streamed reads, deletes under a
prefix, sizes for quota accounting, keys that cannot leave their tenant, and errors that
name the problem without URLs or credentials.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.record import ids
from service.record.settings import Settings
from service.record.storage import LocalStorage, ObjectNotFound, Storage, StorageError, keys, open_storage
from service.record.tenants import tenant_of
from tests.conftest import BACKENDS, S3_CREDENTIALS, free_port

TENANT = tenant_of("sk-storage-test", b"a test secret")
MiB = 1 << 20


@pytest.fixture(params=BACKENDS)
def storage(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Storage]:
    if request.param == "local":
        yield LocalStorage(tmp_path / "data")
        return
    s3 = request.getfixturevalue("s3_server")
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    yield open_storage(Settings(data_dir=tmp_path / "data", storage_url=s3.new_url("unit")))


def _file(tmp_path: Path, name: str, size: int) -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


def _read(storage: Storage, key: str) -> bytes:
    return b"".join(storage.open(key).chunks)


def test_put_stream_list_size_delete(storage: Storage, tmp_path: Path) -> None:
    job = ids.new_job_id()
    prefix = keys.job_prefix(TENANT, job)
    small = _file(tmp_path, "small", 1000)
    big = _file(tmp_path, "big", 9 * MiB + 123)  # over the multipart threshold on S3
    assert storage.put_file(f"{prefix}/metrics.csv", small) == 1000
    assert storage.put_file(f"{prefix}/adapter.tar.gz", big) == big.stat().st_size
    assert small.is_file() and big.is_file(), "without move the source stays"

    download = storage.open(f"{prefix}/adapter.tar.gz")
    chunks = list(download.chunks)
    assert download.size == big.stat().st_size and b"".join(chunks) == big.read_bytes()
    assert len(chunks) > 1 and max(len(c) for c in chunks) <= 4 * MiB, "streamed in bounded chunks"
    assert storage.size(f"{prefix}/metrics.csv") == 1000 and storage.size(f"{prefix}/nothing") is None

    listed = storage.list_under(prefix)
    assert [o.key for o in listed] == [f"{prefix}/adapter.tar.gz", f"{prefix}/metrics.csv"]
    assert storage.size_under(prefix) == 1000 + big.stat().st_size
    assert storage.list_under(keys.job_prefix(TENANT, ids.new_job_id())) == []

    storage.delete(f"{prefix}/metrics.csv")
    storage.delete(f"{prefix}/metrics.csv")  # already gone: no error
    assert not storage.exists(f"{prefix}/metrics.csv")
    with pytest.raises(ObjectNotFound):
        storage.open(f"{prefix}/metrics.csv")
    assert storage.delete_under(prefix) == 1
    assert storage.list_under(prefix) == [] and storage.size_under(prefix) == 0


def test_put_file_move_consumes_the_source(storage: Storage, tmp_path: Path) -> None:
    key = keys.file_key(TENANT, ids.new_file_id())
    src = _file(tmp_path, "upload.part", 5000)
    data = src.read_bytes()
    storage.put_file(key, src, move=True)
    assert not src.exists() and _read(storage, key) == data


def test_a_directory_is_complete_only_with_its_marker(storage: Storage, tmp_path: Path) -> None:
    job = ids.new_job_id()
    prefix = keys.checkpoints_prefix(TENANT, job)
    ckpt = tmp_path / "step-000003"
    (ckpt / "adapter").mkdir(parents=True)
    (ckpt / "adapter" / "adapter_model.safetensors").write_bytes(b"w" * 300)
    (ckpt / "trainer_state.pt").write_bytes(b"s" * 200)
    (ckpt / "checkpoint.json").write_text('{"step": 3}')
    published = storage.put_dir(f"{prefix}/step-000003", ckpt, "checkpoint.json")
    names = ("adapter/adapter_model.safetensors", "checkpoint.json", "trainer_state.pt")
    assert sorted(published) == [f"{prefix}/step-000003/{n}" for n in names]
    # a writer killed mid-upload: some objects of step 6, no marker
    storage.put_bytes(f"{prefix}/step-000006/trainer_state.pt", b"half")
    assert storage.complete_dirs(prefix, "checkpoint.json") == ["step-000003"]

    fetched = storage.fetch_dir(f"{prefix}/step-000003", tmp_path / "restore" / "step-000003")
    assert (fetched / "adapter" / "adapter_model.safetensors").read_bytes() == b"w" * 300
    assert (fetched / "checkpoint.json").read_text() == '{"step": 3}'
    assert not [p for p in fetched.parent.iterdir() if p.name.startswith(".")], "no temporary left"
    with pytest.raises(ValueError, match="marker"):
        storage.put_dir(f"{prefix}/step-000009", ckpt / "adapter", "checkpoint.json")


def test_move_under_moves_everything_and_finishes_an_interrupted_move(storage: Storage, tmp_path: Path) -> None:
    src, dest = "tenants/0123456789abcdef", "tenants/fedcba9876543210"
    contents = {
        f"files/{ids.new_file_id()}": os.urandom(100),
        "jobs/x/checkpoints/step-000001/a": b"a",
        "jobs/x/adapter.tar.gz": os.urandom(3000),
    }
    for rel, data in contents.items():
        storage.put_bytes(f"{src}/{rel}", data)
    storage.copy(f"{src}/jobs/x/adapter.tar.gz", f"{dest}/jobs/x/adapter.tar.gz")  # as a move cut short leaves it
    assert storage.move_under(src, dest) == len(contents)
    assert storage.list_under(src) == []
    assert {o.key: _read(storage, o.key) for o in storage.list_under(dest)} == {
        f"{dest}/{rel}": data for rel, data in contents.items()
    }
    assert storage.move_under(src, dest) == 0, "moving again has nothing left to do"
    with pytest.raises(ObjectNotFound):
        storage.copy(f"{src}/nothing", f"{dest}/nothing")


def test_fetch_gives_a_local_file(storage: Storage, tmp_path: Path) -> None:
    key = keys.file_key(TENANT, ids.new_file_id())
    storage.put_bytes(key, b'{"text": "hi"}\n')
    local = storage.fetch(key, tmp_path / "scratch" / "in.jsonl")
    assert local.read_bytes() == b'{"text": "hi"}\n'
    with pytest.raises(ObjectNotFound):
        storage.fetch(keys.file_key(TENANT, ids.new_file_id()), tmp_path / "scratch" / "x")


@pytest.mark.parametrize("bad", ["../etc/passwd", "/abs/key", "a//b", "tenants/.hidden", "a/./b", "a\\b", ""])
def test_keys_never_leave_their_place(storage: Storage, bad: str) -> None:
    with pytest.raises(ValueError, match="not a storage key"):
        storage.size(bad)
    with pytest.raises(ValueError, match="not a storage key"):
        storage.put_bytes(bad, b"x")


def test_keys_are_built_from_validated_ids_and_prefixed_by_tenant() -> None:
    fid, job = ids.new_file_id(), ids.new_job_id()
    assert keys.file_key(TENANT, fid) == f"tenants/{TENANT}/files/{fid}"
    assert keys.result_key(TENANT, job, "adapter.tar.gz") == f"tenants/{TENANT}/jobs/{job}/adapter.tar.gz"
    for call in (
        lambda: keys.file_key("../other", fid),
        lambda: keys.file_key(TENANT, "file-../x"),
        lambda: keys.job_prefix(TENANT, "ftjob-x/.."),
        lambda: keys.result_key(TENANT, job, "../a"),
        lambda: keys.tenant_prefix(TENANT.upper()),
    ):
        with pytest.raises(ValueError):
            call()


def test_s3_errors_name_the_problem_without_urls_or_credentials(
    s3_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unreachable endpoint and a missing bucket fail within seconds, saying only what is wrong."""
    port = free_port()  # nothing listens there
    for k, v in {**s3_server.env(f"http://127.0.0.1:{port}")}.items():
        monkeypatch.setenv(k, v)
    down = open_storage(Settings(data_dir=tmp_path, storage_url="s3://seco-test/x"))
    src = _file(tmp_path, "f", 10)
    t0 = time.monotonic()
    with pytest.raises(StorageError) as e:
        down.put_file("tenants/x/f", src)
    assert time.monotonic() - t0 < 30, "bounded retries, then a failure"
    assert e.value.reason == "the object store is unreachable"
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    missing = open_storage(Settings(data_dir=tmp_path, storage_url="s3://no-such-bucket/x"))
    with pytest.raises(StorageError) as e2:
        missing.put_file("tenants/x/f", src)
    assert e2.value.reason == "the bucket does not exist"
    for err in (e.value, e2.value):
        text = str(err)
        assert "127.0.0.1" not in text and "http" not in text and "no-such-bucket" not in text
        assert S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in text and S3_CREDENTIALS["AWS_ACCESS_KEY_ID"] not in text


def test_a_bad_storage_url_is_refused_at_start_up() -> None:
    cases = [
        ("http://bucket/x", "must look like s3://bucket/prefix"),
        ("s3:///x", "must look like"),
        ("s3://key:secret@bucket/x", "takes no credentials"),
    ]
    for url, fragment in cases:
        with pytest.raises(ValueError, match=fragment):
            Settings(storage_url=url)

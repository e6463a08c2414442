"""The expiry sweep against a real Redis and a local storage directory (the API's sweep is
exercised through the SDK in tests/service/api/test_files_api.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.record import ids
from service.record.expiry import InvalidExpiry, expire_files, expires_at
from service.record.storage import LocalStorage, keys
from service.record.store import FileRecord, Store
from tests.record_reads import tenant_file_bytes
from tests.service.record.test_store import T1, make_job


@pytest.fixture
def store(redis_url: str) -> Store:
    s = Store.from_url(redis_url)
    s.r.flushdb()
    return s


def upload(store: Store, data: LocalStorage, created_at: int, expires: int | None) -> FileRecord:
    fid = ids.new_file_id()
    key = keys.file_key(T1, fid)
    data.put_bytes(key, b'{"text": "hello world"}\n')
    rec = FileRecord(
        id=fid,
        tenant=T1,
        bytes=24,
        created_at=created_at,
        filename="a.jsonl",
        purpose="fine-tune",
        path=key,
        expires_at=expires,
    )
    store.create_file(rec, counted=True, tenant_limit=1 << 30)
    return rec


def test_expires_at_follows_openais_limits() -> None:
    assert expires_at(1000, None, None) is None
    assert expires_at(1000, "created_at", "3600") == 4600
    assert expires_at(1000, "created_at", "2592000") == 1000 + 2592000
    for anchor, seconds, param in [
        ("created_at", "3599", "expires_after.seconds"),
        ("created_at", "-5", "expires_after.seconds"),
        ("updated_at", "3600", "expires_after.anchor"),
        (None, "3600", "expires_after.anchor"),
    ]:
        with pytest.raises(InvalidExpiry) as info:
            expires_at(1000, anchor, seconds)
        assert info.value.param == param


def test_the_sweep_deletes_expired_files_and_waits_for_jobs_using_them(store: Store, tmp_path: Path) -> None:
    data = LocalStorage(tmp_path / "data")
    gone, kept, used = upload(store, data, 100, 4000), upload(store, data, 100, None), upload(store, data, 100, 4000)
    later = upload(store, data, 100, 9000)
    job = make_job(store, used.id)
    assert tenant_file_bytes(store, T1) == 4 * 24
    assert expire_files(store, data, at=3999) == []
    assert expire_files(store, data, at=5000) == [gone.id], "the file a queued job needs is kept"
    assert store.get_file(gone.id) is None and not data.exists(gone.path)
    assert store.get_file(kept.id) is not None and store.get_file(later.id) is not None
    assert tenant_file_bytes(store, T1) == 3 * 24
    assert store.request_cancel(job) == "cancelled"
    assert expire_files(store, data, at=5000) == [used.id], "deleted once the job has ended"
    assert not data.exists(used.path) and tenant_file_bytes(store, T1) == 2 * 24
    assert expire_files(store, data, at=10_000) == [later.id] and store.expired_files(10**10) == []


def test_seconds_are_ascii_digits_only() -> None:
    """`str.isdigit()` takes "²" (which `int()` then refuses) and other scripts' digits."""
    for seconds in ["\u00b2", "\u0664\u0660\u0660\u0660", "\uff14\uff10\uff10\uff10", "3600\u00b9", " 3600", "+3600"]:
        with pytest.raises(InvalidExpiry) as info:
            expires_at(1000, "created_at", seconds)
        assert info.value.param == "expires_after.seconds" and "ASCII digits" in str(info.value)

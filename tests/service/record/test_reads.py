"""The API's async reads against a real Redis: they read what the sync store reads, and a
metadata filter that must skip more jobs than one script looks at still finds its jobs."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from service.record import ids
from service.record.reads import LIST_SCAN, Reads, job_record
from service.record.storage import LocalStorage
from service.record.store import JobRecord, Store, now
from tests.record_reads import list_checkpoints, list_events
from tests.service.record.test_store import OTHER, T1, make_file


@pytest.fixture
def store(redis_url: str) -> Store:
    s = Store.from_url(redis_url)
    s.r.flushdb()
    return s


def _jobs(store: Store, file_id: str, n: int, tenant: str = T1, **meta: str) -> list[str]:
    """n queued jobs, oldest first; the first one carries `meta` as its metadata."""
    out = []
    for i in range(n):
        rec = JobRecord(
            id=ids.new_job_id(),
            tenant=tenant,
            status="validating_files",
            created_at=now(),
            model="tiny",
            training_file=file_id,
            hyperparameters={"n_epochs": 1},
            seed=i,
            seco={"mode": "seco"},
            metadata=dict(meta) if i == 0 and meta else {"i": str(i)},
        )
        store.create_job(rec, tenant_limit=10_000)
        assert store.transition(rec.id, ["validating_files"], "queued")[0]
        out.append(rec.id)
    return out


def _run(redis_url: str, call: Any) -> Any:
    async def go() -> Any:
        reads = Reads.from_url(redis_url, max_connections=8)
        try:
            return await call(reads)
        finally:
            await reads.aclose()

    return asyncio.run(go())


def test_reads_agree_with_the_store(store: Store, redis_url: str, tmp_path: Path) -> None:
    f = make_file(store, LocalStorage(tmp_path))
    jobs = _jobs(store, f.id, 4)
    other = _jobs(store, make_file(store, LocalStorage(tmp_path), OTHER).id, 1, OTHER)[0]
    assert store.start_job(jobs[0], "w", 60)
    store.add_event(jobs[0], "hello", data={"x": 1.5})
    store.add_checkpoint(jobs[0], 3, "p/3", {"loss": 2.0})
    order = store.queue_order()

    async def reads_all(reads: Reads) -> Any:
        return (
            await reads.job(jobs[1], T1),
            await reads.job(other, T1),
            await reads.job("../x", T1),
            await reads.jobs(T1, after=None, limit=2),
            await reads.events(jobs[0], T1, after=None, limit=50),
            await reads.events(jobs[0], OTHER, after=None, limit=50),
            await reads.checkpoints(jobs[0], T1, after=None, limit=5),
            await reads.stream(jobs[0], "0-0"),
        )

    got = _run(redis_url, reads_all)
    one, foreign, bad_id, (page, more, positions), evs, foreign_evs, cks, (streamed, status) = got
    assert foreign is None and bad_id is None and foreign_evs is None
    flat, pos = one
    assert job_record(flat) == store.get_job(jobs[1])
    assert pos.queue_position(jobs[1]) == order.index(jobs[1]) + 1
    assert [job_record(h).id for h in page] == jobs[::-1][:2] and more
    assert [positions.queue_position(j) for j in jobs[::-1][:2]] == [order.index(j) + 1 for j in jobs[::-1][:2]]
    stored = list_events(store, jobs[0], after=None, limit=50)[0]
    assert [Store.event_from_entry(*e) for e in evs[0]] == stored and not evs[1]
    assert [Store.event_from_entry(*e) for e in streamed] == stored[::-1] and status == "running"
    rec, ck_page, ck_more = cks
    assert rec == store.get_job(jobs[0]) and ck_page == list_checkpoints(store, jobs[0], after=None, limit=5)[0]
    assert not ck_more


def test_a_filter_that_skips_more_than_one_scan_still_finds_the_oldest_job(
    store: Store, redis_url: str, tmp_path: Path
) -> None:
    f = make_file(store, LocalStorage(tmp_path))
    jobs = _jobs(store, f.id, LIST_SCAN + 40, project="rare")

    async def pages(reads: Reads) -> Any:
        rare = await reads.jobs(T1, after=None, limit=5, metadata={"project": "rare"})
        none = await reads.jobs(T1, after=None, limit=5, metadata={"project": "absent"})
        tail = await reads.jobs(T1, after=jobs[3], limit=100)
        try:
            await reads.jobs(T1, after=ids.new_job_id(), limit=5)
        except KeyError:
            unknown = True
        else:
            unknown = False
        return rare, none, tail, unknown

    (rare, rare_more, _), (none, none_more, _), (tail, tail_more, _), unknown = _run(redis_url, pages)
    assert [job_record(h).id for h in rare] == [jobs[0]] and not rare_more
    assert none == [] and not none_more
    assert [job_record(h).id for h in tail] == jobs[2::-1] and not tail_more
    assert unknown, "an unknown `after` is a KeyError, as in the sync store"

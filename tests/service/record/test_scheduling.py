"""Fair scheduling: the order itself (pure), and claims and queue positions on a real Redis.

The rule: the next job is the oldest queued job of the tenant with the fewest running
jobs, round-robin among tenants with as many. Queue positions are the fair order, and
with one worker the jobs start exactly in that order.
"""

from __future__ import annotations

import random
import threading
from collections import Counter

import pytest

from service.record.scheduling import Queued, fair_order
from service.record.storage import LocalStorage
from service.record.store import Store
from tests.service.record.test_store import _url, data, make_file, make_job, store, tenant

__all__ = ["data", "store"]  # fixtures shared with test_store

A, B, C = "a", "b", "c"


def _q(*jobs: tuple[str, str, int]) -> list[Queued]:
    return [Queued(job_id=j, tenant=t, seq=s) for j, t, s in jobs]


def test_a_tenant_with_many_jobs_does_not_hold_the_queue() -> None:
    """A queued 6 (its first is running), then B queued 1: B's starts next, not sixth."""
    queued = _q(*[(f"a{i}", A, i) for i in range(2, 7)], ("b1", B, 10))
    assert fair_order(queued, Counter({A: 1}), {A: 1}) == ["b1", "a2", "a3", "a4", "a5", "a6"]


def test_fewest_running_first_then_round_robin() -> None:
    queued = _q(("a1", A, 1), ("a2", A, 2), ("b1", B, 3), ("b2", B, 4), ("c1", C, 5))
    # C runs nothing, B one, A two: C, then B (1 vs A's 2), then B and A alternate by who was served last
    assert fair_order(queued, Counter({A: 2, B: 1}), {A: 5, B: 6}) == ["c1", "b1", "a1", "b2", "a2"]
    # all idle: never-served tenants first (oldest job first), then the least recently served
    assert fair_order(queued, Counter(), {A: 9}) == ["b1", "c1", "a1", "b2", "a2"]
    # within a tenant, oldest first, whatever order the queue lists them in
    assert fair_order(_q(("x", A, 7), ("y", A, 3)), Counter(), {}) == ["y", "x"]


def test_queue_positions_are_the_start_order_with_one_worker(store: Store, data: LocalStorage) -> None:
    """Random mixes of tenants and arrival orders: the positions reported before any start are
    exactly the order in which one worker then starts the jobs."""
    rng = random.Random(1234)
    tenants = [tenant(f"sk-sched-{i}") for i in range(4)]
    files = {t: make_file(store, data, t).id for t in tenants}
    for round_ in range(5):
        jobs = [make_job(store, files[t], t) for t in rng.choices(tenants, weights=[6, 3, 1, 1], k=12)]
        if round_:  # a job of some tenant is already running, as when the worker is busy
            running = store.claim_next("w", 60)
            assert running is not None and running in jobs
            jobs.remove(running)
        positions = {j: store.queue_position(j) for j in jobs}
        assert sorted(positions.values()) == list(range(1, len(jobs) + 1)), "distinct, gap-free"
        if round_:
            assert store.finish_job(running, "w", "succeeded", event="done")
        started = []
        while (job := store.claim_next("w", 60)) is not None:
            started.append(job)
            assert store.finish_job(job, "w", "succeeded", event="done")
        assert started == sorted(jobs, key=lambda j: positions[j]), f"round {round_}"


def test_two_workers_favour_the_tenant_with_fewer_running_jobs(store: Store, data: LocalStorage) -> None:
    ta, tb = tenant("sk-sched-a"), tenant("sk-sched-b")
    fa, fb = make_file(store, data, ta).id, make_file(store, data, tb).id
    a_jobs = [make_job(store, fa, ta) for _ in range(4)]
    b_job = make_job(store, fb, tb)
    assert store.claim_next("w1", 60) == a_jobs[0]  # nothing runs: the oldest job
    assert store.claim_next("w2", 60) == b_job  # A runs one, B none
    assert store.finish_job(a_jobs[0], "w1", "succeeded", event="done")
    assert store.claim_next("w1", 60) == a_jobs[1]  # B has nothing left queued
    assert store.queue_order() == a_jobs[2:]


def test_concurrent_claims_start_every_job_exactly_once(store: Store, data: LocalStorage) -> None:
    tenants = [tenant(f"sk-race-{i}") for i in range(3)]
    files = {t: make_file(store, data, t).id for t in tenants}
    jobs = [make_job(store, files[tenants[i % 3]], tenants[i % 3]) for i in range(18)]
    claims: list[tuple[str, str]] = []
    barrier = threading.Barrier(6)

    def worker(n: int) -> None:
        s = Store.from_url(_url(store))
        barrier.wait()
        while (job := s.claim_next(f"w{n}", 60)) is not None:
            claims.append((job, f"w{n}"))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(j for j, _ in claims) == sorted(jobs), "each job claimed exactly once"
    assert store.queue_order() == []
    for job, worker_id in claims:
        rec = store.get_job(job)
        assert rec is not None and rec.status == "running" and rec.worker == worker_id


@pytest.mark.parametrize("n", [0, 1])
def test_no_queued_job_is_nothing_to_claim(store: Store, data: LocalStorage, n: int) -> None:
    f = make_file(store, data)
    job = make_job(store, f.id, queued=bool(n))
    assert store.claim_next("w", 60) == (job if n else None)

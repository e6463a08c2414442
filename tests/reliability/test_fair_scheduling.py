"""Fair scheduling on the real service: one worker, tenant A queues 6 jobs, then tenant B 1.

B's job starts second, not seventh, and the queue positions the API reports beforehand are
the order in which the jobs then start. With the worker SIGKILLed in the middle of A's
first job the same holds: the reaper requeues that job, a new worker starts B's job, then
resumes A's from its checkpoint, and every job finishes exactly once.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import flush_db, wait_for
from tests.reliability.helpers import create_job, docs, events, finished, metrics_steps, runs_by_log, upload

LEASE = 2


@pytest.fixture(scope="module")
def svc(launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    flush_db(redis_url)
    s = launch_service(
        redis_url,
        tmp_path_factory.mktemp("fair"),
        SECO_LEASE_SECONDS=str(LEASE),
        SECO_REAPER_INTERVAL="0.5",
        SECO_CHECKPOINT_EVERY="2",
    )
    yield s
    s.close()


def _start(svc: Any, job_id: str, tenant: str, resumed: bool = False) -> tuple[int, int] | None:
    """When the job started (or, `resumed`, was resumed): its event id as (ms, seq); None if it did not."""
    wanted = "Fine-tuning job resumed on" if resumed else "Fine-tuning job started"
    ev = next((e for e in events(svc, job_id, tenant) if e.message.startswith(wanted)), None)
    if ev is None:
        return None
    ms, seq = ev.id.removeprefix("ftevent-").split("-")
    return int(ms), int(seq)


def _queue(svc: Any, tmp: Path) -> tuple[str, list[str], str]:
    """A's first job (running once this returns), A's five others, then B's one."""
    first = create_job(svc, upload(svc, tmp, docs(12)))
    wait_for(
        lambda: svc.client().fine_tuning.jobs.retrieve(first).status == "running", 120, what="A's first job to start"
    )
    short_file = upload(svc, tmp, docs(1))
    rest = [create_job(svc, short_file) for _ in range(5)]
    b_job = create_job(svc, upload(svc, tmp, docs(1), tenant="b"), tenant="b")
    return first, rest, b_job


def _positions(svc: Any, jobs: dict[str, str]) -> dict[str, int]:
    """The queue position the API reports for each job (job id -> tenant)."""
    return {j: svc.client(t).fine_tuning.jobs.retrieve(j).model_extra["queue_position"] for j, t in jobs.items()}


def _succeeded(svc: Any, jobs: dict[str, str]) -> None:
    for job_id, tenant in jobs.items():
        done = wait_for(lambda j=job_id, t=tenant: finished(svc, j, t), 240, interval=0.5, what=f"job {job_id}")
        assert done.status == "succeeded", (job_id, done.error, svc.logs())


def _cancel_the_rest(svc: Any, jobs: dict[str, str]) -> None:
    """Once the order is shown, the remaining jobs (which only repeat it) are cancelled to save time."""
    for job_id, tenant in jobs.items():
        if svc.client(tenant).fine_tuning.jobs.retrieve(job_id).status in ("queued", "running"):
            svc.client(tenant).fine_tuning.jobs.cancel(job_id)
    for job_id, tenant in jobs.items():
        wait_for(lambda j=job_id, t=tenant: finished(svc, j, t), 120, interval=0.5, what=f"job {job_id} to end")


def _first_starts_as_positioned(
    svc: Any, queued: dict[str, str], positions: dict[str, int], n: int, resumed: str = ""
) -> None:
    """The first `n` jobs to start were the first `n` by position, in that order. (Only the first
    ones: cancelling the rest races with the worker, which may start one of them meanwhile.)"""
    starts = {j: _start(svc, j, t, resumed=j == resumed) for j, t in queued.items()}
    started = sorted((j for j in queued if starts[j] is not None), key=lambda j: starts[j])
    assert started[:n] == sorted(queued, key=positions.__getitem__)[:n], (started, positions)


def test_the_other_tenants_job_starts_second(svc: Any, tmp_path: Path) -> None:
    svc.start_worker()
    try:
        first, rest, b_job = _queue(svc, tmp_path)
        queued = {**{j: "a" for j in rest}, b_job: "b"}
        positions = _positions(svc, queued)
        assert positions[b_job] == 1, positions
        assert [positions[j] for j in rest] == [2, 3, 4, 5, 6], "A's jobs in their own order after B's"
        _succeeded(svc, {first: "a", b_job: "b", rest[0]: "a"})
        _cancel_the_rest(svc, queued)
        _first_starts_as_positioned(svc, queued, positions, 2)
        assert _start(svc, first, "a") < _start(svc, b_job, "b")  # type: ignore[operator]
    finally:
        for w in list(svc.workers):
            svc.stop_worker(w)


def test_order_and_exactly_once_hold_when_the_worker_is_killed_mid_job(svc: Any, tmp_path: Path) -> None:
    worker = svc.start_worker()
    first, rest, b_job = _queue(svc, tmp_path)
    wait_for(
        lambda: svc.client().fine_tuning.jobs.checkpoints.list(first).data,
        120,
        interval=0.2,
        what="a checkpoint of A's first job",
    )
    svc.stop_worker(worker, signal.SIGKILL)
    wait_for(
        lambda: svc.client().fine_tuning.jobs.retrieve(first).status == "queued",
        30,
        interval=0.2,
        what="the reaper to requeue A's first job",
    )
    queued = {first: "a", **{j: "a" for j in rest}, b_job: "b"}
    positions = _positions(svc, queued)
    assert positions[b_job] == 1 and positions[first] == 2, positions
    assert [positions[j] for j in rest] == [3, 4, 5, 6, 7]
    svc.start_worker()
    try:
        _succeeded(svc, {b_job: "b", first: "a"})
        _cancel_the_rest(svc, queued)
        _first_starts_as_positioned(svc, queued, positions, 2, resumed=first)
    finally:
        for w in list(svc.workers):
            svc.stop_worker(w)
    # exactly once: A's first job ran on both workers, finished once, and reported every step once
    assert sum(runs_by_log(svc, first).values()) == 2, runs_by_log(svc, first)
    evs = events(svc, first)
    steps = metrics_steps(evs)
    assert steps == list(range(1, steps[-1] + 1)), steps
    assert [e.message for e in evs].count("The job has successfully completed") == 1
    job = svc.client().fine_tuning.jobs.retrieve(first)
    assert job.status == "succeeded" and len(job.result_files) == 2 and job.model_extra["attempts"] == 1

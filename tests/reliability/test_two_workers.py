"""Two workers consume one queue: every job runs on exactly one of them, and a long job is
never handed to the second worker while the first is alive (its lease keeps being renewed,
and the broker's visibility timeout is far longer than any job)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from service.record.store import REQUEUE_MESSAGE
from tests.reliability.helpers import (
    create_job,
    docs,
    events,
    finished,
    log_lines,
    metrics_steps,
    runs_by_log,
    upload,
)

LEASE = 2  # the shortest allowed: the long job outlives many lease periods


@pytest.fixture(scope="module")
def svc(launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    s = launch_service(
        redis_url,
        tmp_path_factory.mktemp("two-workers"),
        workers=2,
        SECO_LEASE_SECONDS=str(LEASE),
        SECO_REAPER_INTERVAL="0.5",
    )
    yield s
    s.close()


def _owner(svc: Any, worker_field: str) -> int:
    """Which of the service's worker processes (index) has the pool child named in `worker`."""
    pid = int(worker_field.rsplit(":", 1)[1])
    for i, proc in enumerate(svc.workers):
        if pid in {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}:
            return i
    raise AssertionError(f"pid {pid} is not a child of any worker")


def test_each_job_runs_on_exactly_one_worker(svc: Any, tmp_path: Path, wait: Callable[..., Any]) -> None:
    store = svc.store()
    long_id = create_job(svc, upload(svc, tmp_path, docs(40, words=8)), epochs=50)
    long_worker = wait(
        lambda: (r := store.get_job(long_id)).status == "running" and r.worker,
        timeout=120,
        interval=0.1,
        what="the long job to start",
    )
    long_owner = _owner(svc, long_worker)

    # Short jobs submitted meanwhile can only go to the other worker.
    short_file = upload(svc, tmp_path, docs(4))
    shorts = [create_job(svc, short_file) for _ in range(2)]
    owners: dict[str, int] = {}
    started = time.monotonic()
    while len(owners) < len(shorts) or time.monotonic() - started < 6 * LEASE:
        for job_id in shorts:
            rec = store.get_job(job_id)
            if job_id not in owners and rec.status == "running" and rec.worker:
                owners[job_id] = _owner(svc, rec.worker)
        # the long job never changes hands while its worker is alive
        rec = store.get_job(long_id)
        assert rec.status == "running" and rec.worker == long_worker and rec.attempts == 0, rec
        assert time.monotonic() - started < 200, f"short jobs stuck: {owners}\n{svc.logs()}"
        time.sleep(0.1)
    for job_id in shorts:
        done = wait(lambda j=job_id: finished(svc, j), timeout=120, what=f"{job_id} to finish")
        assert done.status == "succeeded", (done.error, svc.logs())
    assert set(owners.values()) == {1 - long_owner}, owners
    assert store.get_job(long_id).worker == long_worker

    # Stop the long job; it ran many lease periods and was never requeued or redelivered.
    svc.client().fine_tuning.jobs.cancel(long_id)
    assert wait(lambda: finished(svc, long_id), timeout=60, what="the cancel").status == "cancelled"
    long_events = events(svc, long_id)
    assert REQUEUE_MESSAGE not in [e.message for e in long_events]
    steps = metrics_steps(long_events)
    assert steps == list(range(1, len(steps) + 1)) and steps, "one worker, one sequence of steps"

    # Each worker's own log: every job started exactly once, by the worker that owned it,
    # and the other worker never even saw the long job (not a skipped duplicate either).
    for job_id, owner in {**owners, long_id: long_owner}.items():
        assert runs_by_log(svc, job_id) == {f"worker-{owner}.log": 1}, (job_id, runs_by_log(svc, job_id))
    other = svc.log_dir / f"worker-{1 - long_owner}.log"
    assert not [r for r in log_lines(other) if r.get("job_id") == long_id]
    for job_id in shorts:
        assert [e.message for e in events(svc, job_id)].count("The job has successfully completed") == 1

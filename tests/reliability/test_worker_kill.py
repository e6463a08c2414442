"""The whole worker (Celery's main process *and* its pool child) killed with SIGKILL mid-job.

tests/worker/test_worker_recovery.py kills only the pool child: Celery's main process
survives, sees the child die and requeues the message itself. Here nothing of the worker
survives, so only the job lease and the reaper can bring the job back: the lease expires,
the API's reaper requeues it, a *new* worker process (started after the kill) resumes it
from its last checkpoint, and it finishes exactly once with every metrics step once.
On both storage back-ends: with S3 the new worker fetches the checkpoint from the store.
"""

from __future__ import annotations

import csv
import io
import signal
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from service.record.storage import keys
from service.record.store import REQUEUE_MESSAGE
from tests.conftest import flush_db
from tests.record_reads import list_checkpoints
from tests.reliability.helpers import (
    create_job,
    docs,
    events,
    finished,
    metrics_steps,
    runs_by_log,
    total_steps,
    upload,
)

LEASE = 3


@pytest.fixture(scope="module")
def svc(
    launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory, storage_backend: str
) -> Iterator[Any]:
    flush_db(redis_url)
    s = launch_service(
        redis_url,
        tmp_path_factory.mktemp(f"worker-kill-{storage_backend}"),
        workers=1,
        storage=storage_backend,
        SECO_CHECKPOINT_EVERY="3",
        SECO_LEASE_SECONDS=str(LEASE),
        SECO_REAPER_INTERVAL="0.5",
    )
    yield s
    s.close()


def test_whole_worker_sigkill_resumes_on_a_new_worker(svc: Any, tmp_path: Path, wait: Callable[..., Any]) -> None:
    job_id = create_job(svc, upload(svc, tmp_path, docs(40)))
    store = svc.store()
    wait(
        lambda: len(list_checkpoints(store, job_id, after=None, limit=100)[0]) >= 2,
        timeout=180,
        interval=0.1,
        what="two checkpoints",
    )

    # Kill the worker's whole process group at once: main process and pool child.
    old = svc.workers[0]
    family = [psutil.Process(old.pid), *psutil.Process(old.pid).children(recursive=True)]
    assert len(family) >= 2, "a prefork worker has a main process and a pool child"
    old_worker = store.get_job(job_id).worker
    svc.stop_worker(old, sig=signal.SIGKILL)
    _, alive = psutil.wait_procs(family, timeout=10)  # SIGKILLed; the kernel may take a moment to tear down
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
    killed_at = max(c.step for c in list_checkpoints(store, job_id, after=None, limit=100)[0])
    if (rec := store.get_job(job_id)).status != "running":
        pytest.fail(f"the job finished before the kill ({rec.status}); give it more steps")

    # No worker at all: the reaper requeues the job once its lease has expired.
    wait(
        lambda: store.get_job(job_id).status == "queued",
        timeout=LEASE * 4,
        interval=0.2,
        what="the reaper to requeue the job",
    )
    new = svc.start_worker()
    running = wait(
        lambda: (r := store.get_job(job_id)).status == "running" and r.worker,
        timeout=120,
        interval=0.1,
        what="the new worker to start the job",
    )
    new_family = {p.pid for p in psutil.Process(new.pid).children(recursive=True)}
    assert int(running.rsplit(":", 1)[1]) in new_family, "the new worker process runs the second attempt"
    done = wait(lambda: finished(svc, job_id), timeout=240, interval=0.5, what="the job to finish")
    assert done.status == "succeeded", (done.error, svc.logs())
    assert (done.model_extra or {})["attempts"] == 1

    evs = events(svc, job_id)
    messages = [e.message for e in evs]
    assert messages.count(REQUEUE_MESSAGE) == 1
    resumed = [m for m in messages if m.startswith("Fine-tuning job resumed on")]
    assert len(resumed) == 1 and "(attempt 2)" in resumed[0] and old_worker not in resumed[0], resumed
    [ck] = [e for e in evs if e.message.startswith("resumed from checkpoint at step")]
    assert ck.data["step"] >= killed_at, "resumed from the newest checkpoint, not from scratch"
    assert messages.count("The job has successfully completed") == 1
    # two runs in all (the killed one and the resumed one), never a third
    assert sum(runs_by_log(svc, job_id).values()) == 2, runs_by_log(svc, job_id)

    # every optimizer step reported exactly once, in the events and in the metrics CSV
    steps = metrics_steps(evs)
    assert steps == list(range(1, total_steps(evs) + 1))
    client = svc.client()
    csv_text = client.files.content(done.result_files[0]).read().decode()
    assert [int(r["step"]) for r in csv.DictReader(io.StringIO(csv_text))] == steps

    # exactly one adapter: two result files for this job, one archive in storage, no temp leftovers
    results = [f for f in client.files.list(purpose="fine-tune-results") if f.filename.startswith(job_id)]
    assert sorted(f.id for f in results) == sorted(done.result_files)
    prefix = keys.job_prefix(svc.tenant("a"), job_id)
    assert [k for k in svc.objects(prefix) if "/checkpoints/" not in k] == [
        f"{prefix}/adapter.tar.gz",
        f"{prefix}/metrics.csv",
    ]
    if svc.env.get("SECO_STORAGE_URL") is None:
        assert not [p for p in (svc.data_dir / prefix).rglob(".*")], "no temporary names left"
    with tarfile.open(fileobj=io.BytesIO(client.files.content(done.result_files[1]).read())) as tar:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(tar.getnames())

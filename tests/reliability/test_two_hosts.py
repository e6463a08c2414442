"""Hosts that share only Redis and the object store.

The API and each worker get a data dir of their own (their local scratch space, as on
separate machines); files, checkpoints and adapters live in S3 (the session's moto
server, reached through a fault-injecting proxy). One job survives two worker deaths:

1. its first worker is SIGKILLed in the middle of a checkpoint upload (the proxy holds
   the upload of that checkpoint's marker object, the other objects already written):
   the second worker, on another "host", resumes from the previous complete checkpoint,
   never from the half-uploaded one;
2. the second worker is SIGKILLed mid-job: a third one resumes from the newest
   checkpoint.

The job then succeeds once: every metrics step appears once in the events and in the
metrics CSV, one adapter exists and the API (which never saw a worker's disk) serves it.
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
from tests.record_reads import list_checkpoints
from tests.reliability.helpers import create_job, docs, events, finished, metrics_steps, total_steps, upload
from tests.reliability.s3_proxy import FaultProxy

LEASE = 3
EVERY = 3  # checkpoint every 3 steps


@pytest.fixture(scope="module")
def hosts(
    launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory, s3_server: Any
) -> Iterator[tuple[Any, FaultProxy, Path]]:
    tmp = tmp_path_factory.mktemp("two-hosts")
    with FaultProxy(s3_server.endpoint) as proxy:
        svc = launch_service(
            redis_url,
            tmp / "api-host",
            storage="s3",
            s3_endpoint=proxy.endpoint,
            SECO_CHECKPOINT_EVERY=str(EVERY),
            SECO_LEASE_SECONDS=str(LEASE),
            SECO_REAPER_INTERVAL="0.5",
        )
        try:
            yield svc, proxy, tmp
        finally:
            svc.close()


def _owner(svc: Any, worker_field: str) -> Any:
    """The live worker process (of `svc.workers`) whose pool child runs the job, else None."""
    pid = int(worker_field.rsplit(":", 1)[1])
    for proc in svc.workers:
        if pid in {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}:
            return proc
    return None  # a killed worker's id stays on the record until the reaper requeues the job


def _running_on(svc: Any, job_id: str, wait: Callable[..., Any], not_on: Any = None) -> Any:
    store = svc.store()

    def owner() -> Any:
        rec = store.get_job(job_id)
        if rec.status != "running" or not rec.worker:
            return None
        proc = _owner(svc, rec.worker)
        return proc if proc is not None and proc is not not_on else None

    return wait(owner, timeout=120, interval=0.1, what="a worker to run the job")


def test_a_job_survives_two_worker_deaths_across_hosts(
    hosts: tuple[Any, FaultProxy, Path], wait: Callable[..., Any]
) -> None:
    svc, proxy, tmp = hosts
    host_dirs = {name: tmp / name for name in ("host-1", "host-2", "host-3")}
    job_id = create_job(svc, upload(svc, tmp, docs(40)))
    prefix = keys.job_prefix(svc.tenant("a"), job_id)
    ckpts = f"{prefix}/checkpoints"
    # hold the upload of the second checkpoint's marker: its other objects get written first
    hang = proxy.add("hang", f"{ckpts}/step-{2 * EVERY:06d}/checkpoint.json")
    w1 = svc.start_worker(SECO_DATA_DIR=str(host_dirs["host-1"]))
    w2 = svc.start_worker(SECO_DATA_DIR=str(host_dirs["host-2"]))
    first = _running_on(svc, job_id, wait)

    # 1. killed in the middle of a checkpoint upload
    assert hang.hit.wait(180), f"the checkpoint upload never started\n{svc.logs()}"
    storage = svc.storage()
    half = [o.key for o in storage.list_under(f"{ckpts}/step-{2 * EVERY:06d}")]
    assert half and not any(k.endswith("/checkpoint.json") for k in half), "objects written, marker not"
    assert storage.complete_dirs(ckpts, "checkpoint.json") == [f"step-{EVERY:06d}"]
    svc.stop_worker(first, sig=signal.SIGKILL)
    proxy.remove(hang)
    second = _running_on(svc, job_id, wait, not_on=first)
    assert second is (w2 if first is w1 else w1)
    resumed = wait(
        lambda: [e for e in events(svc, job_id) if e.message.startswith("resumed from checkpoint")],
        timeout=120,
        what="the resume",
    )
    assert resumed[0].data["step"] == EVERY, "resumed from the last complete checkpoint, not the half-uploaded one"

    # 2. killed mid-job (between checkpoints, no upload held); a third host takes over
    store = svc.store()
    wait(
        lambda: any(c.step >= 4 * EVERY for c in list_checkpoints(store, job_id, after=None, limit=100)[0]),
        timeout=180,
        interval=0.1,
        what="more checkpoints",
    )
    svc.stop_worker(second, sig=signal.SIGKILL)
    newest = max(c.step for c in list_checkpoints(store, job_id, after=None, limit=100)[0])
    assert store.get_job(job_id).status == "running", "the job must still be running when its worker dies"
    svc.start_worker(SECO_DATA_DIR=str(host_dirs["host-3"]))
    done = wait(lambda: finished(svc, job_id), timeout=300, interval=0.5, what="the job to finish")
    assert done.status == "succeeded", (done.error, svc.logs())

    evs = events(svc, job_id)
    resumes = [e.data["step"] for e in evs if e.message.startswith("resumed from checkpoint")]
    assert resumes[0] == EVERY and len(resumes) == 2 and resumes[1] >= newest, resumes
    steps = metrics_steps(evs)
    assert steps == list(range(1, total_steps(evs) + 1)), "every metrics step exactly once"
    assert [e.message for e in evs].count("The job has successfully completed") == 1

    client = svc.client()
    csv_text = client.files.content(done.result_files[0]).read().decode()
    assert [int(r["step"]) for r in csv.DictReader(io.StringIO(csv_text))] == steps
    adapter = client.files.content(done.result_files[1]).read()
    with svc.http() as http:
        assert http.get(f"/v1/fine_tuning/jobs/{job_id}/adapter").content == adapter
    with tarfile.open(fileobj=io.BytesIO(adapter)) as tar:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(tar.getnames())
    results = [f for f in client.files.list(purpose="fine-tune-results") if f.filename.startswith(job_id)]
    assert sorted(f.id for f in results) == sorted(done.result_files), "one adapter, one metrics file"
    assert [k for k in svc.objects(prefix) if "/checkpoints/" not in k] == [
        f"{prefix}/adapter.tar.gz",
        f"{prefix}/metrics.csv",
    ]

    # nothing of the job on any host's disk: the API's holds no job files, the finishing
    # worker cleaned its scratch space (the killed ones could not; a restart there sweeps it)
    assert not list(svc.data_dir.rglob(f"*{job_id}*"))
    wait(lambda: not list(host_dirs["host-3"].rglob(f"{job_id}*")), timeout=10, what="host-3 scratch cleaned")

"""Storage full, down or unwritable while a worker saves a checkpoint or the adapter, on
both back-ends.

Real storage, no monkeypatching. Local directory: a job's directory is made, before a
worker picks the job up, into a tiny tmpfs (disk full), a read-only tmpfs (unwritable),
or holds an obstacle where the adapter archive must go. S3: the worker reaches the
store through a proxy (tests/reliability/s3_proxy.py) that drops the job's checkpoint
uploads (store down), answers 403 AccessDenied to every write under the job's prefix,
or to the adapter archive only. Each job must fail with `storage_error` and a message
that says what happened without paths, URLs or credentials, and nothing half-written may
ever be served as an adapter or trusted as a checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.record.storage import keys
from tests.conftest import S3_BUCKET, S3_CREDENTIALS, flush_db, wait_for
from tests.reliability.helpers import create_job, docs, finished, upload
from tests.reliability.s3_proxy import FaultProxy

# case -> the reason each back-end gives in the job's error
REASONS = {
    "local": {
        "full_or_down": "no space left on device",
        "unwritable": "read-only file system",
        "adapter_blocked": "is a directory",
    },
    "s3": {
        "full_or_down": "the object store is unreachable",
        "unwritable": "access denied by the object store",
        "adapter_blocked": "access denied by the object store",
    },
}


def _mount_tmpfs(where: Path, size: str, read_only: bool = False) -> bool:
    """Mount a small tmpfs (needs root / CAP_SYS_ADMIN); False where that is not possible."""
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, timeout=10)
    return r.returncode == 0


@pytest.fixture(scope="module")
def outcome(
    launch_service: Callable[..., Any],
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    storage_backend: str,
    request: pytest.FixtureRequest,
) -> Iterator[dict[str, Any]]:
    """Queue one job per fault while no worker runs, prepare its storage, then let a worker run them all."""
    tmp = tmp_path_factory.mktemp(f"storage-faults-{storage_backend}")
    flush_db(redis_url)
    mounts: list[Path] = []
    with contextlib.ExitStack() as stack:
        endpoint = None
        if storage_backend == "s3":
            proxy = stack.enter_context(FaultProxy(request.getfixturevalue("s3_server").endpoint))
            endpoint = proxy.endpoint
        svc = launch_service(redis_url, tmp, storage=storage_backend, s3_endpoint=endpoint, SECO_CHECKPOINT_EVERY="2")
        stack.callback(svc.close)
        tenant = svc.tenant("a")
        file_id = upload(svc, tmp, docs(4))
        jobs = {case: create_job(svc, file_id) for case in ("adapter_blocked", "full_or_down", "unwritable")}
        if storage_backend == "s3":
            proxy.add("deny", keys.result_key(tenant, jobs["adapter_blocked"], "adapter.tar.gz"))
            proxy.add("down", keys.checkpoints_prefix(tenant, jobs["full_or_down"]))
            proxy.add("deny", keys.job_prefix(tenant, jobs["unwritable"]))
        else:
            # the archive's final name is taken by a non-empty directory: the rename onto it fails
            job_dir = svc.data_dir / keys.job_prefix(tenant, jobs["adapter_blocked"])
            (job_dir / "adapter.tar.gz" / "keep").mkdir(parents=True)
            for case, size, ro in (("full_or_down", "24k", False), ("unwritable", "1m", True)):
                where = svc.data_dir / keys.job_prefix(tenant, jobs[case])
                if _mount_tmpfs(where, size, ro):
                    mounts.append(where)
                else:
                    svc.client().fine_tuning.jobs.cancel(jobs.pop(case))
        for where in mounts:
            stack.callback(lambda w=where: subprocess.run(["umount", "-l", str(w)], timeout=10))
        svc.start_worker()
        done = {
            case: wait_for(functools.partial(finished, svc, job_id), timeout=180, what=case)
            for case, job_id in jobs.items()
        }
        yield {"svc": svc, "jobs": jobs, "done": done, "backend": storage_backend}


def _check(outcome: dict[str, Any], case: str) -> str:
    """The common verdict: failed with a storage error naming the reason, no adapter anywhere."""
    if case not in outcome["jobs"]:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    svc, job_id, done, backend = outcome["svc"], outcome["jobs"][case], outcome["done"][case], outcome["backend"]
    assert done.status == "failed", (case, done.status, svc.logs())
    message = done.error.message
    assert done.error.code == "storage_error" and REASONS[backend][case] in message, done.error
    assert ("SECO_DATA_DIR" if backend == "local" else "SECO_STORAGE_URL") in message
    for secret in (str(svc.data_dir), "127.0.0.1", "http", S3_BUCKET, *S3_CREDENTIALS.values()):
        assert secret not in message, f"{secret!r} leaked into {message!r}"
    assert done.result_files == [] and done.fine_tuned_model is None
    with svc.http() as http:
        r = http.get(f"/v1/fine_tuning/jobs/{job_id}/adapter")
        assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_not_ready"
    assert not [f for f in svc.client().files.list(purpose="fine-tune-results") if f.filename.startswith(job_id)]
    prefix = keys.job_prefix(svc.tenant("a"), job_id)
    storage = svc.storage()
    assert storage.size(f"{prefix}/adapter.tar.gz") is None, "no adapter object"
    # a checkpoint a resume could load is always complete (half-written ones have no marker)
    for step in storage.complete_dirs(f"{prefix}/checkpoints", "checkpoint.json"):
        names = {o.key.rsplit("/", 1)[1] for o in storage.list_under(f"{prefix}/checkpoints/{step}")}
        assert {"checkpoint.json", "trainer_state.pt", "adapter_model.safetensors"} <= names, step
    assert not list(svc.data_dir.glob(f"scratch/*/jobs/{job_id}.*")), "the worker cleaned its scratch space"
    return prefix


def test_storage_full_or_down_at_a_checkpoint(outcome: dict[str, Any]) -> None:
    prefix = _check(outcome, "full_or_down")
    storage = outcome["svc"].storage()
    assert not storage.complete_dirs(f"{prefix}/checkpoints", "checkpoint.json"), "the checkpoint is not published"


def test_job_storage_unwritable(outcome: dict[str, Any]) -> None:
    _check(outcome, "unwritable")


def test_adapter_archive_cannot_be_written(outcome: dict[str, Any]) -> None:
    prefix = _check(outcome, "adapter_blocked")
    svc = outcome["svc"]
    assert svc.storage().complete_dirs(f"{prefix}/checkpoints", "checkpoint.json"), "checkpoints were saved"
    if outcome["backend"] == "local":
        job_dir = svc.data_dir / prefix
        assert (job_dir / "adapter.tar.gz" / "keep").is_dir(), "the obstacle is untouched"
        assert not [p.name for p in job_dir.iterdir() if p.name.startswith(".")], "the temporary archive is removed"

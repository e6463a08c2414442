"""The data dir full or unwritable while a worker saves a checkpoint or the adapter.

Real paths, no monkeypatching: a job's directory is made, before a worker picks the job
up, into a tiny tmpfs (disk full), a read-only tmpfs (unwritable), or a directory with an
obstacle where the adapter archive must go. Each job must fail with an error that says
what happened, and nothing half-written may ever be served as an adapter.
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.reliability.helpers import create_job, docs, finished, upload


def _mount_tmpfs(where: Path, size: str, read_only: bool = False) -> bool:
    """Mount a small tmpfs (needs root / CAP_SYS_ADMIN); False where that is not possible."""
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, timeout=10)
    return r.returncode == 0


@pytest.fixture(scope="module")
def outcome(
    launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """Queue one job per fault while no worker runs, prepare its directory, then let a worker run them all."""
    tmp = tmp_path_factory.mktemp("storage-faults")
    svc = launch_service(redis_url, tmp, SECO_CHECKPOINT_EVERY="2")
    mounts: list[Path] = []
    try:
        file_id = upload(svc, tmp, docs(4))
        jobs: dict[str, str] = {}
        jobs["adapter_blocked"] = create_job(svc, file_id)
        # the archive's final name is taken by a non-empty directory: the rename onto it fails
        blocked = svc.data_dir / "jobs" / jobs["adapter_blocked"] / "adapter.tar.gz"
        (blocked / "keep").mkdir(parents=True)
        for case, size, ro in (("disk_full", "24k", False), ("read_only", "1m", True)):
            job_id = create_job(svc, file_id)
            where = svc.data_dir / "jobs" / job_id
            if _mount_tmpfs(where, size, ro):
                mounts.append(where)
                jobs[case] = job_id
            else:
                svc.client().fine_tuning.jobs.cancel(job_id)
        svc.start_worker()
        done = {case: wait_for(functools.partial(finished, svc, job_id), timeout=180, what=case)
                for case, job_id in jobs.items()}  # fmt: skip
        yield {"svc": svc, "jobs": jobs, "done": done}
    finally:
        svc.close()
        for where in mounts:
            with contextlib.suppress(Exception):
                subprocess.run(["umount", "-l", str(where)], timeout=10)


def _check(outcome: dict[str, Any], case: str, reason: str) -> Path:
    """The common verdict: failed with a storage error naming `reason`, no adapter anywhere."""
    if case not in outcome["jobs"]:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    svc, job_id, done = outcome["svc"], outcome["jobs"][case], outcome["done"][case]
    assert done.status == "failed", (case, done.status, svc.logs())
    assert done.error.code == "storage_error" and reason in done.error.message, done.error
    assert "SECO_DATA_DIR" in done.error.message and str(svc.data_dir) not in done.error.message, "no server paths"
    assert done.result_files == [] and done.fine_tuned_model is None
    with svc.http() as http:
        r = http.get(f"/v1/fine_tuning/jobs/{job_id}/adapter")
        assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_not_ready"
    assert not [f for f in svc.client().files.list(purpose="fine-tune-results") if f.filename.startswith(job_id)]
    job_dir: Path = svc.data_dir / "jobs" / job_id
    assert not (job_dir / "adapter.tar.gz").is_file()
    # a checkpoint a resume could load is always complete (half-written ones keep a temp name)
    for ck in (job_dir / "checkpoints").glob("step-*"):
        assert {"checkpoint.json", "trainer_state.pt", "adapter"} <= {p.name for p in ck.iterdir()}, ck
    return job_dir


def test_disk_full_at_a_checkpoint(outcome: dict[str, Any]) -> None:
    job_dir = _check(outcome, "disk_full", "no space left on device")
    assert not list((job_dir / "checkpoints").glob("step-*")), "the checkpoint that did not fit is not published"


def test_read_only_job_dir(outcome: dict[str, Any]) -> None:
    _check(outcome, "read_only", "read-only file system")


def test_adapter_archive_cannot_be_written(outcome: dict[str, Any]) -> None:
    job_dir = _check(outcome, "adapter_blocked", "is a directory")
    assert (job_dir / "adapter.tar.gz" / "keep").is_dir(), "the obstacle is untouched"
    assert not [p.name for p in job_dir.iterdir() if p.name.startswith(".")], "the temporary archive is removed"

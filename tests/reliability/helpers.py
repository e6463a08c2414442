"""Small helpers shared by the reliability tests: SSE parsing, uploads, logs, restarts.

Kept as plain functions (not fixtures) so each test reads top to bottom and says which
real process it starts, kills or restarts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.conftest import wait_healthy

ROOT = Path(__file__).resolve().parents[2]

# A job the tiny demo model trains in a few seconds on one CPU core.
SECO = {"chunk_size": 16, "max_length": 64, "lora": {"r": 4, "alpha": 8}}


def docs(n: int, words: int = 5) -> list[dict[str, str]]:
    """`n` short text records: with max_length 64, one training window each."""
    return [{"text": f"record {i} " + "abc def ghi " * words} for i in range(n)]


def upload(svc: Any, tmp: Path, records: list[dict[str, Any]], tenant: str = "a") -> str:
    """Upload `records` as a JSONL training file through the SDK; returns the file id."""
    path = tmp / f"upload-{time.monotonic_ns()}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with path.open("rb") as fh:
        return str(svc.client(tenant).files.create(file=fh, purpose="fine-tune").id)


def create_job(svc: Any, file_id: str, *, epochs: int = 1, tenant: str = "a", **seco: Any) -> str:
    """A job with batch size 1 (one optimizer step per record and epoch)."""
    job = svc.client(tenant).fine_tuning.jobs.create(
        model="tiny",
        training_file=file_id,
        hyperparameters={"n_epochs": epochs, "batch_size": 1},
        extra_body={"seco": {**SECO, **seco}},
    )
    return str(job.id)


def events(svc: Any, job_id: str, tenant: str = "a") -> list[Any]:
    """Every event of a job, oldest first (the API lists newest first)."""
    return list(reversed(list(svc.client(tenant).fine_tuning.jobs.list_events(job_id, limit=1000))))


def metrics_steps(evs: list[Any]) -> list[int]:
    return [int(e.data["step"]) for e in evs if e.type == "metrics"]


def total_steps(evs: list[Any]) -> int:
    return int(next(e.data["total_steps"] for e in evs if e.type == "metrics"))


def finished(svc: Any, job_id: str, tenant: str = "a") -> Any:
    """The job once it is terminal, else None (for `wait`)."""
    job = svc.client(tenant).fine_tuning.jobs.retrieve(job_id)
    return job if job.status in ("succeeded", "failed", "cancelled") else None


def log_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a service log (Celery's own plain lines are skipped)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def runs_by_log(svc: Any, job_id: str) -> dict[str, int]:
    """How many times each worker's log says it started `job_id` ("job started" lines)."""
    counts: dict[str, int] = {}
    for path in sorted(svc.log_dir.glob("worker-*.log")):
        n = sum(1 for r in log_lines(path) if r.get("msg") == "job started" and r.get("job_id") == job_id)
        if n:
            counts[path.name] = n
    return counts


def kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Signal a process started with `start_new_session=True` and all of its children."""
    os.killpg(proc.pid, sig)
    proc.wait(30)


def restart_api(svc: Any, sig: int = signal.SIGKILL) -> None:
    """Kill the API process and start a new one on the same port with the same environment."""
    from service.launch import api_argv

    assert svc.api is not None
    kill_group(svc.api, sig)
    port = int(svc.url.rsplit(":", 1)[1])
    log = open(svc.log_dir / "api.log", "ab")  # noqa: SIM115 (owned by the process)
    svc.api = subprocess.Popen(
        api_argv("127.0.0.1", port, svc.env), cwd=ROOT, env=svc.env, stdout=log, stderr=log, start_new_session=True
    )
    wait_healthy(svc)

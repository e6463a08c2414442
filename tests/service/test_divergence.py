"""A diverging job through the real service: the official SDK sees it fail with code
`training_diverged`, a message naming the step and the last finite loss, and its good
checkpoints kept and listed.

The step's gradient is made non-finite by a test-only hook in the worker process
(tests/service/diverging_worker/sitecustomize.py: the tiny CPU model does not diverge on
its own within the API's bounds); the check that stops the job is the real one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.record.storage import keys
from tests.conftest import ROOT, flush_db

HOOK = Path(__file__).parent / "diverging_worker"


@pytest.fixture(scope="module")
def svc(launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    flush_db(redis_url)
    s = launch_service(redis_url, tmp_path_factory.mktemp("diverge"), SECO_CHECKPOINT_EVERY="1")
    s.start_worker(PYTHONPATH=f"{HOOK}:{ROOT}", SECO_TEST_DIVERGE_AT="3")
    yield s
    s.close()


def test_a_diverging_job_fails_clearly_and_keeps_its_checkpoints(
    svc: Any, tmp_path: Path, wait: Callable[..., Any]
) -> None:
    client = svc.client()
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"doc {i}: " + "the quick brown fox. " * 3}) + "\n" for i in range(8)))
    upload = client.files.create(file=data.open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=upload.id,
        hyperparameters={"n_epochs": 1, "batch_size": 2},
        extra_body={"seco": {"chunk_size": 16, "max_length": 64, "lora": {"r": 4, "alpha": 8}}},
    )
    done = wait(
        lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("failed", "succeeded") and j,
        timeout=240,
        what="the job to end",
    )

    assert done.status == "failed", svc.logs()
    assert done.error and done.error.code == "training_diverged"
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    metrics = [e.data for e in reversed(events) if e.type == "metrics"]
    assert [m["step"] for m in metrics] == [1, 2], "step 3 was never applied nor reported"
    last_loss = metrics[-1]["train_loss"]
    assert done.error.message.startswith("Training diverged at step 3: the gradient is not finite")
    assert f"the last finite training loss was {last_loss:.6g} at step 2" in done.error.message
    assert "the last good checkpoint (step 2) is kept" in done.error.message
    assert events[0].level == "error" and events[0].message == done.error.message
    assert done.fine_tuned_model is None and done.result_files == []

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [2, 1]
    assert checkpoints[0].metrics.train_loss == last_loss
    stored = svc.storage().complete_dirs(f"{keys.job_prefix(svc.tenant('a'), job.id)}/checkpoints", "checkpoint.json")
    assert stored == ["step-000001", "step-000002"], "the good checkpoints are still in storage"

"""Long-context evaluation through the real path (openai SDK -> API -> Valkey -> Celery worker
-> trainer): the validation loss by position bucket in the metrics events (a step-0 row for the
starting model first), the metrics CSV and the job's events; and the memory plan of a worker
that shares its device with `seco serve` (SECO_SERVE_MEMORY_BYTES) in the job's plan event."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import flush_db

GiB = 2**30
LONG_VALID = "The lazy dog sleeps while the quick brown fox jumps. " * 21
"""1113 bytes: one byte-level validation window with targets at positions 1..1113 (the last
one the end-of-text token): buckets 0-1K and 1K-4K."""


@pytest.fixture(scope="module")
def svc(launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    flush_db(redis_url)
    s = launch_service(
        redis_url,
        tmp_path_factory.mktemp("position-loss"),
        workers=1,
        SECO_CHECKPOINT_EVERY="1",
        SECO_MEMORY_BUDGET=str(4 * GiB),
        SECO_SERVE_MEMORY_BYTES=str(GiB),
        SECO_SERVE_DEVICE="cpu",  # the worker's device (SECO_DEVICE=cpu)
    )
    yield s
    s.close()


def test_a_job_reports_the_loss_by_position_from_step_0(svc: Any, tmp_path: Any, wait: Callable[..., Any]) -> None:
    client = svc.client()
    train = tmp_path / "train.jsonl"
    train.write_text(
        "".join(json.dumps({"text": f"doc {i}: the quick brown fox jumps. " * 4}) + "\n" for i in range(4))
    )
    valid = tmp_path / "valid.jsonl"
    valid.write_text(json.dumps({"text": LONG_VALID}) + "\n")
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=client.files.create(file=train.open("rb"), purpose="fine-tune").id,
        validation_file=client.files.create(file=valid.open("rb"), purpose="fine-tune").id,
        hyperparameters={"n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 20},
        extra_body={"seco": {"chunk_size": 64, "max_length": 1200, "lora": {"r": 4, "alpha": 8}}},
    )
    done = wait(
        lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed") and j,
        timeout=240,
        what="the job to finish",
    )
    assert done.status == "succeeded", (done.error, svc.logs())
    events = list(reversed(list(client.fine_tuning.jobs.list_events(job.id, limit=200))))

    # metrics events: step 0 is the starting model (no training loss), then one per step, each validated
    metrics = [e for e in events if e.type == "metrics"]
    assert [e.data["step"] for e in metrics] == [0, 1, 2]  # type: ignore[index]
    assert metrics[0].message.startswith("Step 0/2 (the starting model, before training): validation loss=")
    assert "train_loss" not in metrics[0].data  # type: ignore[operator]
    by_position = [e.data["valid_loss_by_position"] for e in metrics]  # type: ignore[index]
    assert all(list(b) == ["0-1K", "1K-4K"] for b in by_position), by_position
    start, final = by_position[0], by_position[-1]
    assert all(final[k] < start[k] for k in start), (start, final)

    # the job's events compare each bucket with step 0, in a sentence
    compared = [e for e in events if e.message.startswith("validation loss by position")]
    assert [e.data["step"] for e in compared] == [1, 2]  # type: ignore[index]
    assert compared[-1].message == (
        "validation loss by position after training, starting model -> final: "
        f"loss at 0-1K: {start['0-1K']:.2f} -> {final['0-1K']:.2f}, "
        f"loss at 1K-4K: {start['1K-4K']:.2f} -> {final['1K-4K']:.2f}"
    )

    # the metrics CSV (result_files[0]): a column per bucket present, a step-0 row
    rows = list(csv.DictReader(io.StringIO(client.files.content(done.result_files[0]).read().decode())))
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert list(rows[0])[-2:] == ["valid_loss_0_1k", "valid_loss_1k_4k"]
    assert rows[0]["train_loss"] == "" and float(rows[0]["valid_loss_0_1k"]) == start["0-1K"]
    assert float(rows[2]["valid_loss_1k_4k"]) == final["1K-4K"]


def test_the_plan_keeps_the_serving_share_of_a_shared_device(svc: Any, tmp_path: Any, wait: Callable[..., Any]) -> None:
    client = svc.client()
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"text": "the quick brown fox jumps. " * 3}) + "\n")
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=client.files.create(file=train.open("rb"), purpose="fine-tune").id,
        hyperparameters={"n_epochs": 1},
        extra_body={"seco": {"chunk_size": 16, "max_length": 64, "lora": {"r": 4}}},
    )

    def plan_event() -> Any:
        found = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if "memory_plan" in (e.data or {})]
        return found[0] if found else None

    event = wait(plan_event, timeout=120, what="the plan event")
    assert event.data["serve_memory_bytes"] == GiB and event.data["budget_bytes"] == 3 * GiB, event.data
    assert "of 3.00 GiB" in event.message
    assert "(1.00 GiB of the device kept for `seco serve` on cpu, SECO_SERVE_MEMORY_BYTES)" in event.message

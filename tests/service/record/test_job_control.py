"""Pause and resume in the store's state machine, and fine-tuned model names (no HTTP, no Celery)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from service.record.models import ModelName, checkpoint_model_name, fine_tuned_model_name, parse_model_name
from service.record.storage import LocalStorage
from service.record.store import Store
from tests.record_reads import read_events
from tests.service.record.test_store import T1, make_file, make_job, settings_for
from worker.spec import JobPaused, TrainContext, TrainResult, TrainSpec
from worker.tasks import train_next_job


@pytest.fixture
def store(redis_url: str) -> Store:
    s = Store.from_url(redis_url)
    s.r.flushdb()
    return s


@pytest.fixture
def data(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "data")


def test_a_queued_job_pauses_at_once_resumes_and_can_be_cancelled(store: Store, data: LocalStorage) -> None:
    job = make_job(store, make_file(store, data).id)
    assert store.request_pause(job) == "paused"
    assert store.get_job(job).status == "paused"  # type: ignore[union-attr]
    assert store.queue_order() == [], "a paused job is out of the queue"
    assert store.request_pause(job) == "paused", "pausing again changes nothing"
    assert store.resume(job) == (True, "paused") and store.queue_order() == [job]
    assert store.resume(job) == (False, "queued"), "only a paused job resumes"
    assert store.request_pause(job) == "paused"
    assert store.request_cancel(job) == "cancelled"
    assert store.request_pause(job) == "cancelled" and store.resume(job) == (False, "cancelled")
    messages = [e.message for e in read_events(store, job)]
    assert messages.count("Fine-tuning job paused") == 2 and any(
        m.startswith("Fine-tuning job resumed") for m in messages
    )


def test_a_running_job_is_flagged_and_only_its_worker_pauses_it(store: Store, data: LocalStorage) -> None:
    job = make_job(store, make_file(store, data).id)
    assert store.start_job(job, "w1", 30)
    assert store.request_pause(job) == "running" and store.stop_requests(job) == (False, True)
    assert store.request_pause(job) == "running"
    assert [e.message for e in read_events(store, job)].count(
        "Pause requested; the job stops after its current step, with a checkpoint"
    ) == 1, "one event however often it is asked"
    assert not store.transition(job, ["running"], "paused")[0], "not without the owner"
    assert not store.pause_running(job, "w2", 3), "not by another worker"
    assert store.pause_running(job, "w1", 3)
    rec = store.get_job(job)
    assert rec is not None and rec.status == "paused" and not rec.pause_requested and rec.worker is None
    assert not store.r.sismember("seco:running", job) and not store.r.exists(f"seco:lease:{job}")
    assert store.resume(job) == (True, "paused")


def test_the_reaper_pauses_a_job_whose_worker_died_after_a_pause_request(store: Store, data: LocalStorage) -> None:
    job = make_job(store, make_file(store, data).id)
    assert store.start_job(job, "w1", 0.2)
    store.request_pause(job)
    time.sleep(0.4)  # the lease expires
    assert store.reap_expired(max_attempts=3) == [], "nothing to requeue: it is paused"
    assert store.get_job(job).status == "paused"  # type: ignore[union-attr]


def test_train_next_job_pauses_after_the_checkpoint(store: Store, data: LocalStorage, tmp_path: Path) -> None:
    """The task turns the loop's JobPaused into `paused`; the worker is then free (the task returns)."""
    settings = settings_for(store, data, tmp_path)
    job = make_job(store, make_file(store, data).id)

    def train(spec: TrainSpec, ctx: TrainContext) -> TrainResult:
        store.request_pause(job)
        assert ctx.pause_requested()
        raise JobPaused(4)

    assert train_next_job(settings, store, worker_id="w", train=train) == "paused"
    rec = store.get_job(job)
    assert rec is not None and rec.status == "paused"
    assert "Fine-tuning job paused at step 4; resume continues from its checkpoint" in [
        e.message for e in read_events(store, job)
    ]


@pytest.mark.parametrize("suffix", [None, "my_suffix-2"])
def test_model_names_round_trip(suffix: Any) -> None:
    job = "ftjob-" + "ab" * 12
    name = fine_tuned_model_name("tiny", T1, suffix, job)
    assert name == f"ft:tiny:org-{T1}:{suffix or ''}:{'ab' * 12}"
    assert parse_model_name(name) == ModelName(base="tiny", org=f"org-{T1}", suffix=suffix, job_id=job)
    ckpt = checkpoint_model_name("tiny", T1, suffix, job, 12)
    assert ckpt == name + ":ckpt-step-12"
    parsed = parse_model_name(ckpt)
    assert parsed is not None and parsed.step == 12 and parsed.format() == ckpt and parsed.tenant == T1


ORG, HEX = "org-" + "0" * 16, "ab" * 12
NOT_NAMES = [
    "tiny",
    "ft:tiny",
    f"ft:tiny:org-x::{HEX}",
    f"ft::{ORG}::{HEX}",
    f"ft:tiny:{ORG}::xyz",
    f"ft:tiny:{ORG}::{HEX}:ckpt-step-x",
    f"ft:tiny:{ORG}:{HEX}:ckpt-step-1",
]


@pytest.mark.parametrize("name", NOT_NAMES)
def test_other_names_are_not_fine_tuned_model_names(name: str) -> None:
    assert parse_model_name(name) is None


def test_cancel_wins_over_a_pending_pause_in_the_store(store: Store, data: LocalStorage) -> None:
    """The worker ending a pause, a resume and the reaper all cancel a job whose cancel is pending."""
    job = make_job(store, make_file(store, data).id)
    assert store.start_job(job, "w1", 30)
    assert store.request_pause(job) == "running" and store.request_cancel(job) == "running"
    assert store.stop_requests(job) == (True, True)
    assert store.pause_running(job, "w1", 3) == "cancelled"
    rec = store.get_job(job)
    assert rec is not None and rec.status == "cancelled" and rec.finished_at

    paused = make_job(store, make_file(store, data).id)  # a job paused with a cancel flag left on it
    assert store.request_pause(paused) == "paused"
    store.r.hset(f"seco:job:{paused}", "cancel_requested", "1")
    assert store.resume(paused) == (False, "cancelled") and store.queue_order() == []
    assert store.get_job(paused).status == "cancelled"  # type: ignore[union-attr]

    orphan = make_job(store, make_file(store, data).id)  # its worker died with both flags set
    assert store.start_job(orphan, "w1", 0.05)
    assert store.request_cancel(orphan) == "running"
    store.r.hset(f"seco:job:{orphan}", "pause_requested", "1")
    time.sleep(0.1)
    assert store.reap_expired(3) == [] and store.get_job(orphan).status == "cancelled"  # type: ignore[union-attr]


def test_a_pause_asked_after_a_cancel_sets_no_pause(store: Store, data: LocalStorage) -> None:
    job = make_job(store, make_file(store, data).id)
    assert store.start_job(job, "w1", 30)
    assert store.request_cancel(job) == "running" and store.request_pause(job) == "running"
    assert store.stop_requests(job) == (True, False)
    assert "Pause requested" not in " ".join(e.message for e in read_events(store, job))

"""The merged-model state on a job (`service/record/store/merges.py`) against a real Redis: who
starts a build, what a late or abandoned build may still record, and what deletion drops."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.record.outputs import delete_outputs
from service.record.storage.local import LocalStorage
from service.record.store import Store
from tests.service.record.test_store import fake_train, make_file, make_job, settings_for
from worker.tasks import train_next_job


@pytest.fixture
def store(redis_url: str) -> Store:
    s = Store.from_url(redis_url)
    s.r.flushdb()
    return s


@pytest.fixture
def job(store: Store, tmp_path: Path) -> str:
    data = LocalStorage(tmp_path / "data")
    job_id = make_job(store, make_file(store, data).id)
    assert train_next_job(settings_for(store, data, tmp_path), store, worker_id="w", train=fake_train) == "succeeded"
    return job_id


def test_only_a_succeeded_job_with_its_adapter_gets_a_build(store: Store, tmp_path: Path) -> None:
    data = LocalStorage(tmp_path / "data")
    queued = make_job(store, make_file(store, data).id)
    found = store.merges.request(queued)
    assert found.job_status == "queued" and found.state is None and not found.build
    assert store.merges.request("ftjob-0123456789abcdef01234567").job_status == ""


def test_one_build_for_racing_requests_and_only_its_token_settles_it(store: Store, job: str) -> None:
    first = store.merges.request(job)
    assert first.build and first.state is not None
    again = store.merges.request(job)
    assert not again.build and again.state == first.state
    assert not store.merges.settle_ready(job, "0" * 16, 10), "another build's token records nothing"
    assert not store.merges.forget(job, "0" * 16)
    assert store.merges.is_current(job, first.state.token)
    assert store.merges.settle_ready(job, first.state.token, 1234)
    ready = store.merges.request(job)
    assert ready.state is not None and ready.state.status == "ready" and ready.state.bytes == 1234
    assert not store.merges.settle_failed(job, first.state.token, "x", "y"), "a settled build stays settled"


def test_an_abandoned_build_is_started_again_and_the_late_one_cannot_settle(store: Store, job: str) -> None:
    first = store.merges.request(job)
    assert first.state is not None
    second = store.merges.request(job, abandon_seconds=0)
    assert second.build and second.state is not None and second.state.token != first.state.token
    assert not store.merges.is_current(job, first.state.token)
    assert not store.merges.settle_ready(job, first.state.token, 1), "the abandoned build's outcome is dropped"
    assert store.merges.settle_failed(job, second.state.token, "merge_failed", "boom")


def test_deleting_the_outputs_drops_the_state(store: Store, job: str, tmp_path: Path) -> None:
    found = store.merges.request(job)
    assert found.state is not None and store.merges.settle_ready(job, found.state.token, 5)
    rec = store.get_job(job)
    assert rec is not None
    delete_outputs(store, LocalStorage(tmp_path / "data"), rec)
    assert store.merges.get(job) is None
    after = store.merges.request(job)
    assert after.no_adapter and not after.build, "a job whose model was deleted has nothing to merge"

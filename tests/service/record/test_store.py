"""The store's state machine and the task's logic, against a real Redis (no HTTP, no Celery).

`train_next_job` is called directly with a small stand-in for the training loop, as Celery's
docs advise for task logic; the real worker with the real trainer is exercised in
test_end_to_end.py.
"""

from __future__ import annotations

import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from service.record import ids
from service.record.settings import Settings
from service.record.storage import LocalStorage, keys
from service.record.store import REQUEUE_MESSAGE, STATUSES, FileInUse, FileRecord, JobRecord, LimitExceeded, Store, now
from service.record.tenants import tenant_of
from tests.record_reads import list_checkpoints, list_events, read_events, tenant_file_bytes
from worker.spec import JobCancelled, TrainContext, TrainingError, TrainResult, TrainSpec
from worker.tasks import train_next_job


@pytest.fixture
def store(redis_url: str) -> Store:
    s = Store.from_url(redis_url)
    s.r.flushdb()
    return s


def tenant(key: str) -> str:
    """A tenant id as the service derives one (the secret here is a fixed test value)."""
    return tenant_of(key, b"a test secret")


T1 = tenant("sk-t1")
OTHER = tenant("sk-other")


def make_file(store: Store, data: LocalStorage, tenant: str = T1) -> FileRecord:
    fid = ids.new_file_id()
    key = keys.file_key(tenant, fid)
    data.put_bytes(key, b'{"text": "hello world"}\n')
    rec = FileRecord(
        id=fid,
        tenant=tenant,
        bytes=data.size(key) or 0,
        created_at=now(),
        filename="a.jsonl",
        purpose="fine-tune",
        path=key,
    )
    store.create_file(rec, counted=True, tenant_limit=1 << 30)
    return rec


def make_job(store: Store, file_id: str, tenant: str = T1, queued: bool = True, limit: int = 100) -> str:
    rec = JobRecord(
        id=ids.new_job_id(),
        tenant=tenant,
        status="validating_files",
        created_at=now(),
        model="tiny",
        training_file=file_id,
        hyperparameters={"n_epochs": "auto", "batch_size": 2, "learning_rate_multiplier": "auto"},
        seed=7,
        seco={"mode": "seco", "lora": {"r": 4}},
    )
    store.create_job(rec, tenant_limit=limit)
    if queued:
        assert store.transition(rec.id, ["validating_files"], "queued")[0]
    return rec.id


@pytest.fixture
def data(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "data")


def test_state_machine_guards(store: Store, data: LocalStorage) -> None:
    f = make_file(store, data)
    job = make_job(store, f.id)
    assert store.queue_position(job) == 1
    assert store.start_job(job, "w1", 30)
    assert not store.start_job(job, "w2", 30), "a running job cannot be started again"
    assert store.get_job(job).worker == "w1"  # type: ignore[union-attr]
    assert not store.finish_job(job, "w2", "succeeded", event="x"), "only the owner finishes a job"
    assert store.finish_job(job, "w1", "succeeded", event="done")
    for to in ("validating_files", "queued", "running", "failed", "cancelled"):
        # even a caller that lists every status as a source cannot leave a final state
        assert store.transition(job, list(STATUSES), to, require_no_lease=True) == (False, "succeeded")
        assert store.get_job(job).status == "succeeded"  # type: ignore[union-attr]
    assert not store.start_job(job, "w1", 30), "a succeeded job is never re-run"
    # cancelled is final too
    job2 = make_job(store, f.id)
    assert store.request_cancel(job2) == "cancelled"
    assert not store.start_job(job2, "w1", 30)
    assert store.get_job(job2).status == "cancelled"  # type: ignore[union-attr]
    assert store.status_counts()["succeeded"] == 1 and store.status_counts()["cancelled"] == 1


def test_concurrent_starts_exactly_one_wins(store: Store, data: LocalStorage) -> None:
    f = make_file(store, data)
    jobs = [make_job(store, f.id) for _ in range(5)]
    wins: list[tuple[str, str]] = []
    barrier = threading.Barrier(8)

    def contender(n: int) -> None:
        s = Store.from_url(_url(store))
        barrier.wait()
        for j in jobs:
            if s.start_job(j, f"w{n}", 30):
                wins.append((j, f"w{n}"))

    threads = [threading.Thread(target=contender, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(j for j, _ in wins) == sorted(jobs), "each job started exactly once"
    for j, w in wins:
        assert store.get_job(j).worker == w  # type: ignore[union-attr]


def _url(store: Store) -> str:
    kw = store.r.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/{kw.get('db', 0)}"


def _race(url: str, job: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    barrier = threading.Barrier(2)

    def start() -> None:
        barrier.wait()
        results["started"] = Store.from_url(url).start_job(job, "w", 30)

    def cancel() -> None:
        barrier.wait()
        results["cancel"] = Store.from_url(url).request_cancel(job)

    ts = [threading.Thread(target=start), threading.Thread(target=cancel)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return results


def test_cancel_racing_start(store: Store, data: LocalStorage) -> None:
    """A cancel and a start racing on the same queued job: exactly one outcome, consistently."""
    f = make_file(store, data)
    for _ in range(20):
        job = make_job(store, f.id)
        results = _race(_url(store), job)
        rec = store.get_job(job)
        assert rec is not None
        if results["started"]:
            assert rec.status == "running" and rec.cancel_requested and results["cancel"] == "running"
        else:
            assert rec.status == "cancelled" and results["cancel"] == "cancelled"


def test_metrics_dedupe_events_and_pagination(store: Store, data: LocalStorage) -> None:
    f = make_file(store, data)
    job = make_job(store, f.id)
    assert store.start_job(job, "w1", 30)
    for step in (1, 2, 3, 2, 3, 4):  # a resume re-reports steps 2 and 3
        store.add_metrics(job, "w1", {"step": step, "train_loss": 1.0 / step, "peak_memory_bytes": step * 10}, "m")
    assert store.add_metrics(job, "intruder", {"step": 9}, "m") is None, "only the owner reports metrics"
    events = read_events(store, job)
    steps = [e.data["step"] for e in events if e.type == "metrics"]  # type: ignore[index]
    assert steps == [1, 2, 3, 4]
    assert store.get_job(job).peak_memory_bytes == 40  # type: ignore[union-attr]
    # newest first, paged by `after`
    page1, more1 = list_events(store, job, after=None, limit=3)
    page2, more2 = list_events(store, job, after=page1[-1].stream_id, limit=100)
    assert more1 and not more2
    ids_all = [e.id for e in page1 + page2]
    assert ids_all == [e.id for e in reversed(events)]
    assert all(ids.stream_id_of(i) for i in ids_all)


def test_reaper_requeues_then_fails_after_max_attempts(store: Store, data: LocalStorage) -> None:
    f = make_file(store, data)
    job = make_job(store, f.id)
    assert store.start_job(job, "dead-worker", 0.3)
    assert store.reap_expired(3) == [], "a live lease is left alone"
    time.sleep(0.4)
    assert store.reap_expired(3) == [job]
    assert store.reap_expired(3) == [], "only one reaper wins"
    rec = store.get_job(job)
    assert rec is not None and rec.status == "queued" and rec.attempts == 1 and rec.worker is None
    assert any(e.message == REQUEUE_MESSAGE for e in read_events(store, job))
    assert not store.refresh_lease(job, "dead-worker", 30), "the old owner cannot renew"
    assert store.start_job(job, "w2", 0.3)
    assert "attempt 2" in read_events(store, job)[-1].message
    time.sleep(0.4)
    assert store.reap_expired(3) == [job]
    assert store.start_job(job, "w3", 0.3)
    time.sleep(0.4)
    assert store.reap_expired(3) == []
    rec = store.get_job(job)
    assert rec is not None and rec.status == "failed" and rec.error["code"] == "worker_lost"  # type: ignore[index]


def test_reaper_cancels_a_dead_job_that_was_asked_to_cancel(store: Store, data: LocalStorage) -> None:
    f = make_file(store, data)
    job = make_job(store, f.id)
    assert store.start_job(job, "w", 0.3)
    assert store.request_cancel(job) == "running"
    time.sleep(0.4)
    assert store.reap_expired(3) == []
    assert store.get_job(job).status == "cancelled"  # type: ignore[union-attr]


def test_tenant_limits_and_file_in_use(store: Store, data: LocalStorage) -> None:
    f = make_file(store, data)
    j1 = make_job(store, f.id, limit=2)
    make_job(store, f.id, limit=2)
    with pytest.raises(LimitExceeded):
        make_job(store, f.id, limit=2)
    with pytest.raises(FileInUse):
        store.delete_file(f)
    assert store.request_cancel(j1) == "cancelled"
    make_job(store, f.id, limit=2)  # a slot was freed
    big = FileRecord(
        id=ids.new_file_id(), tenant=T1, bytes=100, created_at=now(), filename="x", purpose="fine-tune", path="files/x"
    )
    with pytest.raises(LimitExceeded):
        store.create_file(big, counted=True, tenant_limit=f.bytes + 99)
    assert tenant_file_bytes(store, T1) == f.bytes
    assert store.get_file(f.id, OTHER) is None
    with pytest.raises(LookupError):
        make_job(store, f.id, tenant=OTHER)


# ----------------------------------------------------------------------------- train_next_job


def settings_for(store: Store, data: LocalStorage, model_dir: Path) -> Settings:
    return Settings(redis_url=_url(store), data_dir=data.root, models_raw=f"tiny={model_dir}", lease_seconds=3)


def fake_train(spec: TrainSpec, ctx: TrainContext) -> TrainResult:
    """Stands in for worker.trainer.train: reports like it and writes the same outputs."""
    assert spec.model_name == "tiny" and spec.seed == 7 and spec.batch_size == 2 and spec.n_epochs is None
    assert spec.seco.lora.r == 4 and spec.training_file.is_file()
    ctx.message("Training on 1 window")
    out = spec.output_dir
    for step in (1, 2):
        ctx.metrics({"step": step, "total_steps": 2, "train_loss": 2.0 / step, "peak_memory_bytes": 1000})
        ctx.progress(step, 2, 100 * step, 1.0)
        ck = out / "checkpoints" / f"step-{step:06d}"
        ck.mkdir(parents=True)
        (ck / "trainer_state.pt").write_bytes(b"state")
        (ck / "checkpoint.json").write_text("{}")  # the marker, written last
        ctx.checkpoint_saved(step, ck, {"train_loss": 2.0 / step})
    (out / "adapter").mkdir()
    (out / "adapter" / "adapter_config.json").write_text("{}")
    with tarfile.open(out / "adapter.tar.gz", "w:gz") as tar:
        tar.add(out / "adapter" / "adapter_config.json", arcname="adapter_config.json")
    (out / "metrics.csv").write_text("step,train_loss\n1,2.0\n2,1.0\n")
    return TrainResult(
        adapter_dir=out / "adapter",
        adapter_archive=out / "adapter.tar.gz",
        metrics_csv=out / "metrics.csv",
        trained_tokens=200,
        steps=2,
        peak_memory_bytes=5000,
    )


def test_train_next_job_success_registers_results(store: Store, data: LocalStorage, tmp_path: Path) -> None:
    settings = settings_for(store, data, tmp_path)
    f = make_file(store, data)
    job = make_job(store, f.id)
    assert train_next_job(settings, store, worker_id="w", train=fake_train) == "succeeded"
    rec = store.get_job(job)
    assert rec is not None and rec.status == "succeeded"
    assert rec.fine_tuned_model == f"ft:tiny:org-{T1}::{job.removeprefix('ftjob-')}"
    assert rec.trained_tokens == 200 and rec.peak_memory_bytes == 5000
    assert len(rec.result_files) == 2 and rec.adapter_file == rec.result_files[1]  # [0]: the metrics CSV
    adapter = store.get_file(rec.adapter_file, T1)  # type: ignore[arg-type]
    assert adapter is not None and adapter.purpose == "fine-tune-results"
    assert adapter.path == keys.result_key(T1, job, "adapter.tar.gz") and data.exists(adapter.path)
    cks, _ = list_checkpoints(store, job, after=None, limit=10)
    assert [c.step for c in cks] == [2, 1]
    # each checkpoint was published with its marker, and the worker's scratch space is gone
    assert data.complete_dirs(keys.checkpoints_prefix(T1, job), "checkpoint.json") == ["step-000001", "step-000002"]
    assert not list((data.root / "scratch").rglob(f"{job}*")), "scratch space cleaned when the job ended"
    messages = [e.message for e in read_events(store, job)]
    assert messages[-1] == "The job has successfully completed"
    assert "Checkpoint saved at step 2" in messages
    # a redelivery of the same message finds no queued job: it does nothing
    assert train_next_job(settings, store, worker_id="w2", train=fake_train) == "idle"
    assert store.get_job(job).status == "succeeded"  # type: ignore[union-attr]


def test_train_next_job_failures_and_cancel(store: Store, data: LocalStorage, tmp_path: Path) -> None:
    settings = settings_for(store, data, tmp_path)
    f = make_file(store, data)

    def user_error(spec: TrainSpec, ctx: TrainContext) -> TrainResult:
        raise TrainingError("max_length 99999 does not fit; try 4096", code="out_of_memory", param="seco.max_length")

    def crash(spec: TrainSpec, ctx: TrainContext) -> TrainResult:
        raise ZeroDivisionError("boom")

    def cancellable(spec: TrainSpec, ctx: TrainContext) -> TrainResult:
        store.request_cancel(spec.job_id)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if ctx.cancelled():
                raise JobCancelled()
            time.sleep(0.05)
        raise AssertionError("cancel not seen")

    j1, j2, j3 = (make_job(store, f.id) for _ in range(3))
    assert train_next_job(settings, store, train=user_error) == "failed"
    assert store.get_job(j1).error == {
        "code": "out_of_memory",
        "message": "max_length 99999 does not fit; "  # type: ignore[union-attr]
        "try 4096",
        "param": "seco.max_length",
    }
    assert train_next_job(settings, store, train=crash) == "failed"
    err = store.get_job(j2).error  # type: ignore[union-attr]
    assert err is not None and err["code"] == "internal_error" and "ZeroDivisionError: boom" in err["message"]
    assert train_next_job(settings, store, train=cancellable) == "cancelled"
    assert store.get_job(j3).status == "cancelled"  # type: ignore[union-attr]
    # a model no longer configured fails clearly instead of crashing
    settings2 = Settings(redis_url=_url(store), data_dir=data.root, models_raw="other=/x", lease_seconds=3)
    j4 = make_job(store, f.id)
    assert train_next_job(settings2, store, train=fake_train) == "failed"
    assert store.get_job(j4).error["code"] == "model_not_available"  # type: ignore[index,union-attr]


def test_lease_is_renewed_while_training(store: Store, data: LocalStorage, tmp_path: Path) -> None:
    settings = settings_for(store, data, tmp_path)  # 3 s lease, renewed every second
    f = make_file(store, data)
    job = make_job(store, f.id)

    def slow(spec: TrainSpec, ctx: TrainContext) -> TrainResult:
        time.sleep(4.5)
        assert store.reap_expired(3) == [], "the lease is alive: nothing to reap"
        return fake_train(spec, ctx)

    assert train_next_job(settings, store, worker_id="w", train=slow) == "succeeded"
    assert store.get_job(job).status == "succeeded"  # type: ignore[union-attr]


def test_resolved_hyperparameters_replace_auto_and_a_retry_reads_them(
    store: Store, data: LocalStorage, tmp_path: Path
) -> None:
    """The worker's resolved values replace "auto" on the job (only the owner may write them),
    and a later attempt's spec carries them as numbers, so it trains with the same ones."""
    from worker.tasks import build_spec

    settings = settings_for(store, data, tmp_path)
    f = make_file(store, data)
    job = make_job(store, f.id)
    assert store.start_job(job, "w", 30)
    resolved = {"n_epochs": 3, "batch_size": 2, "learning_rate_multiplier": 1.0}
    assert not store.resolve_hyperparameters(job, "someone-else", resolved)
    assert store.get_job(job).hyperparameters["n_epochs"] == "auto"  # type: ignore[union-attr]
    assert store.resolve_hyperparameters(job, "w", resolved)
    rec = store.get_job(job)
    assert rec is not None and rec.hyperparameters == resolved and rec.seed == 7 and rec.seco["lora"] == {"r": 4}
    spec = build_spec(rec, settings, store, data, tmp_path / "scratch")
    assert (spec.n_epochs, spec.batch_size, spec.learning_rate_multiplier) == (3, 2, 1.0)


def test_a_record_breaking_a_job_config_rule_is_a_clear_training_error(
    store: Store, data: LocalStorage, tmp_path: Path
) -> None:
    """A stored `seco` the library's JobConfig refuses (here SpaCO without a budget) fails the job
    naming `seco`, rather than reaching the training loop."""
    from worker.tasks import build_spec

    settings = settings_for(store, data, tmp_path)
    f = make_file(store, data)
    rec = store.get_job(make_job(store, f.id))
    assert rec is not None
    bad = rec.model_copy(update={"seco": {"mode": "spaco", "lora": {"r": 4}}})
    with pytest.raises(TrainingError) as info:
        build_spec(bad, settings, store, data, tmp_path / "scratch")
    assert info.value.code == "invalid_seco" and info.value.param == "seco"
    assert "budget is required when mode is 'spaco'" in str(info.value)

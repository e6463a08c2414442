"""The worker process's environment for training, and what its Celery app accepts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize(
    ("given", "expected"), [(None, "expandable_segments:True"), ("backend:native", "backend:native")]
)
def test_workers_use_expandable_cuda_segments_unless_configured(given: str | None, expected: str) -> None:
    """Set when the task module loads, before any job imports torch; an operator's own setting wins."""
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    env.update({"PYTHONPATH": str(ROOT), "REDIS_URL": "redis://127.0.0.1:1/0"})
    if given is not None:
        env["PYTORCH_CUDA_ALLOC_CONF"] = given
    code = "import os, worker.tasks; print(os.environ['PYTORCH_CUDA_ALLOC_CONF'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


def test_celery_accepts_json_only_and_says_so() -> None:
    """Stated in the app's own configuration, not inherited from Celery's defaults."""
    from service.record.queue import make_celery
    from service.record.settings import Settings

    conf = make_celery(Settings(redis_url="redis://127.0.0.1:1/0")).conf
    explicit = conf.table(with_defaults=False)
    assert explicit["accept_content"] == ["json"] and explicit["task_serializer"] == "json"
    assert explicit["result_accept_content"] == ["json"]


def test_the_celery_task_trains_the_next_job_not_the_one_it_names(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """The production entry point itself (the task Celery runs), against a real Redis: its message
    names a queued job, and it claims, runs and settles the first of the fair order; a message
    under the task's former name is still run; a malformed id starts nothing."""
    import worker.trainer
    from service.record.queue import LEGACY_TASK_NAMES, TASK_NAME
    from service.record.settings import get_settings
    from service.record.storage.local import LocalStorage
    from service.record.store import Store
    from tests.service.record.test_store import fake_train, make_file, make_job
    from worker import tasks

    store = Store.from_url(redis_url)
    store.r.flushdb()
    data = LocalStorage(tmp_path / "data")
    for name, value in {
        "REDIS_URL": redis_url,
        "SECO_DATA_DIR": str(data.root),
        "SECO_MODELS": f"tiny={tmp_path}",
        "SECO_DEVICE": "cpu",
        "SECO_LEASE_SECONDS": "3",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(worker.trainer, "train", fake_train)  # what the task imports in its child process
    get_settings.cache_clear()  # the task reads the process's settings from the environment
    request.addfinalizer(get_settings.cache_clear)
    f = make_file(store, data)
    first, second = make_job(store, f.id), make_job(store, f.id)

    assert tasks.train_next.name == TASK_NAME
    assert tasks.train_next.run(second) == "succeeded"
    assert store.get_job(first).status == "succeeded"  # type: ignore[union-attr]
    assert store.get_job(second).status == "queued"  # type: ignore[union-attr]
    assert tasks.app.tasks[LEGACY_TASK_NAMES[0]].run(first) == "succeeded"
    assert store.get_job(second).status == "succeeded"  # type: ignore[union-attr]
    third = make_job(store, f.id)
    assert tasks.train_next.run("ftjob-../../x") == "invalid"
    assert store.get_job(third).status == "queued", "a malformed message starts nothing"  # type: ignore[union-attr]
    assert tasks.train_next.run(third) == "succeeded" and tasks.train_next.run(third) == "idle"

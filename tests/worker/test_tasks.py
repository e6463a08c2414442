"""The worker process's environment for training, and what its Celery app accepts."""

from __future__ import annotations

import os
import subprocess
import sys

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
    from worker.celery_app import make_celery

    conf = make_celery().conf
    explicit = conf.table(with_defaults=False)
    assert explicit["accept_content"] == ["json"] and explicit["task_serializer"] == "json"
    assert explicit["result_accept_content"] == ["json"]

"""The worker process's environment for training."""

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

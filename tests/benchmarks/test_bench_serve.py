"""The serving benchmark: its arithmetic, and a quick run of the real command (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import bench_serve
from tests.conftest import ROOT


def test_kv_bytes_per_token() -> None:
    spec = bench_serve.resolve(bench_serve.parse_args([]))  # 2 layers, 2 KV heads of 16, fp32 on CPU
    assert bench_serve.kv_bytes(spec, 1) == 2 * 2 * 2 * 16 * 4
    assert bench_serve.kv_bytes({**spec, "device": "cuda"}, 1024) == 2 * 2 * 2 * 16 * 2 * 1024


def test_tables_show_the_ratios() -> None:
    spec = {**bench_serve.resolve(bench_serve.parse_args(["--quick"])), "lengths": [1024]}
    mib = bench_serve.MiB
    results = [
        {"method": "chunked", "length": 1024, "status": "ok", "peak_extra_bytes": 10 * mib, "seconds": 1.0},
        {"method": "forward", "length": 1024, "status": "ok", "peak_extra_bytes": 40 * mib, "seconds": 2.0},
        {"method": "forward-last", "length": 1024, "status": "oom"},
    ]
    table = bench_serve.format_prefill(results, spec)
    assert "4.00x" in table and "oom" in table
    gen = {
        "prompt": 64,
        "new_tokens": 16,
        "same_tokens": True,
        "generate_ttft_s": 0.02,
        "generate_tps": 100.0,
        "engine_ttft_s": 0.01,
        "engine_tps": 85.0,
        "generate_tps_median": 100.0,
        "engine_tps_median": 85.0,
    }
    assert "tokens/s 0.85x (aim >= 0.9x: MISSED), TTFT 0.50x" in bench_serve.format_generation(gen)


@pytest.mark.slow
def test_quick_run() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_serve", "--quick", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "prefill peak extra memory" in out.stdout and "engine / generate: tokens/s" in out.stdout
    raw = json.loads(out.stdout.strip().splitlines()[-1])
    assert raw["generation"]["same_tokens"] is True
    by = {(r["method"], r["length"]): r for r in raw["prefill"]}
    longest = max(r["length"] for r in raw["prefill"])
    assert all(r["status"] == "ok" for r in raw["prefill"])
    # the full forward holds every position's logits; chunked prefill does not
    assert by[("forward", longest)]["peak_extra_bytes"] > 2 * by[("chunked", longest)]["peak_extra_bytes"]
    assert len({r["next_token"] for r in raw["prefill"] if r["length"] == longest}) == 1

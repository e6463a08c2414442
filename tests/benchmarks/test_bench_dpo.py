"""The DPO benchmark command end to end in a tiny configuration (both methods, one run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TINY = [
    "--layers",
    "2",
    "--hidden",
    "32",
    "--heads",
    "4",
    "--kv-heads",
    "2",
    "--intermediate",
    "64",
    "--vocab",
    "128",
    "--prompt",
    "100",
    "--answers",
    "20",
    "13",
    "--chunk-size",
    "32",
    "--steps",
    "1",
]


def test_bench_dpo_prints_both_methods_and_their_ratios(tmp_path: Path) -> None:
    out = tmp_path / "dpo.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_dpo", *TINY, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    shared, separate = report["results"]["shared"], report["results"]["separate"]
    for r in (shared, separate):
        assert r["status"] == "ok" and r["peak_extra_bytes"] > 0 and r["step_seconds_mean"] > 0
        assert r["grad_norm"] > 0 and r["grads_nonzero"] > 0
    # the same exact DPO step both ways: same loss, log-probs and gradient norm
    assert abs(shared["loss"] - separate["loss"]) < 1e-5
    assert abs(shared["chosen_logp"] - separate["chosen_logp"]) < 1e-3
    assert abs(shared["grad_norm"] - separate["grad_norm"]) < 1e-4 * shared["grad_norm"]
    assert report["problems"] == []
    assert "time shared/separate:" in proc.stdout and "peak memory shared/separate:" in proc.stdout

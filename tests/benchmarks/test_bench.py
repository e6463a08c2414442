"""The benchmark command end to end in a tiny configuration (every method, two lengths)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import bench
from benchmarks.bench import DEFAULT_METHODS, ratios, spaco_budget

TINY = [
    "--layers",
    "2",
    "--hidden",
    "32",
    "--heads",
    "4",
    "--kv-heads",
    "4",
    "--intermediate",
    "64",
    "--vocab",
    "128",
    "--lengths",
    "64",
    "128",
    "--chunk-size",
    "32",
    "--steps",
    "1",
]


def test_bench_command_writes_every_method_and_length(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", *TINY, "--jobs", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "bench.json").read_text())
    got = {(r["method"], r["length"]): r for r in report["results"]}
    assert set(got) == {(m, n) for m in DEFAULT_METHODS for n in (64, 128)}
    for r in got.values():
        assert r["status"] == "ok", r
        assert r["peak_extra_bytes"] > 0
        assert r["step_seconds_mean"] > 0
        assert r["grad_norm"] > 0 and r["grads_nonzero"] > 0
        assert 4.0 < r["loss"] < 6.0  # ~ln(128) = 4.85 for a random model
    # SeCO's loss equals the plain forward's (checked in the child at the smallest length)
    # and plain's from its own child; SpaCO reports the full loss too.
    assert got[("seco", 64)]["loss_abs_diff"] < 1e-4
    for n in (64, 128):
        assert abs(got[("seco", n)]["loss"] - got[("plain", n)]["loss"]) < 1e-4
        assert got[("seco", n)]["chunks_backpropagated"] == n // 32
        assert got[("spaco", n)]["chunks_backpropagated"] == 1  # max(1, k * 2 // 16)
    assert report["problems"] == []
    assert report["ratios"]["128"]["plain/seco memory"] > 0
    assert (out / "bench.png").stat().st_size > 10_000
    assert "plain/seco memory" in proc.stdout


def test_spaco_budget_defaults_to_two_of_sixteen() -> None:
    spec = {"budget": None, "budget_fraction": 2 / 16}
    assert spaco_budget(16, spec) == 2
    assert spaco_budget(64, spec) == 8
    assert spaco_budget(4, spec) == 1
    assert spaco_budget(16, {**spec, "budget": 5}) == 5


def test_ratios_against_plain() -> None:
    def r(method: str, length: int, mem: int, secs: float) -> dict[str, Any]:
        return {"method": method, "length": length, "status": "ok", "peak_extra_bytes": mem, "step_seconds_mean": secs}

    results = [
        r("plain", 8, 800, 1.0),
        r("seco", 8, 100, 1.3),
        r("spaco", 8, 100, 0.4),
        r("plain", 16, 0, 0.0) | {"status": "oom"},
        r("seco", 16, 150, 2.6),
    ]
    rat = ratios(results, [8, 16])
    assert rat["8"]["plain/seco memory"] == 8.0
    assert abs(rat["8"]["seco/plain time"] - 1.3) < 1e-12
    assert abs(rat["8"]["seco/spaco speedup"] - 3.25) < 1e-12
    assert "plain/seco memory" not in rat["16"]  # plain OOM: no ratio
    assert rat["16"]["seco memory vs L=8"] == 1.5


def test_find_max_length_doubles_then_bisects(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def fake_child(method: str, length: int, spec: dict[str, Any]) -> dict[str, Any]:
        calls.append(length)
        if length > 5000:  # "OOM" above 5000 tokens
            return {"method": method, "length": length, "status": "oom"}
        return {
            "method": method,
            "length": length,
            "status": "ok",
            "step_seconds_mean": length / 1000,
            "peak_extra_bytes": length,
        }

    monkeypatch.setattr(bench, "run_child", fake_child)
    spec = {"lengths": [512], "max_length_limit": 2**20, "max_length_step": 256}
    row = bench.find_max_length("seco", spec)
    assert row["max_length"] == 4864  # the largest multiple of 256 <= 5000
    assert row["step_seconds"] == 4.864 and not row["hit_limit"]
    assert calls[:5] == [512, 1024, 2048, 4096, 8192]  # doubling until the first OOM
    # The doubling stops at the limit without an OOM.
    row = bench.find_max_length("seco", {**spec, "max_length_limit": 2048})
    assert row["max_length"] == 2048 and row["hit_limit"]


def test_find_max_length_reports_spaco_training_over_inference(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_child(method: str, length: int, spec: dict[str, Any]) -> dict[str, Any]:
        if length > 4096:
            return {"method": method, "length": length, "status": "oom"}
        seconds = length / 1000 if method == "prefill" else 1.25 * length / 1000
        return {
            "method": method,
            "length": length,
            "status": "ok",
            "step_seconds_mean": seconds,
            "peak_extra_bytes": length,
        }

    monkeypatch.setattr(bench, "run_child", fake_child)
    spec = {"lengths": [1024], "max_length_limit": 2**20, "max_length_step": 1024}
    row = bench.find_max_length("spaco-offload", spec)
    assert row["max_length"] == 4096
    assert row["train_over_prefill"] == pytest.approx(1.25)
    assert "train_over_prefill" not in bench.find_max_length("seco", spec)

"""scripts/serving_bench.py runs end to end (real Valkey, `seco serve` and API processes) and prints
its table: both paths measured, with the same tokens, and the ratios API / direct."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_the_serving_benchmark_measures_both_paths(tmp_path: Path) -> None:
    out_json = tmp_path / "serving.json"
    cmd = [sys.executable, "scripts/serving_bench.py", "--rounds", "1", "--tokens", "16", "--json", str(out_json)]
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "API / direct: TTFT" in out.stdout, out.stdout
    medians = json.loads(out_json.read_text())["medians"]
    assert set(medians) == {"direct", "API"}
    assert all(m["tps"] > 0 and m["whole"] > 0 and m["ttft"] > 0 for m in medians.values()), medians

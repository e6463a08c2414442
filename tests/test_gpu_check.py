"""scripts/gpu_check.py runs on CPU too (tiny shape): the prepared GPU run cannot rot unseen."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def run(part: str, out: Path, *args: str) -> list[dict[str, object]]:
    cmd = [sys.executable, "scripts/gpu_check.py", part, "--device", "cpu", "--out", str(out), *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [r for r in map(json.loads, out.read_text().splitlines()) if r["part"] == part]


def test_every_part_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.jsonl"
    job = {r["name"]: r for r in run("job", out)}["job"]
    assert job["ok"] and job["steps"] == 8 and len(job["valid_losses"]) == 4  # type: ignore[arg-type]
    assert str(job["self_check"]).startswith("self-check passed")

    parity = run("parity", out)
    errors = [r["max_rel_error"] for r in parity if r["name"] == "parity"]
    assert len(errors) == 3 and max(errors) < 1e-5  # type: ignore[type-var]
    assert [r["name"] for r in parity][-1] == "attention_speed"

    records = run("llama8b", out, "--shape", "tiny", "--deadline", "120")
    names = [r["name"] for r in records]
    assert names[:3] == ["model", "seco_step", "seco_step"]
    stats = records[1]["kv_offload_stats"]  # the offloaded step's copy/compute overlap counters
    assert isinstance(stats, dict) and {"ring_waits", "prefetch_misses", "blocks_fetched"} <= set(stats), stats
    assert stats["prefetch_misses"] <= max(1, stats["blocks_fetched"]), stats
    assert "ratio" in names and names[-1] == "longest"

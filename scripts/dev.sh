#!/usr/bin/env bash
# Set up a virtual environment (idempotent) and run the service or the tests.
#
#   scripts/dev.sh up [seco up flags]     the whole service on this machine (embedded Redis, API, one worker)
#   scripts/dev.sh test [pytest args]     the test suite (starts its own Redis-compatible server)
#   scripts/dev.sh lint                   ruff check, ruff format --check and mypy, as CI runs them
#   scripts/dev.sh test-oldest [pytest args]
#                                         the seco_core and worker trainer tests again, on the oldest
#                                         torch / transformers / peft we support (ci/oldest.txt), in
#                                         their own environment (.venv-oldest, SECO_OLDEST_VENV)
#
# SECO_VENV picks the environment directory (default .venv). torch is installed first and
# pinned, because a bare "torch" requirement may pull a multi-GB CUDA build; on a GPU
# machine install the CUDA build of torch into the environment before running this.
set -euo pipefail
cd "$(dirname "$0")/.."

command=${1:-}
case "$command" in
  up|test|lint|test-oldest) shift ;;
  *) echo "usage: scripts/dev.sh up|test|lint|test-oldest [args...]" >&2; exit 2 ;;
esac

# Run pytest with the given arguments; "no tests collected" (exit 5) is a failure too.
run_pytest() {
  set +e
  python -m pytest "$@"
  local status=$?
  set -e
  if [ "$status" = 5 ]; then
    echo "no tests were collected" >&2
    return 1
  fi
  return "$status"
}

if [ "$command" = test-oldest ]; then
  # Only the library and the training loop: they are what depends on torch, transformers
  # and peft; the API and Celery tests need none of the three and stay on .venv.
  oldest_tests=(tests/seco_core tests/worker/test_trainer.py tests/worker/test_trainer_dpo.py
                tests/worker/test_plan.py tests/worker/test_data.py tests/worker/test_preference_data.py)
  venv=${SECO_OLDEST_VENV:-.venv-oldest}
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
  fi
  # shellcheck disable=SC1091
  . "$venv/bin/activate"
  stamp="$venv/.seco-installed"
  if [ ! -f "$stamp" ] || [ ci/oldest.txt -nt "$stamp" ]; then
    python -m pip install --quiet -r ci/oldest.txt
    touch "$stamp"
  fi
  python -c 'import torch, transformers, peft; print(f"oldest versions: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")'
  run_pytest "$@" "${oldest_tests[@]}"
  exit $?
fi

venv=${SECO_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"

stamp="$venv/.seco-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install --quiet --upgrade pip
  python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
  python -m pip install --quiet -e ".[server,test]"
  touch "$stamp"
fi

if [ "$command" = up ]; then
  exec seco up "$@"
fi

if [ "$command" = lint ]; then
  ruff check . && ruff format --check . && mypy seco_core service worker scripts benchmarks
  exit $?
fi

# The dashboard test drives a real headless Chromium; install it where we can (root, apt).
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "chromium could not be installed: the browser test will be skipped" >&2
fi

# The real pretrained model tests/real_model trains on (idempotent: built once into .cache/models);
# with it built, those slow tests run here and in CI instead of being skipped.
# SECO_REAL_MODEL_TESTS=0 opts out (e.g. a GPU run of other tests on a machine without PyPI).
if [ "${SECO_REAL_MODEL_TESTS:-1}" = 1 ]; then
  python scripts/build_real_model.py
  export SECO_REAL_MODEL_TESTS=1
fi

run_pytest "$@"

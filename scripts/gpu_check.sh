#!/usr/bin/env bash
# The GPU checks as one bounded run, for a machine with a CUDA device (e.g. an H200 whose
# image has torch, transformers and peft):
#
#   bash scripts/gpu_check.sh [OUT_DIR]
#
# Writes OUT_DIR/gpu_check.jsonl, one JSON object per measured figure, the moment it is
# measured (a run cut short still leaves what it measured), plus each part's log. Parts,
# in order (scripts/gpu_check.py explains each): (a) a tiny bf16 job through the trainer
# with KV offload, layer checkpointing, self-check and validation; (b) the fused attention
# kernel against the matmul kernel, and the CUDA tests; (c) one SeCO step of a
# Llama-3-8B-shaped model at 32K tokens under a 24 GiB cap, against the memory plan;
# (d) SeCO / plain step time at 8K; (e) the longest length that trains under 24 GiB, in
# the time left. The whole run stays within GPU_CHECK_SECONDS (default 480).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-out}}
mkdir -p "$out"
results="$out/gpu_check.jsonl"
budget=${GPU_CHECK_SECONDS:-480}
start=$SECONDS
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

python3 - "$results" <<'PY'
import json, sys, torch, transformers, peft
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
line = {"part": "env", "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "device": dev, "memory_bytes": torch.cuda.get_device_properties(0).total_memory if dev else None}
open(sys.argv[1], "a").write(json.dumps(line) + "\n"); print(json.dumps(line))
PY

part() {  # part NAME SECONDS [ARGS...]
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 scripts/gpu_check.py "$name" --out "$results" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  [ "$rc" = 0 ] || echo "{\"part\": \"$name\", \"name\": \"exit\", \"code\": $rc}" >> "$results"
  tail -n 3 "$out/$name.log"
}

part job 90
part parity 60
timeout 90 python3 -m pytest -q --noconftest -p no:cacheprovider -m gpu tests/seco_core/test_cuda.py \
  > "$out/cuda-tests.log" 2>&1
echo "{\"part\": \"cuda_tests\", \"summary\": \"$(tail -n 1 "$out/cuda-tests.log" | tr -d '"\\')\"}" >> "$results"
tail -n 1 "$out/cuda-tests.log"
left=$((budget - (SECONDS - start) - 15))
part llama8b "$left" --deadline $((left - 20))
echo "gpu_check: $((SECONDS - start)) s; results in $results"

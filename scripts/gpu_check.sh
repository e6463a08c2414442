#!/usr/bin/env bash
# The GPU checks, as one prepared run for a machine with a CUDA device (e.g. the device
# tool's H200, whose image already has torch, transformers and peft):
#
#   bash scripts/gpu_check.sh [OUT_DIR]
#
# 1. CUDA parity of SeCO, with and without KV offload (host <-> device streaming for real),
#    and device memory staying flat with offload as the sequence grows.
# 2. The Llama-3-8B-shaped benchmark under a 24 GiB cap: the longest sequence each
#    configuration trains, its step time, and SpaCO's training/inference time ratio.
# Bounded so it fits a 10-minute command; results land in OUT_DIR (default ./gpu-out).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-out}}
mkdir -p "$out"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$out/env.txt"
# --noconftest: the suite's conftest starts service fixtures this check does not need.
timeout 120 python3 -m pytest -q --noconftest -p no:cacheprovider -m gpu tests/seco_core/test_cuda.py 2>&1 | tee "$out/cuda-tests.txt"
timeout 420 python3 -m seco_core.bench --preset llama3-8b --memory-cap 24GiB --find-max-length \
    --methods seco seco-ckpt seco-offload spaco-offload --lengths 16384 --max-length-step 8192 \
    --max-length-limit 262144 --steps 1 --out "$out" 2>&1 | tee "$out/bench-8b.txt"

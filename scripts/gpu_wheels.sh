#!/usr/bin/env bash
# Prepare, on a machine with a package index, the wheels scripts/gpu_check.sh installs on a
# GPU machine that can reach none:
#
#   bash scripts/gpu_wheels.sh [DIR]        (default .whl, gitignored; copy it with the tree)
#
# The GPU image has torch, transformers, peft, accelerate, safetensors, tokenizers and httpx
# but not pytest, which the check's `cuda_tests` part runs. Everything else the check
# imports is either in the image or our own code, so the folder holds pytest and the
# dependencies the image lacks, pure-Python wheels for CPython 3.12, one pinned version of
# each, with no dependency resolution (--no-deps: the list below is the whole closure;
# packaging, pytest's remaining dependency, comes with transformers). gpu_check.sh installs
# only those the image does not already have, so it never replaces the image's own.
# Idempotent: wheels already in DIR are kept, any other file is an error.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=${1:-.whl}
# name==version, one per distribution. Pure Python, so the same files serve any CPython >= 3.10.
wheels=(pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0)
limit_bytes=$((30 * 1024 * 1024))

mkdir -p "$dir"
python3 -m pip download --quiet --disable-pip-version-check --dest "$dir" --no-deps \
  --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any "${wheels[@]}"

# Exactly one wheel per pinned distribution, nothing else, under the size limit.
python3 - "$dir" "$limit_bytes" "${wheels[@]}" <<'PY'
import re, sys
from pathlib import Path

folder, limit, pins = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()
wanted = {norm(p.split("==")[0]): p.split("==")[1] for p in pins}
found: dict[str, list[str]] = {}
for f in sorted(folder.iterdir()):
    if not f.name.endswith(".whl"):
        sys.exit(f"gpu_wheels: {f} is not a wheel; {folder} must hold only the pinned wheels")
    name, version = f.name.split("-")[:2]
    found.setdefault(norm(name), []).append(version)
extra = sorted(set(found) - set(wanted))
stale = {n: v for n, v in found.items() if n in wanted and v != [wanted[n]]}
missing = sorted(set(wanted) - set(found))
if extra or stale or missing:
    sys.exit(f"gpu_wheels: {folder} does not match the pins (extra {extra}, other versions {stale},"
             f" missing {missing}); remove the folder and run again")
total = sum(f.stat().st_size for f in folder.iterdir())
if total > limit:
    sys.exit(f"gpu_wheels: {total} bytes of wheels, over the {limit}-byte limit")
print(f"gpu_wheels: {len(found)} wheels, {total / 2**20:.1f} MiB in {folder}")
PY

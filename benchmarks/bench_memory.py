"""Benchmark: SeCO's CPU memory against its floor and against plain backward.

    python -m benchmarks.bench_memory                  # 4-layer 256-wide Llama, fp32, 2K and 8K
    python -m benchmarks.bench_memory --glibc-default  # glibc's own (dynamic) mmap threshold

Two figures say whether chunk-wise training keeps only what it must:

- growth over floor: SeCO's peak extra memory at the long length minus at the short one,
  over what must grow with the sequence, the K/V cache and its gradient sums (per token:
  layers x 2 x kv_heads x head_dim x (dtype + gradient-sum dtype bytes)). 1.0 would be
  nothing but the floor; before the K/V block store it was 1.49x, the aim is <= 1.25x.
- plain / SeCO peak extra memory at the long length (the baseline, plain backward, from
  the same run): the aim is >= 8x.

Each case runs in its own process (`benchmarks.bench`'s child: build the model, reset the
peak-RSS probe, run the steps), so no case's peak includes another's allocations. Memory
figures do not depend on the machine's load; `--steps 0` (the default) runs the warm-up
step only, which is where the first step's peak is.

The children run with the allocator setting CPU workers train with
(`probes.return_freed_memory_to_os`: allocations of 64 KiB and more are mmapped, so freed
tensors leave the resident set). glibc's default raises that threshold as large blocks are
freed, after which the peak RSS also counts heap fragmentation, which grows with the
number of K/V blocks; `--glibc-default` measures that way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks import bench
from seco_core.kv_store import grad_dtype
from seco_core.memory_plan import parse_size

WORKER_MMAP_THRESHOLD = 64 * 1024
"""What `probes.return_freed_memory_to_os` sets in CPU workers."""
GROWTH_AIM = 1.25
RATIO_AIM = 8.0
MiB = 2**20


def floor_bytes_per_token(spec: dict[str, Any]) -> int:
    """Bytes that must grow per token: every layer's K and V and their gradient sums."""
    dtype = bench.DTYPES[spec["dtype"]]
    head_dim = spec["hidden"] // spec["heads"]
    per_tensor = spec["layers"] * 2 * spec["kv_heads"] * head_dim * spec["batch"]
    return per_tensor * (dtype.itemsize + grad_dtype(dtype).itemsize)


def figures(
    results: dict[tuple[str, int], dict[str, Any]], spec: dict[str, Any], short: int, long: int
) -> dict[str, float]:
    """The two ratios (and what they are made of) from the measured cases."""
    seco_short, seco_long, plain = results[("seco", short)], results[("seco", long)], results[("plain", long)]
    floor = floor_bytes_per_token(spec) * (long - short)
    growth = seco_long["peak_extra_bytes"] - seco_short["peak_extra_bytes"]
    return {
        "seco_short_mib": seco_short["peak_extra_bytes"] / MiB,
        "seco_long_mib": seco_long["peak_extra_bytes"] / MiB,
        "plain_long_mib": plain["peak_extra_bytes"] / MiB,
        "floor_growth_mib": floor / MiB,
        "seco_growth_mib": growth / MiB,
        "growth_over_floor": growth / floor,
        "plain_over_seco": plain["peak_extra_bytes"] / seco_long["peak_extra_bytes"],
    }


def format_report(fig: dict[str, float], short: int, long: int) -> str:
    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    return "\n".join(
        [
            f"SeCO peak extra: {fig['seco_short_mib']:.1f} MiB at {short}, {fig['seco_long_mib']:.1f} MiB at {long}",
            f"plain peak extra at {long}: {fig['plain_long_mib']:.1f} MiB",
            f"SeCO growth {short} -> {long}: {fig['seco_growth_mib']:.1f} MiB; K/V + K/V-gradient floor "
            f"{fig['floor_growth_mib']:.1f} MiB",
            f"growth / floor: {fig['growth_over_floor']:.2f}x (aim <= {GROWTH_AIM}x: "
            f"{verdict(fig['growth_over_floor'] <= GROWTH_AIM)})",
            f"plain / SeCO peak extra at {long}: {fig['plain_over_seco']:.2f}x (aim >= {RATIO_AIM}x: "
            f"{verdict(fig['plain_over_seco'] >= RATIO_AIM)})",
        ]
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", nargs=2, type=int, default=[2048, 8192], metavar=("SHORT", "LONG"))
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=0, help="steps after the warm-up step (memory needs none)")
    allocator = p.add_mutually_exclusive_group()
    allocator.add_argument(
        "--mmap-threshold",
        type=parse_size,
        default=WORKER_MMAP_THRESHOLD,
        help="glibc MALLOC_MMAP_THRESHOLD_ for the children (default: the CPU workers' 64KiB)",
    )
    allocator.add_argument("--glibc-default", action="store_true", help="leave glibc's dynamic threshold alone")
    p.add_argument("--jobs", type=int, default=1, help="cases run at once (peaks stay per process)")
    p.add_argument("--out", type=Path, help="write the figures and raw results as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    short, long = sorted(args.lengths)
    if short == long:
        raise SystemExit("bench_memory: the two lengths must differ")
    bench_argv = ["--lengths", str(short), str(long), "--chunk-size", str(args.chunk_size), "--steps", str(args.steps)]
    spec = bench.resolve(bench.parse_args(bench_argv))
    spec["mmap_threshold"] = None if args.glibc_default else args.mmap_threshold
    cases = [("seco", short), ("seco", long), ("plain", long)]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        measured = list(pool.map(lambda case: bench.run_child(case[0], case[1], spec), cases))
    results = dict(zip(cases, measured, strict=True))
    failed = [f"{m} L={n}: {r['status']} {r.get('error', '')}" for (m, n), r in results.items() if r["status"] != "ok"]
    if failed:
        print("\n".join(failed), file=sys.stderr)
        return 1
    fig = figures(results, spec, short, long)
    allocator = spec["mmap_threshold"] or os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default")
    print(
        f"model: {spec['layers']} layers, width {spec['hidden']}, {spec['dtype']}, chunk {spec['chunk_size']}, "
        f"MALLOC_MMAP_THRESHOLD_={allocator}"
    )
    print(format_report(fig, short, long))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"figures": fig, "results": [*results.values()]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Side by side on the real SmolLM2-135M-Instruct: what a user would run instead of SeCO.

    python scripts/real_model_bench.py                                  # 2K and 4K, cap 4 GiB
    python scripts/real_model_bench.py --lengths 1024 2048 --memory-cap 1.5GiB --threads 2
    python scripts/real_model_bench.py --skip-cap                       # the side-by-side table only

Methods (LoRA r16 on q/k/v/o, float32, real English text tiled to the length):
- hf:        PEFT LoRA, `model(input_ids, labels=labels).loss.backward()`
- hf-ckpt:   the same with `gradient_checkpointing_enable()` (non-reentrant)
- seco:      seco_core.chunked_backward, chunk `--chunk-size`
- seco-ckpt: the same with layer checkpointing inside a chunk

Part 1, at each `--lengths`: one step per method, each in its own process, after the model
is loaded; reported are the step's wall seconds and its peak RSS above the loaded model
(the model, tokenizer and runtime are the baseline), with ratios against hf-ckpt.

Part 2, the question users ask: under one memory cap (`--memory-cap`, peak RSS above the
loaded model), the longest sequence each method trains. Found cheaply, not by a long
bisection of multi-minute steps:
- hf, hf-ckpt: their peak grows as a L + b L^2 (logits, attention scores); fitted through
  part 1's measurements, solved for the cap, and verified by one step under the cap
  (a watchdog ends the child when its RSS passes it); on failure 15% shorter, at most
  `--max-tries` steps;
- SeCO: seco_core.memory_plan chooses the configuration (layer checkpointing or not, the
  chunk size) that trains the longest sequence under the cap, after scaling the cap by the
  plan's own error measured in part 1 (plan / measured step peak of that configuration);
  verified by one step at that length under the cap, 15% shorter on failure.
`--max-length-limit` bounds part 2's lengths (a CPU step at 32K takes many minutes).

Each measurement runs in a fresh process: a freed allocation often stays in the process's
RSS, so one case must never see another's. The memory-mapped weights are paged in before
the baseline is taken. Children default to one torch thread: on cores shared with other
work, OpenMP threads that spin waiting for each other slow a step down badly. Times on a
shared machine are noisy: the run prints the load average at its start and end.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METHODS = ("hf", "hf-ckpt", "seco", "seco-ckpt")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
TEXT = ROOT / "tests" / "real_model" / "public_domain.txt"
RESULT = "REAL_BENCH_RESULT "
OOM_EXIT = 86
SHRINK = 0.85
ROUND = 256


# ---------------------------------------------------------------- the child: one step


def real_tokens(tokenizer: Any, length: int) -> list[int]:
    """`length` tokens of real English prose (tests/real_model/public_domain.txt, repeated)."""
    ids: list[int] = tokenizer(TEXT.read_text()).input_ids
    return (ids * (length // len(ids) + 1))[:length]


def load(model_dir: Path, method: str, length: int, lora_r: int) -> Any:
    """The model as the method's user would set it up: fp32, PEFT LoRA on q/k/v/o."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa", max_position_embeddings=max(8192, length)
    )
    if method == "hf-ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=LORA_TARGETS))
    model.train()
    return model


def plan_for(config: Any, length: int, chunk: int, layer_checkpointing: bool, lora_r: int) -> Any:
    """memory_plan's estimate of one step of this benchmark (no optimizer, no workspace)."""
    from seco_core.memory_plan import PlanOptions, estimate

    options = PlanOptions(
        dtype_bytes=4,
        lora_r=lora_r,
        lora_targets=tuple(LORA_TARGETS),
        optimizer=False,
        workspace_bytes=0,
        layer_checkpointing=layer_checkpointing,
        fused_attention=True,
    )
    return estimate(config, length, chunk, options)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from benchmarks.bench import _start_cpu_watchdog
    from seco_core import ChunkConfig, chunked_backward
    from seco_core.probes import PeakMemory

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    method, length, chunk = spec["method"], spec["length"], spec["chunk_size"]
    model_dir = Path(spec["model_dir"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load(model_dir, method, length, spec["lora_r"])
    ids = torch.tensor([real_tokens(tokenizer, length)])
    labels = ids.clone()
    with torch.no_grad():  # page the memory-mapped safetensors weights in: they belong to the baseline
        for p in model.parameters():
            p.sum()
    gc.collect()
    probe = PeakMemory("cpu")
    if spec.get("cap_bytes"):
        _start_cpu_watchdog(probe.baseline_bytes + spec["cap_bytes"])
    if method.startswith("seco"):
        config = ChunkConfig(chunk_size=chunk, layer_checkpointing=method == "seco-ckpt")

        def step() -> float:
            return chunked_backward(model, ids, labels, config).loss
    else:

        def step() -> float:
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            return float(loss.detach())

    t0 = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - t0
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    result = {
        "method": method,
        "length": length,
        "status": "ok",
        "seconds": seconds,
        "loss": loss,
        "peak_extra_bytes": probe.peak_extra_bytes,
        "baseline_bytes": probe.baseline_bytes,
        "grad_norm": math.sqrt(sum(float(g.norm()) ** 2 for g in grads)),
        "grads": len(grads),
    }
    if method.startswith("seco"):
        base = model.get_base_model().config
        result["chunk_size"] = chunk
        result["plan_step_bytes"] = plan_for(base, length, chunk, method == "seco-ckpt", spec["lora_r"]).step_bytes
    return result


# ---------------------------------------------------------------- the parent


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in a fresh interpreter; a child ended by the cap (or the OOM killer) is "oom"."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    head = {"method": spec["method"], "length": spec["length"]}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=spec["timeout"], env=env, check=False)
    except subprocess.TimeoutExpired:
        return {**head, "status": "timeout"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT):
            return dict(json.loads(line[len(RESULT) :]))
    if proc.returncode in (OOM_EXIT, -9):
        return {**head, "status": "oom"}
    return {**head, "status": "error", "error": "\n".join(proc.stderr.strip().splitlines()[-12:])}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def describe(r: dict[str, Any]) -> str:
    if r["status"] != "ok":
        return f"{r['method']} L={r['length']}: {r['status']} {r.get('error', '')}"
    return f"{r['method']} L={r['length']}: {r['seconds']:.1f} s, {r['peak_extra_bytes'] / 2**30:.2f} GiB"


def fit_quadratic(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least squares peak = a L + b L^2 (no constant: nothing is added at L = 0)."""
    s11 = sum(x * x for x, _ in points)
    s12 = sum(x**3 for x, _ in points)
    s22 = sum(x**4 for x, _ in points)
    t1 = sum(x * y for x, y in points)
    t2 = sum(x * x * y for x, y in points)
    det = s11 * s22 - s12 * s12
    if len(points) < 2 or det == 0:
        x, y = points[-1]
        return y / x, 0.0
    return (t1 * s22 - t2 * s12) / det, (s11 * t2 - s12 * t1) / det


def solve_cap(a: float, b: float, cap: int) -> int:
    """Largest L with a L + b L^2 <= cap."""
    if b <= 0:
        return int(cap / a) if a > 0 else 0
    return int((-a + math.sqrt(a * a + 4 * b * cap)) / (2 * b))


def rounded(length: float) -> int:
    return max(ROUND, int(length) // ROUND * ROUND)


def seco_choice(model_dir: Path, cap: int, measured: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """The plan's pick for the longest sequence under `cap`: per configuration, the plan's
    longest length with the cap scaled by the plan's measured error, then the longest."""
    from transformers import AutoConfig

    from seco_core.memory_plan import FASTEST_CHUNK, PlanOptions, choose_chunk_size, max_length

    config = AutoConfig.from_pretrained(model_dir)
    best: dict[str, Any] = {}
    for method in ("seco", "seco-ckpt"):
        ok = [r for r in measured if r["method"] == method and r["status"] == "ok"]
        error = ok[-1]["plan_step_bytes"] / ok[-1]["peak_extra_bytes"] if ok else 1.0
        options = PlanOptions(
            dtype_bytes=4,
            lora_r=args.lora_r,
            lora_targets=tuple(LORA_TARGETS),
            optimizer=False,
            workspace_bytes=0,
            layer_checkpointing=method == "seco-ckpt",
            fused_attention=True,
            max_chunk=FASTEST_CHUNK.get("cpu", args.chunk_size),
        )
        weights = plan_for(config, 1, 1, False, args.lora_r).weights
        budget = weights + int(cap * error)
        longest = min(max_length(config, budget, None, options, limit=args.max_length_limit), args.max_length_limit)
        length = rounded(longest)
        chunk = choose_chunk_size(config, length, budget, options) or args.chunk_size
        if length > best.get("length", 0):
            best = {"method": method, "length": length, "chunk_size": chunk, "plan_error": error}
    return best


def verify(spec: dict[str, Any], length: int, tries: int) -> tuple[int, dict[str, Any] | None, int]:
    """One step at `length` under the cap; 15% shorter on failure. (length, result, steps run)."""
    for n in range(1, tries + 1):
        r = run({**spec, "length": length})
        log("  cap " + describe(r))
        if r["status"] == "ok":
            return length, r, n
        length = rounded(length * SHRINK)
    return 0, None, tries


def main(argv: list[str] | None = None) -> int:
    from seco_core.memory_plan import parse_size

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=None, help="default: the cache scripts/build_real_model.py builds")
    p.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument(
        "--memory-cap",
        type=parse_size,
        default=parse_size("4GiB"),
        help="part 2: peak RSS above the loaded model, e.g. 4GiB",
    )
    p.add_argument("--skip-cap", action="store_true", help="part 1 only")
    p.add_argument("--max-tries", type=int, default=3, help="part 2: steps per method at most")
    p.add_argument("--max-length-limit", type=int, default=65536)
    p.add_argument("--threads", type=int, default=1, help="torch threads per child (default 1: see the docstring)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per measurement")
    p.add_argument("--json", type=Path, help="write every figure here too")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(RESULT + json.dumps(child(json.loads(args.child))), flush=True)
        return 0

    from build_real_model import DEFAULT_DIR, build  # scripts/build_real_model.py (this script's directory)

    model_dir = args.model_dir or build(DEFAULT_DIR)
    base = {
        "model_dir": str(model_dir),
        "chunk_size": args.chunk_size,
        "lora_r": args.lora_r,
        "threads": args.threads,
        "timeout": args.timeout,
    }
    load_start = os.getloadavg()
    log(f"real_model_bench: {model_dir.name}, fp32, LoRA r{args.lora_r} on q/k/v/o, chunk {args.chunk_size}")

    results = []
    for length in sorted(args.lengths):
        for method in args.methods:
            r = run({**base, "method": method, "length": length})
            log("  " + describe(r))
            results.append(r)

    print(f"\n{'length':>7} {'method':>10} {'step s':>8} {'peak GiB':>9} {'loss':>7} {'plan/peak':>9}  vs hf-ckpt")
    for length in sorted(args.lengths):
        ref = next(
            (r for r in results if r["length"] == length and r["method"] == "hf-ckpt" and r["status"] == "ok"), None
        )
        for r in (r for r in results if r["length"] == length):
            if r["status"] != "ok":
                print(f"{length:>7} {r['method']:>10} {r['status'].upper():>8}")
                continue
            plan = f"{r['plan_step_bytes'] / r['peak_extra_bytes']:.2f}" if "plan_step_bytes" in r else "-"
            vs = ""
            if ref:
                less = ref["peak_extra_bytes"] / r["peak_extra_bytes"]
                vs = f"time {r['seconds'] / ref['seconds']:.2f}x, hf-ckpt's peak / this {less:.2f}x"
            print(
                f"{length:>7} {r['method']:>10} {r['seconds']:>8.1f} {r['peak_extra_bytes'] / 2**30:>9.2f} "
                f"{r['loss']:>7.3f} {plan:>9}  {vs}"
            )

    longest: list[dict[str, Any]] = []
    if not args.skip_cap:
        cap = args.memory_cap
        capped = {**base, "cap_bytes": cap}
        for method in (m for m in ("hf", "hf-ckpt") if m in args.methods):
            ok = [r for r in results if r["method"] == method and r["status"] == "ok"]
            pts = [(r["length"], r["peak_extra_bytes"]) for r in ok]
            if not pts:
                continue
            a, b = fit_quadratic(pts)
            guess = min(rounded(solve_cap(a, b, cap)), args.max_length_limit)
            length, found, n = verify({**capped, "method": method}, guess, args.max_tries)
            longest.append({"method": method, "length": length, "guess": guess, "steps": n, "result": found})
        choice = seco_choice(model_dir, cap, results, args)
        spec = {**capped, "method": choice["method"], "chunk_size": choice["chunk_size"]}
        length, found, n = verify(spec, choice["length"], args.max_tries)
        longest.append({**choice, "length": length, "guess": choice["length"], "steps": n, "result": found})

        print(f"\nlongest sequence under a cap of {cap / 2**30:.2f} GiB above the loaded model (one verified step):")
        hf_ckpt = next((x["length"] for x in longest if x["method"] == "hf-ckpt" and x["length"]), 0)
        for x in longest:
            got = x["result"]
            how = f"chunk {x['chunk_size']}, plan error {x['plan_error']:.2f}, " if "chunk_size" in x else ""
            fig = f"{got['seconds']:.1f} s, {got['peak_extra_bytes'] / 2**30:.2f} GiB" if got else "no length verified"
            ratio = f", {x['length'] / hf_ckpt:.1f}x hf-ckpt's" if hf_ckpt and x["length"] else ""
            print(
                f"  {x['method']:>10}: {x['length']} tokens ({how}first guess {x['guess']}, {x['steps']} step(s); "
                f"{fig}){ratio}"
            )
    load_end = os.getloadavg()
    print(f"load average at start {load_start[0]:.2f}, at end {load_end[0]:.2f} ({os.cpu_count()} CPUs)")
    if args.json:
        args.json.write_text(
            json.dumps({"results": results, "longest": longest, "load": [load_start, load_end]}, indent=2)
        )
    return 1 if any(r["status"] == "error" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

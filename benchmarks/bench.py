"""Benchmark: plain backward vs HF gradient checkpointing vs SeCO vs SpaCO.

    python -m benchmarks.bench                                  # CPU, 4-layer 256-wide Llama
    python -m benchmarks.bench --preset llama3-8b --memory-cap 24GiB --find-max-length

Every (method, length) is measured in a fresh subprocess, so the CPU peak RSS of one
measurement never includes another's allocations (freed memory is often kept by the
allocator) and an out-of-memory kill takes down only that measurement. In the child:
build the model with a fixed seed, reset the peak-memory probe (the baseline is the
built model), run one warm-up step and `--steps` timed steps, and report the peak extra
memory, the step times, the loss and the gradient norm (grads must be real). The parent
prints a table with ratios against plain in the same run and writes `bench.json` and
`bench.png` (memory and time vs length, one line per method) into `--out`.

Methods:
- plain:   model(input_ids, labels=labels).loss.backward()
- hf-ckpt: the same with model.gradient_checkpointing_enable() (non-reentrant)
- seco:    chunked_backward(..., ChunkConfig(chunk_size=C))
- spaco:   chunked_backward(..., ChunkConfig(chunk_size=C, mode="spaco", budget=t)),
           t = --budget, or max(1, int(k * --budget-fraction)) of k chunks (2 of 16)
- seco-ckpt, seco-offload, spaco-offload: the same with layer checkpointing inside a
           chunk, and with the KV cache and its gradients offloaded to host memory
- prefill: a no-grad forward of the decoder (no LM head): inference cost, for the
           training/inference time ratio (not in the default method list)

`--memory-cap` limits the child to a memory size: on CUDA with
`torch.cuda.set_per_process_memory_fraction`, on CPU with a watchdog thread that ends the
child (reported as OOM) when its RSS passes the cap. `--find-max-length` doubles the
length per method until OOM, then bisects to `--max-length-step` tokens.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seco_core.attention import FUSED_CUDA_DTYPES
from seco_core.memory_plan import GiB, ModelShape, PlanOptions, estimate, format_bytes, parse_size
from seco_core.probes import PeakMemory, Stopwatch, current_rss_bytes

# Chunk-wise methods and the ChunkConfig memory options each adds (issue: KV offload and
# layer checkpointing trade time for memory; the long-context preset compares them).
CHUNKED: dict[str, dict[str, bool]] = {
    "seco": {},
    "seco-ckpt": {"layer_checkpointing": True},
    "seco-offload": {"layer_checkpointing": True, "offload_kv": True},
    "spaco": {},
    "spaco-offload": {"layer_checkpointing": True, "offload_kv": True},
}
METHODS = ("plain", "hf-ckpt", *CHUNKED, "prefill")
DEFAULT_METHODS = ("plain", "hf-ckpt", "seco", "spaco")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RESULT_PREFIX = "BENCH_RESULT "
CPU_OOM_EXIT = 86
"""Exit status of a CPU child whose RSS passed --memory-cap (the watchdog's 'OOM')."""

PRESETS: dict[str, dict[str, Any]] = {
    # Small enough for a 2-core CPU; Llama-shaped, no GQA.
    "cpu-small": dict(
        layers=4,
        hidden=256,
        heads=4,
        kv_heads=4,
        intermediate=688,
        vocab=32000,
        dtype="float32",
        device="cpu",
        lengths=[2048, 4096, 8192],
        chunk_size=512,
        lora=False,
    ),
    # Llama-3-8B's shape with random weights, bf16, LoRA r=8 on q/k/v/o: for a GPU.
    "llama3-8b": dict(
        layers=32,
        hidden=4096,
        heads=32,
        kv_heads=8,
        intermediate=14336,
        vocab=128256,
        dtype="bfloat16",
        device="cuda",
        lengths=[4096, 8192, 16384],
        chunk_size=1024,
        lora=True,
    ),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


# ---------------------------------------------------------------- the child: one measurement


def build_model(spec: dict[str, Any], max_len: int) -> nn.Module:
    """A randomly initialised LlamaForCausalLM of the spec's shape (seeded), on its device.

    Parameters are created directly on the target device in the target dtype, so the
    8B preset never needs 32 GB of host RAM for an fp32 copy.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec["vocab"],
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        max_position_embeddings=max(max_len, 2048),
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec["seed"])
    with torch.device(spec["device"]):
        model = LlamaForCausalLM._from_config(config, dtype=DTYPES[spec["dtype"]], attn_implementation="sdpa")
    if spec["method"] == "hf-ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec["lora"]:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS)
        model = get_peft_model(model, lora)
    model.train()  # HF checkpointing is only active in training mode; Llama has no dropout
    return model


def spaco_budget(num_chunks: int, spec: dict[str, Any]) -> int:
    """t: --budget if given, else max(1, int(k * --budget-fraction)) (default 2 of 16)."""
    if spec.get("budget"):
        return int(spec["budget"])
    return max(1, int(num_chunks * spec["budget_fraction"]))


def make_step(
    method: str, model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, spec: dict[str, Any]
) -> Callable[[], dict[str, Any]]:
    """The work of one training step for `method`: accumulates grads, returns the loss."""
    if method in ("plain", "hf-ckpt"):

        def full() -> dict[str, Any]:
            loss = model(input_ids=input_ids, labels=labels).loss
            loss.backward()
            return {"loss": float(loss.detach())}

        return full

    if method == "prefill":
        decoder = _decoder(model)

        def prefill() -> dict[str, Any]:
            with torch.no_grad():
                decoder(input_ids=input_ids, use_cache=False)
            return {"loss": None}

        return prefill

    from seco_core import ChunkConfig, chunked_backward

    k = math.ceil(input_ids.shape[1] / spec["chunk_size"])
    options = CHUNKED[method]
    offload, ckpt = options.get("offload_kv", False), options.get("layer_checkpointing", False)
    if method.startswith("seco"):
        cfg = ChunkConfig(chunk_size=spec["chunk_size"], offload_kv=offload, layer_checkpointing=ckpt)
    else:
        cfg = ChunkConfig(
            chunk_size=spec["chunk_size"],
            mode="spaco",
            budget=spaco_budget(k, spec),
            sampling=spec["sampling"],
            offload_kv=offload,
            layer_checkpointing=ckpt,
        )
    gen = torch.Generator().manual_seed(spec["seed"])

    def chunked() -> dict[str, Any]:
        out = chunked_backward(model, input_ids, labels, cfg, generator=gen)
        return {"loss": out.loss, "num_chunks": out.num_chunks, "chunks_backpropagated": out.chunks_backpropagated}

    return chunked


def _decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (no LM head) of a plain or peft-wrapped causal LM."""
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    decoder = base.model
    assert isinstance(decoder, nn.Module)
    return decoder


def _grad_stats(model: nn.Module) -> tuple[float, int]:
    """(global L2 norm of the grads, number of trainable tensors that got a nonzero grad)."""
    sq, nonzero = 0.0, 0
    for p in model.parameters():
        if p.requires_grad and p.grad is not None:
            n = float(p.grad.detach().float().norm())
            sq += n * n
            nonzero += n > 0
    return math.sqrt(sq), nonzero


def _start_cpu_watchdog(cap_bytes: int) -> None:
    """End this process with CPU_OOM_EXIT when its RSS passes `cap_bytes` (polled every 2 ms).

    A CPU stand-in for a GPU memory cap: an allocation between two polls can overshoot it
    briefly, so on CPU the cap is approximate.
    """

    def watch() -> None:
        while True:
            if current_rss_bytes() > cap_bytes:
                sys.stderr.write(f"RSS passed the memory cap of {format_bytes(cap_bytes)}\n")
                sys.stderr.flush()
                os._exit(CPU_OOM_EXIT)
            time.sleep(0.002)

    threading.Thread(target=watch, daemon=True).start()


def timed_steps(
    step: Callable[[], dict[str, Any]], model: nn.Module, steps: int, device: str, *, grads: bool = True
) -> dict[str, Any]:
    """One warm-up step (allocator pools, lazy initialisations), then `steps` timed ones.

    Returns the last step's info with the wall seconds of each step, their mean, the mean
    CPU seconds of this process (all threads: unlike wall time, barely affected by other
    processes sharing the cores; with --threads 1 it tracks the work done) and, with
    `grads`, the gradient norm of the last step. Gradients are cleared between steps, so
    each step's are its own.
    """
    cpu0 = time.process_time()
    with Stopwatch(device) as sw:
        info = step()
    warmup_seconds, warmup_cpu = sw.seconds, time.process_time() - cpu0
    if steps:
        model.zero_grad(set_to_none=True)
    times: list[float] = []
    cpu_times: list[float] = []
    out: dict[str, Any] = {}
    for i in range(steps):
        cpu0 = time.process_time()
        with Stopwatch(device) as sw:
            info = step()
        times.append(sw.seconds)
        cpu_times.append(time.process_time() - cpu0)
        if grads:
            out["grad_norm"], out["grads_nonzero"] = _grad_stats(model)
        if i < steps - 1:
            model.zero_grad(set_to_none=True)
    out.update(info)
    if not times:  # steps=0: the warm-up step only (a memory measurement), timed as it ran
        times, cpu_times = [warmup_seconds], [warmup_cpu]
        if grads:
            out["grad_norm"], out["grads_nonzero"] = _grad_stats(model)
    out["step_seconds"] = times
    out["step_seconds_mean"] = sum(times) / len(times)
    out["cpu_seconds_mean"] = sum(cpu_times) / len(cpu_times)
    return out


def measure(method: str, length: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one (method, length) in this process; returns a JSON-able result dict.

    Peak extra memory is the peak (CUDA: allocated tensors; CPU: RSS) minus the usage
    right after the model and the inputs were built, over a warm-up step and the timed
    steps. An out-of-memory error is reported as {"status": "oom"}.
    """
    device = spec["device"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec.get("memory_cap"):
        if device.startswith("cuda"):
            index = torch.device(device).index or 0
            total = torch.cuda.get_device_properties(index).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, spec["memory_cap"] / total), index)
        else:
            _start_cpu_watchdog(spec["memory_cap"])

    result: dict[str, Any] = {"method": method, "length": length}
    try:
        model = build_model({**spec, "method": method}, length)
        gen = torch.Generator().manual_seed(spec["seed"] + 1)
        input_ids = torch.randint(0, spec["vocab"], (spec["batch"], length), generator=gen).to(device)
        labels = input_ids.clone()
        step = make_step(method, model, input_ids, labels, spec)
        gc.collect()
        probe = PeakMemory(device)
        result["baseline_bytes"] = probe.baseline_bytes

        result.update(timed_steps(step, model, spec["steps"], device, grads=method != "prefill"))
        result["peak_extra_bytes"] = probe.peak_extra_bytes
        result["status"] = "ok"
        if method in CHUNKED:
            result["plan_step_bytes"] = _plan_step_bytes(model, length, spec, CHUNKED[method])
        if spec.get("check_loss") and method == "seco":
            with torch.no_grad():
                ref = float(model(input_ids=input_ids, labels=labels).loss)
            result["loss_reference"] = ref
            result["loss_abs_diff"] = abs(ref - result["loss"])
    except torch.OutOfMemoryError as err:
        result = {"method": method, "length": length, "status": "oom", "error": str(err).splitlines()[0]}
    return result


def _plan_step_bytes(model: nn.Module, length: int, spec: dict[str, Any], variant: dict[str, bool]) -> int:
    """memory_plan's estimate of what a step adds to the built model, for comparison with
    the measured peak extra: KV cache and grads, one chunk's activations, logits and
    attention transients, plus the gradients of the trainable parameters."""
    from transformers import LlamaConfig

    shape = ModelShape.from_config(
        LlamaConfig(
            vocab_size=spec["vocab"],
            hidden_size=spec["hidden"],
            intermediate_size=spec["intermediate"],
            num_hidden_layers=spec["layers"],
            num_attention_heads=spec["heads"],
            num_key_value_heads=spec["kv_heads"],
        ),
        num_params=sum(p.numel() for p in model.parameters()),
    )
    options = PlanOptions(
        dtype_bytes=DTYPES[spec["dtype"]].itemsize,
        batch_size=spec["batch"],
        lora_r=8 if spec["lora"] else None,
        optimizer=False,
        workspace_bytes=0,
        layer_checkpointing=variant.get("layer_checkpointing", False),
        kv_offload=variant.get("offload_kv", False),
        fused_attention=spec["device"] == "cpu" or DTYPES[spec["dtype"]] in FUSED_CUDA_DTYPES,
    )
    e = estimate(shape, length, spec["chunk_size"], options)
    # trainable_state without an optimizer: grads (+ the fp32 adapter weights under LoRA,
    # which are already in the baseline).
    adapter_weights = 4 * shape.lora_params(8, tuple(LORA_TARGETS)) if spec["lora"] else 0
    return e.step_bytes + e.trainable_state - adapter_weights


def child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    result = measure(spec["method"], spec["length"], spec)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------- the parent: orchestration


def run_child(method: str, length: int, spec: dict[str, Any], module: str = "benchmarks.bench") -> dict[str, Any]:
    """Run `module`'s measurement in a fresh interpreter; a killed child (OOM killer, CPU cap) is OOM."""
    child_spec = {**spec, "method": method, "length": length}
    cmd = [sys.executable, "-m", module, "--child-spec", json.dumps(child_spec)]
    try:
        env = dict(os.environ)
        if spec.get("mmap_threshold"):
            # glibc: allocations above this are mmapped and returned on free, so the CPU
            # peak RSS tracks live tensor bytes (like CUDA's counters) instead of also
            # counting heap fragmentation.
            env["MALLOC_MMAP_THRESHOLD_"] = str(spec["mmap_threshold"])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=spec["timeout"], env=env)
    except subprocess.TimeoutExpired:
        return {"method": method, "length": length, "status": "timeout"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return dict(json.loads(line[len(RESULT_PREFIX) :]))
    if proc.returncode in (CPU_OOM_EXIT, -9) or "OutOfMemory" in proc.stderr:
        return {"method": method, "length": length, "status": "oom", "error": f"child exit {proc.returncode}"}
    tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
    return {"method": method, "length": length, "status": "error", "error": tail}


def find_max_length(method: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Longest length (a multiple of max_length_step) `method` trains: doubling, then bisection."""
    step = spec["max_length_step"]
    length, best, best_result, fail = spec["lengths"][0], 0, None, None
    while length <= spec["max_length_limit"]:
        r = run_child(method, length, spec)
        _log(f"  find-max-length {method} L={length}: {r['status']}")
        if r["status"] != "ok":
            fail = length
            break
        best, best_result, length = length, r, length * 2
    if fail is not None:
        lo, hi = best, fail
        while hi - lo > step:
            mid = (lo + hi) // 2 // step * step
            if mid <= lo:
                break
            r = run_child(method, mid, spec)
            _log(f"  find-max-length {method} L={mid}: {r['status']}")
            if r["status"] == "ok":
                lo, best, best_result = mid, mid, r
            else:
                hi = mid
    row = {
        "method": method,
        "max_length": best,
        "hit_limit": fail is None,
        "step_seconds": best_result["step_seconds_mean"] if best_result else None,
        "peak_extra_bytes": best_result["peak_extra_bytes"] if best_result else None,
    }
    if best_result and method.startswith("spaco"):
        # SpaCO's promise: training cost tends to inference cost as L grows.
        prefill = run_child("prefill", best, spec)
        if prefill["status"] == "ok":
            row["train_over_prefill"] = best_result["step_seconds_mean"] / prefill["step_seconds_mean"]
    return row


def _get(results: list[dict[str, Any]], method: str, length: int) -> dict[str, Any] | None:
    for r in results:
        if r["method"] == method and r["length"] == length and r["status"] == "ok":
            return r
    return None


def ratios(results: list[dict[str, Any]], lengths: list[int]) -> dict[str, dict[str, float]]:
    """Per length: plain/X peak memory, X/plain step time, and SeCO/SpaCO speedup."""
    out: dict[str, dict[str, float]] = {}
    for length in lengths:
        row: dict[str, float] = {}
        plain = _get(results, "plain", length)
        for m in ("hf-ckpt", "seco", "spaco"):
            r = _get(results, m, length)
            if plain and r and r["peak_extra_bytes"] > 0:
                row[f"plain/{m} memory"] = plain["peak_extra_bytes"] / r["peak_extra_bytes"]
                row[f"{m}/plain time"] = r["step_seconds_mean"] / plain["step_seconds_mean"]
        seco, spaco, prefill = (_get(results, m, length) for m in ("seco", "spaco", "prefill"))
        if seco and spaco:
            row["seco/spaco speedup"] = seco["step_seconds_mean"] / spaco["step_seconds_mean"]
        if seco:
            grow = _get(results, "seco", lengths[0])
            if grow and length != lengths[0]:
                row[f"seco memory vs L={lengths[0]}"] = seco["peak_extra_bytes"] / grow["peak_extra_bytes"]
        for m in ("seco", "spaco"):
            r = _get(results, m, length)
            if r and prefill:
                row[f"{m}/prefill time"] = r["step_seconds_mean"] / prefill["step_seconds_mean"]
        out[str(length)] = row
    return out


def format_table(results: list[dict[str, Any]], rat: dict[str, dict[str, float]]) -> str:
    lines = [
        f"{'length':>8} {'method':>8} {'peak extra MB':>14} {'step s':>9} {'cpu s':>9} {'loss':>9} {'plan MB':>9} "
        f"{'plan/peak':>9}"
    ]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"{r['length']:>8} {r['method']:>8} {r['status'].upper():>14}")
            continue
        loss = f"{r['loss']:.4f}" if r.get("loss") is not None else "-"
        plan = f"{r['plan_step_bytes'] / 2**20:.1f}" if "plan_step_bytes" in r else "-"
        ratio = f"{r['plan_step_bytes'] / r['peak_extra_bytes']:.2f}" if r.get("plan_step_bytes") else "-"
        lines.append(
            f"{r['length']:>8} {r['method']:>8} {r['peak_extra_bytes'] / 2**20:>14.1f} "
            f"{r['step_seconds_mean']:>9.3f} {r.get('cpu_seconds_mean', 0.0):>9.3f} {loss:>9} {plan:>9} {ratio:>9}"
        )
    for length, row in rat.items():
        if row:
            lines.append(f"L={length}: " + ", ".join(f"{k} {v:.2f}x" for k, v in row.items()))
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], methods: list[str], path: Path) -> None:
    """Peak extra memory and step time vs length, one line per method (OOM points absent)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in methods:
        ok = sorted((r for r in results if r["method"] == m and r["status"] == "ok"), key=lambda r: r["length"])
        if not ok:
            continue
        xs = [r["length"] for r in ok]
        if m != "prefill":
            ax_mem.plot(xs, [r["peak_extra_bytes"] / 2**20 for r in ok], marker="o", label=m)
        ax_time.plot(xs, [r["step_seconds_mean"] for r in ok], marker="o", label=m)
    for ax, title, ylabel in (
        (ax_mem, "Peak extra memory", "MiB above the built model"),
        (ax_time, "Step time", "seconds per step"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS))
    p.add_argument("--lengths", nargs="+", type=int, help="sequence lengths (default: the preset's)")
    p.add_argument("--chunk-size", type=int, help="SeCO/SpaCO chunk size (default: the preset's)")
    p.add_argument("--budget", type=int, help="SpaCO: chunks back-propagated (default: from --budget-fraction)")
    p.add_argument("--budget-fraction", type=float, default=2 / 16, help="SpaCO: t = max(1, int(k * this))")
    p.add_argument(
        "--sampling",
        choices=["fixed", "bernoulli"],
        default="fixed",
        help="SpaCO sampling; fixed (exactly t chunks) keeps step times comparable",
    )
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", help="cpu or cuda[:N] (default: the preset's)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: the preset's")
    lora = p.add_mutually_exclusive_group()
    lora.add_argument("--lora", dest="lora", action="store_true", default=None, help="attach LoRA r=8 on q/k/v/o")
    lora.add_argument("--no-lora", dest="lora", action="store_false")
    for name in ("layers", "hidden", "heads", "kv-heads", "intermediate", "vocab"):
        p.add_argument(f"--{name}", type=int, help="model shape (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-cap", type=parse_size, help="e.g. 24GiB (CUDA: memory fraction; CPU: RSS watchdog)")
    p.add_argument("--find-max-length", action="store_true", help="per method: double L until OOM, then bisect")
    p.add_argument("--max-length-limit", type=int, default=2**20, help="stop the doubling here")
    p.add_argument("--max-length-step", type=int, help="bisection resolution (default: the chunk size)")
    p.add_argument("--threads", type=int, help="torch CPU threads per child (default: torch's)")
    p.add_argument(
        "--mmap-threshold",
        type=parse_size,
        help="CPU: glibc MALLOC_MMAP_THRESHOLD_ for children, e.g. 128KiB (RSS ~ live bytes)",
    )
    p.add_argument("--jobs", type=int, default=1, help="children run at once (>1 distorts times)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per measurement")
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--child-spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """The run's spec: preset values overridden by the flags given."""
    preset = PRESETS[args.preset]
    spec: dict[str, Any] = {
        "preset": args.preset,
        "layers": args.layers or preset["layers"],
        "hidden": args.hidden or preset["hidden"],
        "heads": args.heads or preset["heads"],
        "kv_heads": args.kv_heads or preset["kv_heads"],
        "intermediate": args.intermediate or preset["intermediate"],
        "vocab": args.vocab or preset["vocab"],
        "dtype": args.dtype or preset["dtype"],
        "device": args.device or preset["device"],
        "lengths": sorted(args.lengths or preset["lengths"]),
        "chunk_size": args.chunk_size or preset["chunk_size"],
        "lora": preset["lora"] if args.lora is None else args.lora,
        "budget": args.budget,
        "budget_fraction": args.budget_fraction,
        "sampling": args.sampling,
        "steps": args.steps,
        "batch": args.batch,
        "seed": args.seed,
        "memory_cap": args.memory_cap,
        "max_length_limit": args.max_length_limit,
        "timeout": args.timeout,
        "threads": args.threads,
        "mmap_threshold": args.mmap_threshold,
    }
    spec["max_length_step"] = args.max_length_step or spec["chunk_size"]
    if args.find_max_length and spec["device"] == "cpu" and not spec["memory_cap"]:
        from seco_core.memory_plan import device_budget_bytes

        spec["memory_cap"] = device_budget_bytes("cpu")  # never let the doubling exhaust the host
    return spec


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_spec:
        return child_main(args.child_spec)
    spec = resolve(args)
    methods: list[str] = args.methods
    _log(f"bench: {json.dumps({k: v for k, v in spec.items() if k != 'timeout'})}")

    def one(m: str, length: int) -> dict[str, Any]:
        check = m == "seco" and length == spec["lengths"][0]
        r = run_child(m, length, {**spec, "check_loss": check})
        _log(
            f"  {m} L={length}: {r['status']}"
            + (
                f", {r['peak_extra_bytes'] / 2**20:.1f} MB, {r['step_seconds_mean']:.3f} s"
                if r["status"] == "ok"
                else f" {r.get('error', '')}"
            )
        )
        return r

    # --jobs > 1 runs children side by side: peaks stay per process, but times then
    # share the CPU (for smoke tests, not for figures).
    pairs = [(m, length) for length in spec["lengths"] for m in methods]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda ml: one(*ml), pairs))

    problems = _sanity(results, methods)
    rat = ratios(results, spec["lengths"])
    report: dict[str, Any] = {
        "spec": spec,
        "results": results,
        "ratios": rat,
        "problems": problems,
        "environment": {
            "torch": torch.__version__,
            "cpu_threads": spec["threads"] or torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
    }
    if args.find_max_length:
        report["max_length"] = [find_max_length(m, spec) for m in methods if m != "prefill"]

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(report, indent=2))
    plot(results, methods, args.out / "bench.png")

    print(format_table(results, rat))
    for row in report.get("max_length", []):
        limit = " (hit --max-length-limit)" if row["hit_limit"] else ""
        secs = f", {row['step_seconds']:.2f} s/step" if row["step_seconds"] else ""
        ratio = f", training/inference time {row['train_over_prefill']:.2f}x" if "train_over_prefill" in row else ""
        print(f"max length {row['method']}: {row['max_length']}{limit}{secs}{ratio}")
    for msg in problems:
        print(f"PROBLEM: {msg}")
    if spec["memory_cap"]:
        print(f"memory cap: {format_bytes(spec['memory_cap'])} ({spec['memory_cap'] / GiB:.2f} GiB)")
    print(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")
    return 1 if any(r["status"] == "error" for r in results) else 0


def _sanity(results: list[dict[str, Any]], methods: list[str]) -> list[str]:
    """Grads must be real (finite, nonzero) and SeCO's loss must equal plain's."""
    problems = []
    for r in results:
        if r["status"] == "error":
            problems.append(f"{r['method']} L={r['length']} failed: {r.get('error', '')[-300:]}")
        if r["status"] != "ok" or r["method"] == "prefill":
            continue
        g = r.get("grad_norm", 0.0)
        if not (math.isfinite(g) and g > 0):
            problems.append(f"{r['method']} L={r['length']}: gradient norm {g} (grads not accumulated)")
        if "loss_abs_diff" in r and r["loss_abs_diff"] > 1e-4:
            problems.append(f"seco L={r['length']}: loss {r['loss']:.6f} != plain forward {r['loss_reference']:.6f}")
    return problems


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: the serving engine (`seco_core.generate`) against plain transformers.

    python -m benchmarks.bench_serve            # prefill at 4K / 16K / 64K, generation speed
    python -m benchmarks.bench_serve --quick    # 1K / 2K, a few tokens: a smoke run (seconds)
    python -m benchmarks.bench_serve --device cuda

Two tables, from one run, on a tiny random Llama built from its config (no download):

- Prefill peak memory per prompt length, each case in a fresh process (CPU: peak RSS
  above the built model, with the allocator setting CPU workers use; CUDA: allocated
  tensors): `chunked` (the engine: chunks of `--chunk` through a DynamicCache, only the
  last position's logits), `forward` (a plain transformers forward of the whole prompt,
  which returns every position's logits) and `forward-last` (the same with
  `logits_to_keep=1`, which is what `generate`'s own prefill does). The K/V cache every
  method must hold is printed beside them; `chunked - KV` is what prefill adds on top of
  it, which should stay flat as the prompt grows.
- Generation with the same peft LoRA adapter: time to first token and decode tokens/s of
  the engine (`generate_tokens`, greedy) against `model.generate(do_sample=False)` with a
  streamer, interleaved runs, the best of `--repeats` each (the machine may be shared).
  Both produce the same tokens (checked). The aim is >= 0.9x generate's tokens/s.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from torch import nn

from seco_core.generate import SamplingParams, generate_tokens
from seco_core.probes import PeakMemory, Stopwatch, return_freed_memory_to_os

RESULT_PREFIX = "BENCH_SERVE "
MiB = 2**20
PREFILL_METHODS = ("chunked", "forward", "forward-last")
TPS_AIM = 0.9


def build_model(spec: dict[str, Any], max_len: int, lora: bool = False) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec["seed"])
    config = LlamaConfig(
        vocab_size=spec["vocab"],
        hidden_size=spec["hidden"],
        intermediate_size=2 * spec["hidden"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        max_position_embeddings=max_len,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    dtype = torch.float32 if spec["device"] == "cpu" else torch.bfloat16
    model: nn.Module = LlamaForCausalLM(config).to(device=spec["device"], dtype=dtype).eval()
    if lora:
        from peft import LoraConfig, get_peft_model

        peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(model, peft_config).eval()  # type: ignore[arg-type]
    return model


def kv_bytes(spec: dict[str, Any], length: int) -> int:
    """The K/V cache of `length` tokens: layers x 2 x kv_heads x head_dim x dtype bytes per token."""
    itemsize = 4 if spec["device"] == "cpu" else 2
    return spec["layers"] * 2 * spec["kv_heads"] * (spec["hidden"] // spec["heads"]) * itemsize * length


# ---------------------------------------------------------------- children: one prefill each


def measure_prefill(method: str, length: int, spec: dict[str, Any]) -> dict[str, Any]:
    from transformers import DynamicCache

    from seco_core.generate import chunked_prefill

    if spec["device"] == "cpu":
        return_freed_memory_to_os()
    model = build_model(spec, length + 1)
    ids = torch.randint(0, spec["vocab"], (1, length), generator=torch.Generator().manual_seed(1)).to(spec["device"])
    gc.collect()
    probe = PeakMemory(spec["device"])
    watch = Stopwatch(spec["device"])
    with torch.inference_mode(), watch:
        if method == "chunked":
            cache = DynamicCache()
            logits = chunked_prefill(model, ids, cache, spec["chunk"])
        else:
            keep = {"logits_to_keep": 1} if method == "forward-last" else {}
            out = model(input_ids=ids, use_cache=True, **keep)
            logits = out.logits[0, -1]
    result = {
        "method": method,
        "length": length,
        "status": "ok",
        "peak_extra_bytes": probe.peak_extra_bytes,
        "seconds": watch.seconds,
        "next_token": int(logits.argmax()),
    }
    return result


def run_child(method: str, length: int, spec: dict[str, Any]) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_serve",
        "--child",
        json.dumps({**spec, "method": method, "length": length}),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=spec["timeout"])
    except subprocess.TimeoutExpired:
        return {"method": method, "length": length, "status": "timeout"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return dict(json.loads(line[len(RESULT_PREFIX) :]))
    status = "oom" if proc.returncode == -9 or "OutOfMemory" in proc.stderr else "error"
    return {"method": method, "length": length, "status": status, "error": proc.stderr.strip()[-800:]}


# ---------------------------------------------------------------- generation speed (this process)


class _Times:
    """A transformers streamer that records when each token arrives (the first `put` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        return None


def _rates(start: float, times: list[float]) -> tuple[float, float]:
    """(time to first token, decode tokens/s after the first)."""
    ttft = times[0] - start
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    return ttft, decode


def measure_generation(spec: dict[str, Any]) -> dict[str, Any]:
    device, n = spec["device"], spec["new_tokens"]
    model = build_model(spec, spec["gen_prompt"] + n + 1, lora=True)
    ids = torch.randint(0, spec["vocab"], (1, spec["gen_prompt"]), generator=torch.Generator().manual_seed(2)).to(
        device
    )
    params = SamplingParams(max_tokens=n, temperature=0)
    hf: list[tuple[float, float]] = []
    ours: list[tuple[float, float]] = []
    same = True
    for _ in range(spec["repeats"]):
        streamer = _Times()
        start = time.perf_counter()
        out = model.generate(  # type: ignore[operator]
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            eos_token_id=None,
            pad_token_id=0,
            streamer=streamer,
        )
        hf.append(_rates(start, streamer.times))
        times, tokens = [], []
        start = time.perf_counter()
        for step in generate_tokens(model, ids, params, prefill_chunk=spec["chunk"]):
            if device != "cpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter())
            tokens.append(step.token)
        ours.append(_rates(start, times))
        same = same and tokens == out[0, ids.shape[1] :].tolist()
    best_hf = (min(t for t, _ in hf), max(r for _, r in hf))
    best_ours = (min(t for t, _ in ours), max(r for _, r in ours))
    return {
        "prompt": spec["gen_prompt"],
        "new_tokens": n,
        "same_tokens": same,
        "generate_ttft_s": best_hf[0],
        "generate_tps": best_hf[1],
        "engine_ttft_s": best_ours[0],
        "engine_tps": best_ours[1],
        "generate_tps_median": statistics.median(r for _, r in hf),
        "engine_tps_median": statistics.median(r for _, r in ours),
    }


# ---------------------------------------------------------------- report


def format_prefill(results: list[dict[str, Any]], spec: dict[str, Any]) -> str:
    rows = [
        f"{'prompt':>8} {'K/V MiB':>9} "
        + " ".join(f"{m + ' MiB':>17}" for m in PREFILL_METHODS)
        + f" {'chunked-KV MiB':>15} {'forward/chunked':>16} {'chunked s':>10} {'forward s':>10}"
    ]
    for length in spec["lengths"]:
        by = {r["method"]: r for r in results if r["length"] == length}

        def mib(m: str) -> str:
            r = by.get(m, {})
            return f"{r['peak_extra_bytes'] / MiB:17.1f}" if r.get("status") == "ok" else f"{r.get('status', '-'):>17}"

        chunked, forward = by.get("chunked", {}), by.get("forward", {})
        kv = kv_bytes(spec, length)
        extra = ratio = "-"
        if chunked.get("status") == "ok":
            extra = f"{(chunked['peak_extra_bytes'] - kv) / MiB:.1f}"
            if forward.get("status") == "ok":
                ratio = f"{forward['peak_extra_bytes'] / max(1, chunked['peak_extra_bytes']):.2f}x"
        secs = [
            f"{by[m]['seconds']:10.2f}" if by.get(m, {}).get("status") == "ok" else f"{'-':>10}"
            for m in ("chunked", "forward")
        ]
        rows.append(
            f"{length:>8} {kv / MiB:9.1f} "
            + " ".join(mib(m) for m in PREFILL_METHODS)
            + f" {extra:>15} {ratio:>16} "
            + " ".join(secs)
        )
    return "\n".join(rows)


def format_generation(g: dict[str, Any]) -> str:
    ratio = g["engine_tps"] / g["generate_tps"]
    verdict = "ok" if ratio >= TPS_AIM else "MISSED"
    return "\n".join(
        [
            f"generation: prompt {g['prompt']} tokens, {g['new_tokens']} new tokens, greedy, LoRA r=8 (same tokens: {g['same_tokens']})",
            f"{'':>14} {'TTFT ms':>9} {'decode tok/s':>13} {'(median)':>9}",
            f"{'generate':>14} {g['generate_ttft_s'] * 1e3:9.1f} {g['generate_tps']:13.1f} {g['generate_tps_median']:9.1f}",
            f"{'seco engine':>14} {g['engine_ttft_s'] * 1e3:9.1f} {g['engine_tps']:13.1f} {g['engine_tps_median']:9.1f}",
            f"engine / generate: tokens/s {ratio:.2f}x (aim >= {TPS_AIM}x: {verdict}), "
            f"TTFT {g['engine_ttft_s'] / g['generate_ttft_s']:.2f}x",
        ]
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small lengths and few tokens: a smoke run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--lengths", type=int, nargs="+", help="prompt lengths for prefill (default 4096 16384 65536)")
    p.add_argument("--chunk", type=int, help="prefill chunk (default 2048, quick 256)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary: what a full forward's logits scale with")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, help="tokens generated per run (default 128, quick 16)")
    p.add_argument("--gen-prompt", type=int, help="prompt tokens for the generation runs (default 1024, quick 64)")
    p.add_argument("--repeats", type=int, help="generation runs per side (default 5, quick 1)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per prefill child")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="also print the raw results as JSON")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    return {
        "device": args.device,
        "lengths": sorted(args.lengths or ([1024, 2048] if quick else [4096, 16384, 65536])),
        "chunk": args.chunk or (256 if quick else 2048),
        "vocab": args.vocab,
        "hidden": args.hidden,
        "layers": args.layers,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "new_tokens": args.new_tokens or (16 if quick else 128),
        "gen_prompt": args.gen_prompt or (64 if quick else 1024),
        "repeats": args.repeats or (1 if quick else 5),
        "timeout": args.timeout,
        "seed": args.seed,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child = json.loads(args.child)
        print(RESULT_PREFIX + json.dumps(measure_prefill(child["method"], child["length"], child)), flush=True)
        return 0
    spec = resolve(args)
    print(
        f"tiny Llama: {spec['layers']} layers, width {spec['hidden']}, {spec['heads']} heads / {spec['kv_heads']} KV, "
        f"vocab {spec['vocab']}, on {spec['device']}; prefill chunk {spec['chunk']}",
        flush=True,
    )
    results = [run_child(m, n, spec) for n in spec["lengths"] for m in PREFILL_METHODS]
    failed = [r for r in results if r["status"] not in ("ok", "oom", "timeout")]
    print("\nprefill peak extra memory (above the built model)")
    print(format_prefill(results, spec))
    agree = {n: {r["next_token"] for r in results if r["length"] == n and r["status"] == "ok"} for n in spec["lengths"]}
    print("next token equal across methods: " + ", ".join(f"{n}: {len(v) == 1}" for n, v in agree.items()))
    gen = measure_generation(spec)
    print()
    print(format_generation(gen))
    if args.json:
        print(json.dumps({"prefill": results, "generation": gen}))
    for r in failed:
        print(f"{r['method']} at {r['length']} failed: {r.get('error')}", file=sys.stderr)
    return 1 if failed or not gen["same_tokens"] else 0


if __name__ == "__main__":
    sys.exit(main())

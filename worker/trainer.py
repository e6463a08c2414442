"""The training loop: one fine-tuning job from JSONL file to PEFT adapter.

Plain code that reads top to bottom: load data, plan memory, load the model and attach
LoRA, then run optimizer steps with seco_core's chunk-wise backward, reporting metrics
and writing checkpoints as it goes, and resuming from the newest checkpoint if an
earlier attempt at the same job died. The Celery task (tasks.py) only wraps it.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer

from seco_core import ChunkConfig, UnsupportedModelError, chunked_backward, chunked_evaluate
from seco_core.attention import FUSED_CUDA_DTYPES
from seco_core.dpo import DEFAULT_BETA
from seco_core.kv_store import HostBuffers
from seco_core.loading import load_causal_lm
from seco_core.lora import attach_lora, pack_adapter, save_adapter
from seco_core.memory_plan import JobPlan, PlanRefused, device_budget_bytes, format_bytes, plan_job
from seco_core.position_buckets import PositionLosses
from seco_core.probes import PeakMemory
from seco_core.selfcheck import self_check
from seco_core.windows import Window, split_documents
from worker.checkpoints import Position, latest_checkpoint, load_checkpoint, save_checkpoint
from worker.data import DataError, load_documents, load_preferences
from worker.divergence import DivergenceGuard
from worker.objective import Objective, StepResult, step_seed
from worker.position_report import (
    VALID_BY_POSITION,
    comparison,
    csv_cells,
    csv_column,
    present_buckets,
    starting_losses,
)
from worker.preference import check_pair_lengths, preference_objective
from worker.spec import JobCancelled, JobPaused, TrainContext, TrainingError, TrainResult, TrainSpec

BASE_LEARNING_RATE = 2e-4
"""Learning rate at learning_rate_multiplier=1 (a common LoRA default)."""
AUTO_EPOCHS = 3
WARMUP_FRACTION = 0.05
MAX_GRAD_NORM = 1.0
CHECKPOINTS_PER_EPOCH = 4
"""With checkpoint_every unset: about this many checkpoints per epoch, plus one at its end."""

METRIC_FIELDS = [
    "step",
    "train_loss",
    "train_accuracy",
    "valid_loss",
    "valid_mean_token_accuracy",
    "total_steps",
    "epoch",
    "learning_rate",
    "tokens",
    "tokens_per_second",
    "step_seconds",
    "peak_memory_bytes",
    "chunks_backpropagated",
    "full_valid_loss",
    "full_valid_mean_token_accuracy",
]
"""Metrics CSV columns: OpenAI's five first, in its order and with its names (a script reading
OpenAI's result file reads ours), then ours. `train_accuracy` is the training token accuracy
(`train_mean_token_accuracy` in events); a value a step does not have is an empty cell."""
FULL_VALIDATION = {"valid_loss": "full_valid_loss", "valid_mean_token_accuracy": "full_valid_mean_token_accuracy"}
"""At the last step, the validation over the whole validation file is reported under OpenAI's
`full_valid_*` names too (every validation of ours already covers the whole file)."""


def train(spec: TrainSpec, ctx: TrainContext) -> TrainResult:
    """Run (or resume) a job; raises JobCancelled or TrainingError with a user-facing message."""
    try:
        return _train(spec, ctx)
    except DataError as exc:
        raise TrainingError(str(exc), code="invalid_file", param=exc.file) from exc
    except UnsupportedModelError as exc:
        raise TrainingError(str(exc), code="unsupported_model", param="model") from exc
    except torch.OutOfMemoryError as exc:
        raise TrainingError(
            f"out of memory on {spec.device}: {exc}. Try a smaller seco.chunk_size or max_length.",
            code="out_of_memory",
        ) from exc


def _train(spec: TrainSpec, ctx: TrainContext) -> TrainResult:
    device = torch.device(spec.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(spec.seed)

    # Data (every record validated and tokenised before the model is loaded) and the memory plan.
    tokenizer = AutoTokenizer.from_pretrained(spec.model_path)
    model_config = AutoConfig.from_pretrained(spec.model_path)
    build = _preference_objective if spec.method == "dpo" else _supervised_objective
    objective, job_plan = build(spec, tokenizer, model_config, dtype, ctx)
    hyper = resolve_hyperparameters(spec)
    ctx.hyperparameters(hyper)

    # Model with LoRA; a short self-check that chunk-wise gradients match a plain backward.
    model = _load_model(spec, dtype, device)
    check = self_check(
        model, seq_len=min(96, job_plan.max_length), chunk_size=max(2, min(32, job_plan.max_length // 3))
    )
    ctx.message(
        f"self-check passed: chunk-wise vs plain gradient relative error {check.rel_error:.2e} "
        f"(tolerance {check.tolerance:g} for {str(check.compute_dtype).removeprefix('torch.')})"
    )

    chunk_config = spec.seco.chunk_config(
        job_plan.chunk_size, offload_kv=job_plan.offload_kv, layer_checkpointing=job_plan.layer_checkpointing
    )
    batch_size, n_epochs = hyper["batch_size"], hyper["n_epochs"]
    batches_per_epoch = math.ceil(len(objective.items) / batch_size)
    total_steps = n_epochs * batches_per_epoch
    checkpoint_every = spec.checkpoint_every or max(1, batches_per_epoch // CHECKPOINTS_PER_EPOCH)

    trainable = [p for p in model.parameters() if p.requires_grad]
    lr = BASE_LEARNING_RATE * hyper["learning_rate_multiplier"]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(total_steps))

    spec.output_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = spec.output_dir / "checkpoints"
    metrics_csv = spec.output_dir / "metrics.csv"
    position = Position(step=0, epoch=0, batch_in_epoch=0, trained_tokens=0)
    resume_from = latest_checkpoint(checkpoints)
    guard = DivergenceGuard()
    if resume_from is not None:
        position, resumed_metrics = load_checkpoint(resume_from, model, optimizer, scheduler)
        guard.resumed(position.step, resumed_metrics)
        ctx.message(f"resumed from checkpoint at step {position.step} of {total_steps}", data={"step": position.step})
    # a fresh start drops every row of an attempt that died before its first checkpoint, step 0's too
    _truncate_metrics(metrics_csv, position.step if resume_from is not None else -1, objective.fields)
    ctx.message(
        f"training {total_steps} steps: {n_epochs} epochs x {batches_per_epoch} batches of {batch_size} "
        f"{objective.unit}{f' (DPO, beta {_beta(spec)})' if spec.method == 'dpo' else ''}, "
        f"max_length {job_plan.max_length}, chunk_size {chunk_config.chunk_size}, mode {chunk_config.mode}, "
        f"layer checkpointing {'on' if job_plan.layer_checkpointing else 'off'}, "
        f"KV offload {'on' if job_plan.offload_kv else 'off'}"
    )

    host_buffers = HostBuffers()  # offloaded K/V: host memory pinned once, reused by every step
    start_losses = _starting_validation(
        objective, model, chunk_config, host_buffers, ctx, metrics_csv, position, total_steps
    )
    probe = PeakMemory(device)
    peak_seen = step_peak = 0  # absolute peak; largest step peak above the resident model
    started = time.monotonic()
    steps_this_run = 0
    model.train()
    for epoch in range(position.epoch, n_epochs):
        order = torch.randperm(len(objective.items), generator=torch.Generator().manual_seed(spec.seed + epoch))
        first_batch = position.batch_in_epoch if epoch == position.epoch else 0
        for b in range(first_batch, batches_per_epoch):
            batch = [objective.items[int(i)] for i in order[b * batch_size : (b + 1) * batch_size]]
            step = position.step + 1
            probe.reset()
            t0 = time.monotonic()
            result = objective.step(model, batch, chunk_config, step, host_buffers)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
            guard.check(step, result.loss, float(grad_norm))  # before the optimizer can apply a NaN
            learning_rate = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.monotonic() - t0
            peak = probe.peak_bytes()
            peak_seen = max(peak_seen, peak)
            step_peak = max(step_peak, probe.peak_extra_bytes)
            tokens = result.tokens
            end_of_epoch = b == batches_per_epoch - 1
            position = Position(
                step, epoch + end_of_epoch, 0 if end_of_epoch else b + 1, position.trained_tokens + tokens
            )
            steps_this_run += 1
            metrics: dict[str, Any] = {
                "step": step,
                "total_steps": total_steps,
                "epoch": epoch + 1,
                "train_loss": result.loss,
                "learning_rate": learning_rate,
                "tokens": tokens,
                "tokens_per_second": tokens / seconds,
                "step_seconds": seconds,
                "peak_memory_bytes": peak,
                "chunks_backpropagated": result.chunks,
                **result.metrics,
            }
            save_now = end_of_epoch or step % checkpoint_every == 0
            pause = step < total_steps and ctx.pause_requested()
            if save_now and objective.validate is not None:
                metrics.update(objective.validate(model, chunk_config, host_buffers))
            if step == total_steps:
                metrics.update({full: metrics[key] for key, full in FULL_VALIDATION.items() if key in metrics})
            ctx.metrics(metrics)
            _append_metrics(metrics_csv, metrics, objective.fields)
            if start_losses and VALID_BY_POSITION in metrics:
                _compare_by_position(ctx, step, step == total_steps, start_losses, metrics[VALID_BY_POSITION])
            rate = (time.monotonic() - started) / steps_this_run
            ctx.progress(step, total_steps, position.trained_tokens, rate * (total_steps - step))
            if save_now or pause:
                path = save_checkpoint(checkpoints, model, spec.model_name, optimizer, scheduler, position, metrics)
                guard.checkpointed(step)
                ctx.checkpoint_saved(step, path, metrics)
            if pause:
                raise JobPaused(step)

    estimate = job_plan.memory.estimate
    ctx.message(
        f"memory: a step took up to {format_bytes(step_peak)} above the resident model and optimizer "
        f"(the plan estimated {format_bytes(estimate.step_bytes)}); peak {format_bytes(peak_seen)} in all "
        f"({'GPU allocated' if device.type == 'cuda' else 'process RSS, with the Python runtime and libraries'}), "
        f"the plan {format_bytes(estimate.total - estimate.workspace)} plus {format_bytes(estimate.workspace)} "
        "kept as workspace",
        data={
            "peak_memory_bytes": peak_seen,
            "step_peak_bytes": step_peak,
            "estimated_step_bytes": estimate.step_bytes,
            "estimated_bytes": estimate.total - estimate.workspace,
        },
    )
    host_buffers.release()
    adapter_dir = save_adapter(model, spec.output_dir / "adapter", spec.model_name)  # type: ignore[arg-type]
    archive = pack_adapter(adapter_dir, spec.output_dir / "adapter.tar.gz")
    return TrainResult(
        adapter_dir=adapter_dir,
        adapter_archive=archive,
        metrics_csv=metrics_csv,
        trained_tokens=position.trained_tokens,
        steps=position.step,
        peak_memory_bytes=peak_seen,
    )


def resolve_hyperparameters(spec: TrainSpec) -> dict[str, Any]:
    """The job's hyperparameters with "auto" (None here) replaced by what training uses."""
    resolved: dict[str, Any] = {
        "n_epochs": spec.n_epochs or AUTO_EPOCHS,
        "batch_size": spec.batch_size or 1,
        "learning_rate_multiplier": float(spec.learning_rate_multiplier or 1.0),
    }
    if spec.method == "dpo":
        resolved["beta"] = float(_beta(spec))
    return resolved


def _starting_validation(
    objective: Objective,
    model: torch.nn.Module,
    chunk_config: ChunkConfig,
    host_buffers: HostBuffers,
    ctx: TrainContext,
    metrics_csv: Path,
    position: Position,
    total_steps: int,
) -> dict[str, float] | None:
    """Validate the model the job starts from (the base model, or the fine-tuned model it
    continues) before the first optimizer step, reported as step 0 (event and CSV row);
    returns its loss by position, what later validations are compared with.

    A resumed job (paused, or its worker lost) does not validate again: its step-0 row came
    back with the checkpoint's CSV, and the starting model is no longer in memory anyway.
    """
    if objective.validate is None or not objective.validate_before_training:
        return None
    if position.step > 0:
        return starting_losses(metrics_csv)
    metrics: dict[str, Any] = {
        "step": 0,
        "total_steps": total_steps,
        "epoch": 0,
        **objective.validate(model, chunk_config, host_buffers),
    }
    ctx.metrics(metrics)
    _append_metrics(metrics_csv, metrics, objective.fields)
    return metrics.get(VALID_BY_POSITION)


def _compare_by_position(
    ctx: TrainContext, step: int, final: bool, start: dict[str, float], now: dict[str, float]
) -> None:
    """The job's event comparing each position bucket's validation loss with the starting model's."""
    when = "after training, starting model -> final" if final else f"at step {step}, starting model -> now"
    ctx.message(
        f"validation loss by position {when}: {comparison(start, now)}",
        data={"step": step, VALID_BY_POSITION: now, f"starting_{VALID_BY_POSITION}": start},
    )


def _announce_plan(ctx: TrainContext, spec: TrainSpec, job_plan: JobPlan) -> None:
    serving = serving_reserve_bytes(spec)
    kept = (
        f" ({format_bytes(serving)} of the device kept for `seco serve` on {spec.device}, SECO_SERVE_MEMORY_BYTES)"
        if serving
        else ""
    )
    ctx.message(
        f"{job_plan.memory.message}{kept}; the longest max_length this device can train in this configuration "
        f"is {job_plan.memory.longest_length}",
        data={
            "memory_plan": job_plan.memory.estimate.as_dict(),
            "longest_max_length": job_plan.memory.longest_length,
            "budget_bytes": job_plan.memory.budget_bytes,
            "serve_memory_bytes": serving,
        },
    )


def _supervised_objective(
    spec: TrainSpec, tokenizer: Any, model_config: Any, dtype: torch.dtype, ctx: TrainContext
) -> tuple[Objective, JobPlan]:
    """Windows of at most max_length tokens of the documents, mean token loss per step."""
    device = torch.device(spec.device)
    train_data = load_documents(spec.training_file, tokenizer, "training_file")
    valid_data = load_documents(spec.validation_file, tokenizer, "validation_file") if spec.validation_file else None
    job_plan = _plan_memory(spec, model_config, dtype)
    _announce_plan(ctx, spec, job_plan)
    split = split_documents(train_data.documents, job_plan.max_length)
    if not split.windows:
        raise TrainingError("training_file has no tokens to train on", code="invalid_file", param="training_file")
    ctx.message(f"training data: {split.stats.summary()}", data={"windows": split.stats.windows})
    valid_windows = split_documents(valid_data.documents, job_plan.max_length).windows if valid_data else []
    position_columns = [csv_column(name) for name in present_buckets(w.labels for w in valid_windows)]

    def step(
        model: torch.nn.Module, windows: list[Window], config: ChunkConfig, number: int, buffers: HostBuffers
    ) -> StepResult:
        loss, accuracy, chunks = _optimizer_step(model, windows, config, spec, number, device, ctx, buffers)
        return StepResult(loss, chunks, sum(len(w) for w in windows), {"train_mean_token_accuracy": accuracy})

    def validate(model: torch.nn.Module, config: ChunkConfig, buffers: HostBuffers) -> dict[str, Any]:
        loss, accuracy, by_position = _validation_metrics(model, valid_windows, config, device, buffers)
        return {"valid_loss": loss, "valid_mean_token_accuracy": accuracy, VALID_BY_POSITION: by_position.means()}

    objective = Objective(
        split.windows,
        "windows",
        step,
        validate if valid_windows else None,
        position_columns,
        validate_before_training=True,
    )
    return objective, job_plan


def _beta(spec: TrainSpec) -> float:
    return spec.beta if spec.beta is not None else DEFAULT_BETA


def _preference_objective(
    spec: TrainSpec, tokenizer: Any, model_config: Any, dtype: torch.dtype, ctx: TrainContext
) -> tuple[Objective, JobPlan]:
    """Preference pairs, one DPO step per batch of pairs (worker/preference.py).

    The memory plan knows the step is a prefix tree: the shorter answer's K/V are kept
    beside the longer sequence's. With max_length unset it plans for the longest pair.
    """
    train = load_preferences(spec.training_file, tokenizer, "training_file")
    valid = load_preferences(spec.validation_file, tokenizer, "validation_file") if spec.validation_file else None
    pairs = [*train.pairs, *(valid.pairs if valid else [])]
    branch_tokens = max(min(len(p.chosen), len(p.rejected)) for p in pairs)
    job_plan = _plan_memory(spec, model_config, dtype, branch_tokens=branch_tokens, length=max(len(p) for p in pairs))
    _announce_plan(ctx, spec, job_plan)
    why = "set by the job" if spec.seco.max_length else "the longest this device fits"
    check_pair_lengths(train.pairs, job_plan.max_length, "training_file", why)
    if valid:
        check_pair_lengths(valid.pairs, job_plan.max_length, "validation_file", why)
    stats = train.stats
    ctx.message(
        f"training data: {stats.records} preference pairs, {stats.prompt_tokens} prompt and {stats.answer_tokens} "
        f"answer tokens, the longest pair {stats.longest} tokens; reference: the base model (LoRA adapter disabled)",
        data={"preference_pairs": stats.as_dict()},
    )
    objective = preference_objective(
        train.pairs, valid.pairs if valid else [], _beta(spec), spec.seed, torch.device(spec.device), ctx.cancelled
    )
    return objective, job_plan


def _optimizer_step(
    model: torch.nn.Module,
    windows: list[Window],
    chunk_config: ChunkConfig,
    spec: TrainSpec,
    step: int,
    device: torch.device,
    ctx: TrainContext,
    host_buffers: HostBuffers,
) -> tuple[float, float, int]:
    """Accumulate one step's gradients over its windows; returns (mean token loss, token accuracy,
    chunks back-propagated).

    Each window's gradient is weighted by its share of the step's targets, so the step
    follows the mean token loss of the batch. The random state is derived from (seed,
    step), so a resumed job draws the same dropout masks and SpaCO chunks as the first try.
    """
    torch.manual_seed(step_seed(spec.seed, step))
    generator = torch.Generator().manual_seed(step_seed(spec.seed, step))
    n_targets = sum(w.num_targets for w in windows)
    loss_sum, correct, chunks = 0.0, 0, 0
    for window in windows:
        if ctx.cancelled():
            raise JobCancelled()
        ids = torch.tensor([window.input_ids], device=device)  # (1, T)
        labels = torch.tensor([window.labels], device=device)
        out = chunked_backward(
            model,
            ids,
            labels,
            chunk_config,
            generator,
            loss_scale=window.num_targets / n_targets,
            host_buffers=host_buffers,
        )
        loss_sum += out.loss * out.tokens
        correct += out.correct_tokens
        chunks += out.chunks_backpropagated
    return loss_sum / n_targets, correct / n_targets, chunks


@torch.no_grad()
def _validation_metrics(
    model: torch.nn.Module,
    windows: list[Window],
    chunk_config: ChunkConfig,
    device: torch.device,
    host_buffers: HostBuffers,
) -> tuple[float, float, PositionLosses]:
    """Mean token loss, token accuracy and loss by target position over all the validation
    windows (stage 1 only: no graph; one pass gives all three), with the training step's
    chunk configuration: at lengths that need KV offload, validation does too."""
    model.eval()
    total, correct, n = 0.0, 0, 0
    by_position = PositionLosses()
    for window in windows:
        ids = torch.tensor([window.input_ids], device=device)
        labels = torch.tensor([window.labels], device=device)
        out = chunked_evaluate(model, ids, labels, chunk_config, host_buffers=host_buffers)
        total += out.loss * out.tokens
        correct += out.correct_tokens
        n += out.tokens
        by_position.add(out.by_position)
    model.train()
    return total / n, correct / n, by_position


def _plan_memory(
    spec: TrainSpec, model_config: Any, dtype: torch.dtype, *, branch_tokens: int = 0, length: int | None = None
) -> JobPlan:
    """The library's plan for this job on this worker's device (seco_core.memory_plan.plan_job),
    or a refusal saying what would fit.

    What the worker adds is what it knows of the device: the compute dtype, whether fused
    attention kernels run on it, its budget (SECO_MEMORY_BUDGET, else what is free, less
    what `seco serve` may take on the same device: `serving_reserve_bytes`) and the host
    budget KV offload may use (CUDA only). `length`: the longest sequence of the data.
    """
    kind = torch.device(spec.device).type
    device_budget = spec.memory_budget_bytes or device_budget_bytes(spec.device)
    serving = serving_reserve_bytes(spec)
    if serving >= device_budget:
        raise TrainingError(
            f"no memory left to train on {spec.device}: SECO_SERVE_MEMORY_BYTES keeps {format_bytes(serving)} "
            f"for `seco serve` on this device, and the budget is {format_bytes(device_budget)}",
            code="does_not_fit",
            param="seco.max_length",
        )
    try:
        return plan_job(
            model_config,
            spec.seco,
            device_kind=kind,
            dtype_bytes=torch.finfo(dtype).bits // 8,
            fused_attention=kind == "cpu" or dtype in FUSED_CUDA_DTYPES,
            budget_bytes=device_budget - serving,
            host_budget_bytes=host_budget_bytes(spec) if kind == "cuda" else None,
            length=length,
            branch_tokens=branch_tokens,
        )
    except PlanRefused as exc:
        raise TrainingError(str(exc), code="does_not_fit", param="seco.max_length") from None


def serving_reserve_bytes(spec: TrainSpec) -> int:
    """What the inference process may take of this worker's device: SECO_SERVE_MEMORY_BYTES when
    `seco serve` runs on the same device (SECO_SERVE_DEVICE, unset: SECO_DEVICE), else 0.

    The whole share is kept, whether or not the inference process holds it yet: it loads
    models and adapters on demand, and a training step planned into memory that serving
    takes later would run out of memory mid-job. (With SECO_MEMORY_BUDGET unset the budget
    is the free memory, which already lacks what serving holds now: the plan then errs on
    the safe side by that much.) Same device: the same device string, a bare "cuda" being
    "cuda:0" (cpu is cpu).
    """
    if spec.serve_memory_bytes is None:
        return 0
    return spec.serve_memory_bytes if _same_device(spec.serve_device or spec.device, spec.device) else 0


def _same_device(a: str, b: str) -> bool:
    def canonical(name: str) -> str:
        name = name.strip().lower()
        return "cuda:0" if name == "cuda" else name

    return canonical(a) == canonical(b)


def host_budget_bytes(spec: TrainSpec) -> int:
    """Host memory this worker's KV offload may use: SECO_HOST_MEMORY_BUDGET, else the
    host's available memory shared equally by one worker per GPU."""
    if spec.host_memory_budget_bytes is not None:
        return spec.host_memory_budget_bytes
    return device_budget_bytes("cpu") // max(1, torch.cuda.device_count())


def _device_map(device: torch.device) -> dict[str, torch.device]:
    """The whole model on `device` (a bare "cuda" is the current CUDA device)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return {"": device}


def _load_model(spec: TrainSpec, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The base model straight onto the job's device, with LoRA attached.

    Why `device_map` rather than loading and then `.to(device)`: the latter builds the
    whole model in host memory first (16 GB for an 8B model in bf16, next to the host
    memory KV offload is about to pin), then copies it. With a device map the loader
    places each tensor on the device as it reads it (transformers 5.17 and later, without
    accelerate for a single device).
    """
    base: Any
    if spec.seco.load_in_4bit:
        base = _load_4bit(spec, dtype, device)  # placed by device_map: quantized models refuse .to()
    else:
        base = load_causal_lm(spec.model_path, dtype=dtype, device_map=_device_map(device))
    lora = spec.seco.lora
    model = attach_lora(base, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules)
    if spec.init_adapter is not None:
        _start_from_adapter(model, spec.init_adapter)
    return model


def _start_from_adapter(model: torch.nn.Module, directory: Path) -> None:
    """Continue training a fine-tuned model: its LoRA weights replace the fresh ones.

    The job has the adapter's LoRA shape (the API copies it), so every LoRA weight of the
    model gets a value; anything else means the adapter does not fit this model.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(directory / "adapter_model.safetensors"))
    expected = get_peft_model_state_dict(model)
    if set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in weights):
        raise TrainingError(
            "the fine-tuned model this job starts from has a LoRA adapter of another shape than the job's seco.lora",
            code="invalid_lora",
            param="model",
        )
    set_peft_model_state_dict(model, weights)


def _load_4bit(spec: TrainSpec, dtype: torch.dtype, device: torch.device) -> Any:
    """NF4 base weights as in QLoRA: the frozen linears in 4 bits, LoRA and compute in bf16."""
    import importlib.util

    if device.type != "cuda" or importlib.util.find_spec("bitsandbytes") is None:
        raise TrainingError(
            "seco.load_in_4bit needs a CUDA worker with bitsandbytes installed "
            f"(this worker: device {spec.device}, bitsandbytes "
            f"{'installed' if importlib.util.find_spec('bitsandbytes') else 'not installed'})",
            code="unsupported_option",
            param="seco.load_in_4bit",
        )
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return load_causal_lm(spec.model_path, dtype=dtype, quantization_config=quant, device_map=_device_map(device))


def _warmup_cosine(total_steps: int) -> Any:
    """Linear warm-up over the first WARMUP_FRACTION of steps, then cosine decay to 0."""
    warmup = max(1, int(total_steps * WARMUP_FRACTION))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _append_metrics(path: Path, metrics: dict[str, Any], extra_fields: list[str] | None = None) -> None:
    """One CSV row per step (`METRIC_FIELDS`, then the method's: for supervised jobs one column
    per position bucket); a row read back from the CSV (a resume) keeps its `train_accuracy`
    and bucket cells."""
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=METRIC_FIELDS + (extra_fields or []), extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({"train_accuracy": metrics.get("train_mean_token_accuracy"), **metrics, **csv_cells(metrics)})


def _truncate_metrics(path: Path, last_step: int, extra_fields: list[str] | None = None) -> None:
    """Drop CSV rows a dead attempt wrote after its last checkpoint; the resume redoes them."""
    if not path.exists():
        return
    with path.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= last_step]
    path.unlink()
    for row in rows:
        _append_metrics(path, row, extra_fields)

"""What the Celery task hands to the training loop, and what it gets back.

The task (worker/tasks.py) is thin: it loads the job record from Redis, builds a
`TrainSpec`, passes a `TrainContext` that writes events and checkpoints back to the
store, and calls `worker.trainer.train`. Keeping this boundary typed and free of
Redis lets the training loop be tested by calling it directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from seco_core.job_config import JobConfig


@dataclass
class TrainSpec:
    job_id: str
    model_name: str  # registry name, recorded in the adapter
    model_path: Path  # resolved by the server from SECO_MODELS; users never send paths
    training_file: Path
    validation_file: Path | None
    output_dir: Path  # this job's directory: checkpoints/, adapter/, metrics.csv
    device: str = "cpu"
    n_epochs: int | None = None  # None ("auto"): chosen from the data size
    batch_size: int | None = None  # windows per optimizer step (gradient accumulation)
    learning_rate_multiplier: float | None = None
    seed: int = 0
    seco: JobConfig = field(default_factory=JobConfig)  # the job's chunk-wise and LoRA settings (seco_core)
    method: str = "supervised"  # "supervised" or "dpo" (preference pairs; preference.py)
    beta: float | None = None  # DPO; None ("auto"): seco_core.dpo.DEFAULT_BETA
    checkpoint_every: int | None = None  # optimizer steps; None: a sensible default
    memory_budget_bytes: int | None = None  # cap for the memory plan (SECO_MEMORY_BUDGET); None: the device's
    host_memory_budget_bytes: int | None = None  # KV offload's share of host memory (SECO_HOST_MEMORY_BUDGET)
    serve_memory_bytes: int | None = None  # what `seco serve` may use on its device (SECO_SERVE_MEMORY_BYTES)
    serve_device: str | None = None  # where `seco serve` runs (SECO_SERVE_DEVICE); None: this worker's device
    init_adapter: Path | None = None  # a fine-tuned model's PEFT adapter to continue training (same LoRA shape)


class TrainContext(Protocol):
    """How the training loop reports to the outside world (Redis in production)."""

    def message(self, text: str, level: str = "info", data: dict[str, Any] | None = None) -> None:
        """A lifecycle event ("type": "message")."""

    def metrics(self, data: dict[str, Any]) -> None:
        """One event per optimizer step ("type": "metrics"); `data["step"]` is its key."""

    def progress(self, step: int, total_steps: int, trained_tokens: int, eta_seconds: float | None) -> None:
        """Fields shown on the job object."""

    def hyperparameters(self, resolved: dict[str, Any]) -> None:
        """The values training uses, "auto" resolved (n_epochs, batch_size,
        learning_rate_multiplier; beta for DPO), once the data is read; shown on the job."""

    def checkpoint_saved(self, step: int, path: Path, metrics: dict[str, Any]) -> None:
        """A complete checkpoint directory now exists at `path`."""

    def cancelled(self) -> bool:
        """True once the user asked to cancel; checked every optimizer step."""

    def pause_requested(self) -> bool:
        """True once the user asked to pause; checked after every optimizer step, which is then
        checkpointed before the loop raises JobPaused."""


@dataclass
class TrainResult:
    adapter_dir: Path  # PEFT adapter directory (adapter_config.json + adapter_model.safetensors)
    adapter_archive: Path  # the same, as a .tar.gz with the files at its root
    metrics_csv: Path
    trained_tokens: int
    steps: int
    peak_memory_bytes: int


class JobCancelled(Exception):
    """Raised by the training loop when the context reports a cancel request."""


class JobPaused(Exception):
    """Raised by the training loop after the checkpoint of `step`, when the context reports a pause request.

    Resuming the job is a resume from that checkpoint, the same path as after a crash.
    """

    def __init__(self, step: int) -> None:
        super().__init__(f"paused at step {step}")
        self.step = step


class TrainingError(Exception):
    """A failure the user can act on (bad data, model cannot be trained, out of memory).

    `code` goes into the job's `error.code`; the message is shown as is.
    """

    def __init__(self, message: str, code: str = "training_error", param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param

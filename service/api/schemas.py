"""Request and response bodies, shaped as OpenAI's fine-tuning API objects.

Our additions to the job object (`queue_position`, `progress`, `estimated_finish`,
`peak_memory_bytes`, `cancel_requested`, `seco`, ...) are extra fields: the `openai`
SDK parses leniently and hands them to the caller unchanged.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# --------------------------------------------------------------------------- requests

Auto = Literal["auto"]
NEpochs = Auto | Annotated[int, Field(ge=1, le=100, strict=True)]
BatchSize = Auto | Annotated[int, Field(ge=1, le=1024, strict=True)]
LrMult = Auto | Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)]
Beta = Auto | Annotated[float, Field(gt=0, le=2, allow_inf_nan=False)]

SUFFIX_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

MIN_CHUNK_SIZE = 16
MAX_WINDOW = 1 << 22
MAX_CHUNKS = MAX_WINDOW // MIN_CHUNK_SIZE
"""The most chunks a training window can have (the longest window in the smallest chunks):
a SpaCO budget beyond it could never be spent."""


def chunks_per_window(max_length: int | None, chunk_size: int | None) -> int:
    """The most chunks a window of `max_length` tokens in chunks of `chunk_size` can have;
    either unset (the worker's choice) takes the bound's extreme."""
    window = max_length if max_length is not None else MAX_WINDOW
    return -(-window // (chunk_size if chunk_size is not None else MIN_CHUNK_SIZE))


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: NEpochs = "auto"
    """Passes over the training file; "auto" lets the worker choose from the data size."""
    batch_size: BatchSize = "auto"
    """Windows per optimizer step (gradient accumulation)."""
    learning_rate_multiplier: LrMult = "auto"
    """Scales the worker's documented base learning rate."""


class DpoHyperparameters(Hyperparameters):
    beta: Beta = "auto"
    """DPO's temperature: how far the policy may move from the reference ("auto": 0.1)."""


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(default=16, ge=1, le=1024, strict=True)
    alpha: float = Field(default=32, gt=0, le=1e6, allow_inf_nan=False)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = Field(
        default=None, max_length=64
    )
    """None: the model's attention projections."""


class SecoSettings(BaseModel):
    """The `seco` extension object (`extra_body={"seco": {...}}` in the SDK)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["seco", "spaco"] = "seco"
    """"seco": exact gradients, chunk by chunk. "spaco": back-propagate a random subset of chunks."""
    chunk_size: int | None = Field(default=None, ge=MIN_CHUNK_SIZE, le=1 << 20, strict=True)
    """Tokens per chunk; None: the largest that fits the worker's memory plan."""
    budget: int | None = Field(default=None, ge=1, le=MAX_CHUNKS, strict=True)
    """SpaCO: chunks back-propagated per sequence (expected number with "bernoulli"); at most
    the chunks a window can have (`max_length` / `chunk_size`, rounded up)."""
    sampling: Literal["bernoulli", "fixed"] = "bernoulli"
    """SpaCO: "bernoulli" is exactly unbiased; "fixed" (t of k, the paper's) is biased."""
    max_compensation: float | None = Field(default=None, ge=1, le=1e6, allow_inf_nan=False)
    max_length: int | None = Field(default=None, ge=16, le=MAX_WINDOW, strict=True)
    """Tokens per training window; None: the model's context length, capped by the memory plan."""
    load_in_4bit: bool = False
    """NF4 base weights (QLoRA, bitsandbytes); needs a CUDA worker with bitsandbytes installed."""
    lora: LoraSettings = Field(default_factory=lambda: LoraSettings())

    @model_validator(mode="after")
    def _budget_for_spaco(self) -> SecoSettings:
        if self.mode == "spaco" and self.budget is None:
            raise ValueError("budget is required when mode is 'spaco'")
        if self.mode == "seco" and self.budget is not None:
            raise ValueError("budget only applies to mode 'spaco'")
        most = chunks_per_window(self.max_length, self.chunk_size)
        if self.budget is not None and self.budget > most:
            raise ValueError(f"budget {self.budget} is more than the {most} chunks a window of max_length "
                             f"{self.max_length or MAX_WINDOW} in chunks of {self.chunk_size or MIN_CHUNK_SIZE} "
                             "tokens can have")  # fmt: skip
        return self


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="ignore")
    hyperparameters: Hyperparameters | None = None


class DpoMethod(BaseModel):
    model_config = ConfigDict(extra="ignore")
    hyperparameters: DpoHyperparameters | None = None


class Method(BaseModel):
    """OpenAI's training method: "supervised" (the default) or "dpo" (preference pairs)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None

    @model_validator(mode="after")
    def _settings_of_its_type(self) -> Method:
        other = "dpo" if self.type == "supervised" else "supervised"
        if getattr(self, other) is not None:
            raise ValueError(f"method.{other} does not apply to method.type {self.type!r}")
        return self


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(default=None, max_length=64)
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(default=None, max_length=64)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1, strict=True)
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16
    )
    integrations: list[dict[str, Any]] | None = None
    seco: SecoSettings = Field(default_factory=lambda: SecoSettings())

    @field_validator("suffix")
    @classmethod
    def _suffix_chars(cls, v: str | None) -> str | None:
        if v is not None and not SUFFIX_RE.match(v):
            raise ValueError("suffix must be 1-64 characters of letters, digits, '-' and '_'")
        return v

    @field_validator("integrations")
    @classmethod
    def _no_integrations(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if v:
            raise ValueError("integrations are not supported by this server; follow the events stream instead")
        return v

    @property
    def method_type(self) -> str:
        return self.method.type if self.method is not None else "supervised"

    def effective_hyperparameters(self) -> Hyperparameters:
        """The method's hyperparameters, else the top-level (older) ones; a DPO job's include beta."""
        if self.method is not None:
            section = self.method.dpo if self.method.type == "dpo" else self.method.supervised
            if section is not None and section.hyperparameters is not None:
                return section.hyperparameters
        hp = self.hyperparameters or Hyperparameters()
        return DpoHyperparameters(**hp.model_dump()) if self.method_type == "dpo" else hp


# --------------------------------------------------------------------------- responses


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    status_details: str | None = None
    expires_at: int | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class JobDeleted(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    deleted: bool = True


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None = None
    model: str
    fine_tuned_model: str | None = None
    organization_id: str
    result_files: list[str]
    status: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: dict[str, Any]
    trained_tokens: int | None = None
    error: JobError | None = None
    seed: int
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    method: dict[str, Any] | None = None
    user_provided_suffix: str | None = None
    # ours
    queue_position: int | None = None
    """While queued: 1 = the next job a free worker takes."""
    progress: float | None = None
    """Fraction of optimizer steps done (0..1)."""
    step: int | None = None
    total_steps: int | None = None
    peak_memory_bytes: int | None = None
    cancel_requested: bool = False
    """True once a running job was asked to cancel; it stops at its next optimizer step."""
    pause_requested: bool = False
    """True once a running job was asked to pause; it becomes `paused` after its next optimizer step."""
    attempts: int = 0
    """How many times the job lost its worker and was requeued."""
    started_at: int | None = None
    seco: dict[str, Any]
    adapter_file: str | None = None
    """Once succeeded: the result file holding the adapter archive (`result_files[0]` is the
    metrics CSV, as OpenAI's)."""


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None = None


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEvent]
    has_more: bool


class JobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobCheckpoint]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail

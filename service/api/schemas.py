"""Request and response bodies, shaped as OpenAI's fine-tuning API objects.

Our additions to the job object (`queue_position`, `progress`, `estimated_finish`,
`peak_memory_bytes`, `cancel_requested`, `seco`, ...) are extra fields: the `openai`
SDK parses leniently and hands them to the caller unchanged.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from seco_core.job_config import (
    LIMITS,
    LORA_LIMITS,
    MAX_MODULE_NAME,
    MAX_TARGET_MODULES,
    JobConfig,
    JobLora,
    Limits,
    Mode,
    Sampling,
)

# --------------------------------------------------------------------------- requests

Auto = Literal["auto"]
NEpochs = Auto | Annotated[int, Field(ge=1, le=100, strict=True)]
BatchSize = Auto | Annotated[int, Field(ge=1, le=1024, strict=True)]
LrMult = Auto | Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)]
Beta = Auto | Annotated[float, Field(gt=0, le=2, allow_inf_nan=False)]

SUFFIX_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


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


_LORA = JobLora()
_SECO = JobConfig()


def _bounded(default: Any, limits: Limits, **extra: Any) -> Any:
    """A pydantic Field with seco_core's default and bounds for a setting. (A helper rather
    than `Field(**limits)` in the class body, which mypy's view of the model cannot read.)"""
    return Field(default=default, **limits, **extra)


class LoraSettings(BaseModel):
    """`seco.lora`: seco_core's JobLora as a request schema (its defaults and bounds)."""

    model_config = ConfigDict(extra="forbid")

    r: int = _bounded(_LORA.r, LORA_LIMITS["r"], strict=True)
    alpha: float = _bounded(_LORA.alpha, LORA_LIMITS["alpha"], allow_inf_nan=False)
    dropout: float = _bounded(_LORA.dropout, LORA_LIMITS["dropout"])
    target_modules: list[Annotated[str, Field(min_length=1, max_length=MAX_MODULE_NAME)]] | None = Field(
        default=None, max_length=MAX_TARGET_MODULES
    )
    """None: the model's attention projections."""


class SecoSettings(BaseModel):
    """The `seco` extension object (`extra_body={"seco": {...}}` in the SDK): seco_core's
    JobConfig as a request schema.

    The fields' types and bounds are checked here, so that an error names the field as
    pydantic does (`seco.chunk_size`); the rules across fields are JobConfig's own, run by
    building one (`job_config`).
    """

    model_config = ConfigDict(extra="forbid")

    mode: Mode = _SECO.mode
    """"seco": exact gradients, chunk by chunk. "spaco": back-propagate a random subset of chunks."""
    chunk_size: int | None = _bounded(_SECO.chunk_size, LIMITS["chunk_size"], strict=True)
    """Tokens per chunk; None: the largest that fits the worker's memory plan."""
    budget: int | None = _bounded(_SECO.budget, LIMITS["budget"], strict=True)
    """SpaCO: chunks back-propagated per sequence (expected number with "bernoulli"); at most
    the chunks a window can have (`max_length` / `chunk_size`, rounded up)."""
    sampling: Sampling = _SECO.sampling
    """SpaCO: "bernoulli" is exactly unbiased; "fixed" (t of k, the paper's) is biased."""
    max_compensation: float | None = _bounded(_SECO.max_compensation, LIMITS["max_compensation"], allow_inf_nan=False)
    max_length: int | None = _bounded(_SECO.max_length, LIMITS["max_length"], strict=True)
    """Tokens per training window; None: the model's context length, capped by the memory plan."""
    load_in_4bit: bool = _SECO.load_in_4bit
    """NF4 base weights (QLoRA, bitsandbytes); needs a CUDA worker with bitsandbytes installed."""
    lora: LoraSettings = Field(default_factory=lambda: LoraSettings())

    @model_validator(mode="after")
    def _valid_job_config(self) -> SecoSettings:
        self.job_config()  # a ValueError (e.g. a SpaCO budget rule) becomes a 400 naming `seco`
        return self

    def job_config(self) -> JobConfig:
        """These settings as the library's JobConfig (ValueError: they break one of its rules)."""
        return JobConfig.from_dict(self.model_dump())


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

"""One `Settings` object, read once from the environment (API, worker and CLI share it).

Names are the documented environment variables (README "Configuration"); the
attributes are short aliases so code reads `settings.data_dir`, not `seco_data_dir`.
"""

from __future__ import annotations

import re
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def parse_storage_url(url: str) -> tuple[str, str]:
    """`s3://bucket/prefix` -> (bucket, prefix); ValueError naming what is wrong."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"SECO_STORAGE_URL must look like s3://bucket/prefix (got {parsed.scheme or 'no'} scheme)")
    if parsed.query or parsed.fragment or "@" in parsed.netloc:
        raise ValueError("SECO_STORAGE_URL takes no credentials, query or fragment: set the AWS_* variables")
    return parsed.netloc, parsed.path.strip("/")


def _env(name: str) -> AliasChoices:
    return AliasChoices(name, name.lower())


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    redis_url: str | None = Field(None, validation_alias=_env("REDIS_URL"))
    """Broker and system of record. `seco up` starts an embedded server when unset."""

    data_dir: Path = Field(Path("data"), validation_alias=_env("SECO_DATA_DIR"))
    """Files, checkpoints and adapters (shared by every host), or, with `storage_url` set,
    this host's own scratch space."""

    storage_url: str | None = Field(None, validation_alias=_env("SECO_STORAGE_URL"))
    """`s3://bucket/prefix`: files, checkpoints and adapters in S3-compatible object storage
    (endpoint and credentials from the AWS_* variables). Unset: under `data_dir`."""

    api_keys_raw: str = Field("", validation_alias=_env("SECO_API_KEYS"))
    """Comma-separated keys; each key is its own tenant."""

    models_raw: str = Field("", validation_alias=_env("SECO_MODELS"))
    """`name=/local/hf/dir,...`: the base models offered; users pick by name only."""

    device: str = Field("cpu", validation_alias=_env("SECO_DEVICE"))
    """Where a worker trains: `cuda:N` or `cpu`."""

    max_upload_bytes: int = Field(1 << 30, ge=1, validation_alias=_env("SECO_MAX_UPLOAD_BYTES"))
    """Largest single upload; beyond it the request gets a 413 and the partial file is removed."""

    max_body_bytes: int = Field(1 << 20, ge=1024, validation_alias=_env("SECO_MAX_BODY_BYTES"))
    """Largest request body of any other route (JSON); beyond it a 413, before anything is parsed."""

    max_line_bytes: int = Field(64 << 20, ge=1, validation_alias=_env("SECO_MAX_LINE_BYTES"))
    """Largest JSONL line accepted (a long document is one line)."""

    max_uploads_per_key: int = Field(2, ge=1, validation_alias=_env("SECO_MAX_UPLOADS_PER_KEY"))
    """Per API process and key: uploads in progress at once (429 with Retry-After beyond)."""

    max_uploads: int = Field(4, ge=1, validation_alias=_env("SECO_MAX_UPLOADS"))
    """Per API process: uploads in progress at once, all keys together (503 with Retry-After
    beyond). Validating one holds about 3x its longest line, so this bounds what uploads take:
    about max_uploads x 3 x SECO_MAX_LINE_BYTES (service/api/upload_slots.py)."""

    max_queued_jobs: int = Field(20, ge=1, validation_alias=_env("SECO_MAX_QUEUED_JOBS"))
    """Per tenant: queued + running jobs at once (429 beyond)."""

    max_file_bytes: int = Field(10 << 30, ge=1, validation_alias=_env("SECO_MAX_FILE_BYTES"))
    """Per tenant: storage quota, uploaded files and job outputs (checkpoints, adapters, metrics)
    together; uploads and new jobs get a 429 beyond it."""

    max_streams: int = Field(16, ge=1, validation_alias=_env("SECO_MAX_STREAMS"))
    """Per tenant: event streams (SSE) open at once, across every API process (429 beyond)."""

    inference_url: str | None = Field(None, validation_alias=_env("SECO_INFERENCE_URL"))
    """Root URL of the inference process the API forwards completions to (`seco serve`, or a
    vLLM server), e.g. `http://127.0.0.1:8001`; a trailing `/v1` is dropped. `seco up` sets it
    to the `seco serve` it starts; unset, /v1/chat/completions and /v1/completions answer 503."""

    inference_engine: Literal["seco", "vllm"] = Field("seco", validation_alias=_env("SECO_INFERENCE_ENGINE"))
    """What serves at `inference_url`. `seco`: an adapter is named by its storage location
    (`seco-storage:archive:<key>` or `seco-storage:dir:<prefix>`), which the process fetches
    itself. `vllm`: a vLLM server, which loads adapters from local directories only, so the
    API unpacks each one under `<data dir>/serving/<name>/`, a path the vLLM server must see
    too (the same shared volume, mounted at the same path)."""

    inference_timeout: float = Field(600.0, gt=0, validation_alias=_env("SECO_INFERENCE_TIMEOUT"))
    """Seconds the API waits for the inference process's next bytes: the whole answer of a
    request without `stream`, the next chunk of a stream (504 beyond)."""

    max_generations_per_key: int = Field(4, ge=1, validation_alias=_env("SECO_MAX_GENERATIONS_PER_KEY"))
    """Per tenant: completions being generated at once, across every API process (429 with
    Retry-After beyond), so one key cannot take every decoding slot of the inference process."""

    max_concurrency: int = Field(512, ge=4, validation_alias=_env("SECO_MAX_CONCURRENCY"))
    """Per API process: connections served at once (uvicorn answers 503 beyond); also the size
    of its asyncio Redis pool, so open streams can never exhaust it."""

    api_docs: bool = Field(False, validation_alias=_env("SECO_API_DOCS"))
    """Serve the interactive API reference (Swagger UI, self-hosted) at /docs."""

    lease_seconds: int = Field(30, ge=2, validation_alias=_env("SECO_LEASE_SECONDS"))
    """A running job's lease; a job whose worker stops refreshing it is requeued."""

    reaper_interval: float = Field(10.0, gt=0, validation_alias=_env("SECO_REAPER_INTERVAL"))
    """Seconds between sweeps for running jobs whose lease expired."""

    max_attempts: int = Field(3, ge=1, validation_alias=_env("SECO_MAX_ATTEMPTS"))
    """Worker losses after which a job fails instead of being requeued again."""

    checkpoint_every: int | None = Field(None, ge=1, validation_alias=_env("SECO_CHECKPOINT_EVERY"))
    """Optimizer steps between checkpoints; None lets the trainer choose."""

    keep_checkpoints: int = Field(3, ge=1, validation_alias=_env("SECO_KEEP_CHECKPOINTS"))
    """Checkpoints a job keeps in storage: the newest ones (the newest of a succeeded job is
    its final state); older ones are deleted as new ones are published."""

    memory_budget_bytes: int | None = Field(None, ge=1, validation_alias=_env("SECO_MEMORY_BUDGET"))
    """Cap on the memory a job may plan for on this worker; None: the device's free memory."""

    host_memory_budget_bytes: int | None = Field(None, ge=1, validation_alias=_env("SECO_HOST_MEMORY_BUDGET"))
    """Host memory one worker's KV offload may use; None: the host's available memory
    divided by the number of GPUs on it (one worker per GPU share the host)."""

    serve_device: str | None = Field(None, validation_alias=_env("SECO_SERVE_DEVICE"))
    """Where `seco serve` runs its models: `cuda:N` or `cpu`; None: `SECO_DEVICE`."""

    serve_memory_bytes: int | None = Field(None, ge=1, validation_alias=_env("SECO_SERVE_MEMORY_BYTES"))
    """The memory share `seco serve` may use on its device (shared with a trainer, whose plan
    leaves it free): base weights plus loaded adapters beyond it are refused (an adapter load
    gets a 507). None: no cap. KV caches of running requests are not counted against it."""

    serve_max_adapters: int = Field(8, ge=1, validation_alias=_env("SECO_SERVE_MAX_ADAPTERS"))
    """Per base model: LoRA adapters `seco serve` keeps loaded; the least recently used one is
    unloaded beyond it (and loaded again from its path when asked for)."""

    serve_prefill_chunk: int = Field(2048, ge=1, validation_alias=_env("SECO_SERVE_PREFILL_CHUNK"))
    """Prompt tokens per prefill step of `seco serve`: bounds prefill's activations and lets
    other requests' decode steps run between a long prompt's chunks."""

    @property
    def serve_on(self) -> str:
        """The device `seco serve` uses: SECO_SERVE_DEVICE, else SECO_DEVICE."""
        return self.serve_device or self.device

    queue: str = Field("seco", validation_alias=_env("SECO_QUEUE"))
    """The Celery queue the API publishes to and workers consume."""

    log_level: str = Field("INFO", validation_alias=_env("SECO_LOG_LEVEL"))

    @field_validator("storage_url")
    @classmethod
    def _check_storage_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        parse_storage_url(value)  # fails at start-up, naming the problem
        return value

    @field_validator("inference_url")
    @classmethod
    def _check_inference_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.query or parsed.fragment:
            raise ValueError(f"SECO_INFERENCE_URL must look like http://host:port (got {value!r})")
        return value.rstrip("/").removesuffix("/v1")

    @cached_property
    def api_keys(self) -> list[str]:
        """The configured keys (their tenant ids: `service.record.tenants`)."""
        return [k.strip() for k in self.api_keys_raw.split(",") if k.strip()]

    @cached_property
    def models(self) -> dict[str, Path]:
        """Registry name -> local model directory, in the order configured."""
        out: dict[str, Path] = {}
        for item in self.models_raw.split(","):
            item = item.strip()
            if not item:
                continue
            name, sep, path = item.partition("=")
            name = name.strip()
            if not sep or not path.strip():
                raise ValueError(f"SECO_MODELS entry {item!r} must look like name=/path/to/model")
            if not MODEL_NAME_RE.match(name):
                raise ValueError(f"SECO_MODELS name {name!r} must match {MODEL_NAME_RE.pattern}")
            out[name] = Path(path.strip())
        return out


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, built once from the environment."""
    return Settings()  # type: ignore[call-arg]  # fields come from the environment

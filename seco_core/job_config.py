"""JobConfig: one fine-tuning job's chunk-wise settings, their defaults and their limits.

This is the one place these are stated. The API builds its `seco` request schema from
it (service/api/schemas.py: the same defaults, the same bounds, and the cross-field rules
by constructing a JobConfig), the job record stores `JobConfig.as_dict()`, and the
worker reads it back with `JobConfig.from_dict` and turns it into the `ChunkConfig` the
chunk-wise backward runs with (`chunk_config`). Torch-free, so the API process, which
never imports torch, can import it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, TypedDict, cast

from seco_core.config import ChunkConfig, Mode, Sampling

MODES: tuple[Mode, ...] = ("seco", "spaco")
SAMPLINGS: tuple[Sampling, ...] = ("bernoulli", "fixed")

MIN_CHUNK_SIZE = 16
MAX_WINDOW = 1 << 22
MAX_CHUNKS = MAX_WINDOW // MIN_CHUNK_SIZE
"""The most chunks a training window can have (the longest window in the smallest chunks):
a SpaCO budget beyond it could never be spent."""
MAX_TARGET_MODULES = 64
MAX_MODULE_NAME = 128


class Limits(TypedDict, total=False):
    """Bounds of one numeric setting, named as pydantic's `Field` names them (so the API
    passes them on as they are): ge >=, gt >, le <=, lt <."""

    ge: float
    gt: float
    le: float
    lt: float


LIMITS: dict[str, Limits] = {
    "chunk_size": {"ge": MIN_CHUNK_SIZE, "le": 1 << 20},
    "budget": {"ge": 1, "le": MAX_CHUNKS},
    "max_compensation": {"ge": 1, "le": 1e6},
    "max_length": {"ge": 16, "le": MAX_WINDOW},
}
"""JobConfig's numeric bounds (an unset value, None, is always allowed)."""

LORA_LIMITS: dict[str, Limits] = {
    "r": {"ge": 1, "le": 1024},
    "alpha": {"gt": 0, "le": 1e6},
    "dropout": {"ge": 0, "lt": 1},
}
"""JobLora's numeric bounds."""

_WORDS = {"ge": "greater than or equal to", "gt": "greater than", "le": "less than or equal to", "lt": "less than"}
_HOLDS = {
    "ge": lambda v, b: v >= b,
    "gt": lambda v, b: v > b,
    "le": lambda v, b: v <= b,
    "lt": lambda v, b: v < b,
}


def _check_number(name: str, value: Any, limits: Limits, *, integer: bool) -> None:
    """ValueError naming `name` unless `value` is a number of the right kind within `limits`."""
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    for op, bound in cast("dict[str, float]", limits).items():
        if not _HOLDS[op](value, bound):
            shown = int(bound) if float(bound).is_integer() else bound
            raise ValueError(f"{name} must be {_WORDS[op]} {shown}, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")


def chunks_per_window(max_length: int | None, chunk_size: int | None) -> int:
    """The most chunks a window of `max_length` tokens in chunks of `chunk_size` can have;
    either unset (the worker's choice) takes the bound's extreme."""
    window = max_length if max_length is not None else MAX_WINDOW
    return -(-window // (chunk_size if chunk_size is not None else MIN_CHUNK_SIZE))


@dataclass(frozen=True)
class JobLora:
    """The LoRA adapter a job trains."""

    r: int = 16
    alpha: float = 32
    """Stored as an int when it is one, so the adapter's config reads `"lora_alpha": 32`."""
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    """None: the model's attention projections."""

    def __post_init__(self) -> None:
        _check_number("lora.r", self.r, LORA_LIMITS["r"], integer=True)
        _check_number("lora.alpha", self.alpha, LORA_LIMITS["alpha"], integer=False)
        _check_number("lora.dropout", self.dropout, LORA_LIMITS["dropout"], integer=False)
        if isinstance(self.alpha, float) and self.alpha.is_integer():
            object.__setattr__(self, "alpha", int(self.alpha))
        if self.target_modules is not None:
            if isinstance(self.target_modules, str) or not isinstance(self.target_modules, (list, tuple)):
                raise ValueError(f"lora.target_modules must be a list of module names, got {self.target_modules!r}")
            if len(self.target_modules) > MAX_TARGET_MODULES:
                raise ValueError(
                    f"lora.target_modules must have at most {MAX_TARGET_MODULES} names, got {len(self.target_modules)}"
                )
            for name in self.target_modules:
                if not isinstance(name, str) or not 1 <= len(name) <= MAX_MODULE_NAME:
                    raise ValueError(
                        f"lora.target_modules must be names of 1-{MAX_MODULE_NAME} characters, got {name!r}"
                    )
            object.__setattr__(self, "target_modules", tuple(self.target_modules))


@dataclass(frozen=True)
class JobConfig:
    """How a job splits its windows into chunks and which chunks it back-propagates.

    Every field has the default a job gets when it leaves the field out; a value the
    worker chooses (chunk_size, max_length) is None until the memory plan picks it.
    """

    mode: Mode = "seco"
    """"seco": exact gradients, chunk by chunk. "spaco": back-propagate a random subset of chunks."""
    chunk_size: int | None = None
    """Tokens per chunk; None: the largest that fits the worker's memory plan."""
    budget: int | None = None
    """SpaCO: chunks back-propagated per sequence (expected number with "bernoulli"); at most
    the chunks a window can have (`max_length` / `chunk_size`, rounded up)."""
    sampling: Sampling = "bernoulli"
    """SpaCO: "bernoulli" is exactly unbiased; "fixed" (t of k, the paper's) is biased."""
    max_compensation: float | None = None
    """SpaCO: cap on the per-chunk compensation factor (ChunkConfig.max_compensation)."""
    max_length: int | None = None
    """Tokens per training window; None: the model's context length, capped by the memory plan."""
    load_in_4bit: bool = False
    """NF4 base weights (QLoRA, bitsandbytes); needs a CUDA worker with bitsandbytes installed."""
    lora: JobLora = field(default_factory=JobLora)

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, MODES)
        _check_choice("sampling", self.sampling, SAMPLINGS)
        for name in ("chunk_size", "budget", "max_length"):
            if getattr(self, name) is not None:
                _check_number(name, getattr(self, name), LIMITS[name], integer=True)
        if self.max_compensation is not None:
            _check_number("max_compensation", self.max_compensation, LIMITS["max_compensation"], integer=False)
        if not isinstance(self.load_in_4bit, bool):
            raise ValueError(f"load_in_4bit must be true or false, got {self.load_in_4bit!r}")
        if not isinstance(self.lora, JobLora):
            raise ValueError(f"lora must be a JobLora, got {self.lora!r}")
        if self.mode == "spaco" and self.budget is None:
            raise ValueError("budget is required when mode is 'spaco'")
        if self.mode == "seco" and self.budget is not None:
            raise ValueError("budget only applies to mode 'spaco'")
        most = chunks_per_window(self.max_length, self.chunk_size)
        if self.budget is not None and self.budget > most:
            raise ValueError(
                f"budget {self.budget} is more than the {most} chunks a window of max_length "
                f"{self.max_length or MAX_WINDOW} in chunks of {self.chunk_size or MIN_CHUNK_SIZE} "
                "tokens can have"
            )

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> JobConfig:
        """The configuration a job record stores (`as_dict`); absent keys take the defaults,
        an unknown key is a ValueError naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"unknown seco setting(s) {', '.join(repr(k) for k in unknown)}")
        lora = settings.get("lora") or {}
        if not isinstance(lora, dict):
            raise ValueError(f"lora must be an object, got {lora!r}")
        lora_known = {f.name for f in dataclasses.fields(JobLora)}
        if set(lora) - lora_known:
            raise ValueError(f"unknown lora setting(s) {', '.join(repr(k) for k in sorted(set(lora) - lora_known))}")
        values = {k: v for k, v in settings.items() if k != "lora"}
        return cls(**values, lora=JobLora(**lora))

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON values (target_modules as a list), as a job record and the job object show them."""
        out = dataclasses.asdict(self)
        modules = out["lora"]["target_modules"]
        out["lora"]["target_modules"] = list(modules) if modules is not None else None
        return out

    def chunk_config(self, chunk_size: int, *, offload_kv: bool, layer_checkpointing: bool) -> ChunkConfig:
        """The library's ChunkConfig for this job at the chunk size and memory mode the plan chose;
        SpaCO's settings apply only in mode "spaco"."""
        spaco = self.mode == "spaco"
        return ChunkConfig(
            chunk_size=chunk_size,
            mode=self.mode,
            budget=self.budget if spaco else None,
            sampling=self.sampling if spaco else "bernoulli",
            max_compensation=self.max_compensation if spaco else None,
            offload_kv=offload_kv,
            layer_checkpointing=layer_checkpointing,
        )

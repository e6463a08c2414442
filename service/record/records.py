"""What the system of record holds, as typed records, and how a record is read from its hash.

Shared by the sync store and the API's async reads (`service.record.reads`), so both sides
agree on what a record is.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any, cast

from pydantic import BaseModel

from service.record import ids
from service.record.models import parse_model_name

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
STATUSES = ("validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled")


def now() -> int:
    return int(time.time())


def dumps(value: Any) -> str:
    """Compact JSON, as the records and the scripts' arguments store it."""
    return json.dumps(value, separators=(",", ":"))


def opt_int(value: str | None) -> int | None:
    return None if value in (None, "") else int(cast(str, value))


class FileRecord(BaseModel):
    id: str
    tenant: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    path: str  # relative to the data dir
    job_id: str | None = None  # for result files: the job that produced it
    kind: str | None = None  # training data: "supervised" or "preference" (formats.record_kind); None: unknown
    expires_at: int | None = None  # OpenAI's expires_after: deleted by `service.record.expiry` once past


class JobRecord(BaseModel):
    id: str
    tenant: str
    status: str
    created_at: int
    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: dict[str, Any]
    suffix: str | None = None
    seed: int
    metadata: dict[str, str] | None = None
    seco: dict[str, Any]
    method: str = "supervised"  # OpenAI's method.type: "supervised" or "dpo"
    worker: str | None = None
    cancel_requested: bool = False
    pause_requested: bool = False  # a running job stops at its next optimizer step, after a checkpoint
    attempts: int = 0
    started_at: int | None = None
    finished_at: int | None = None
    progress: float | None = None
    step: int | None = None
    total_steps: int | None = None
    trained_tokens: int | None = None
    estimated_finish: int | None = None
    peak_memory_bytes: int | None = None
    fine_tuned_model: str | None = None
    error: dict[str, Any] | None = None
    result_files: list[str] = []
    adapter_file: str | None = None

    @property
    def base_model(self) -> str:
        """The base model under the adapter this job trains: `model` itself, or the base of the
        fine-tuned model (or checkpoint) named as `model` that it continues from."""
        parsed = parse_model_name(self.model)
        return parsed.base if parsed is not None else self.model


# Job fields written at creation, kept as one JSON blob ("spec") in the hash. Only its
# hyperparameters change later: the worker replaces "auto" by the values it trains with
# (`resolve_hyperparameters`), which a retry or resume then reads back and uses as they are.
SPEC_FIELDS = (
    "model",
    "training_file",
    "validation_file",
    "hyperparameters",
    "suffix",
    "seed",
    "metadata",
    "seco",
    "method",
)


class Checkpoint(BaseModel):
    id: str
    job_id: str
    step: int
    created_at: int
    path: str
    metrics: dict[str, Any]


class Event(BaseModel):
    id: str  # "ftevent-<stream id>"
    stream_id: str
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None = None


class LimitExceeded(Exception):
    """A per-tenant quota would be exceeded (HTTP 429)."""


class FileInUse(Exception):
    """A file is still needed by an unfinished job."""


def file_from_hash(h: dict[str, str]) -> FileRecord:
    """A file record from its Redis hash."""
    return FileRecord(
        id=h["id"],
        tenant=h["tenant"],
        bytes=int(h["bytes"]),
        created_at=int(h["created_at"]),
        filename=h["filename"],
        purpose=h["purpose"],
        status=h.get("status") or "processed",
        path=h["path"],
        job_id=h.get("job_id") or None,
        kind=h.get("kind") or None,
        expires_at=opt_int(h.get("expires_at")),
    )


def job_from_hash(h: dict[str, str]) -> JobRecord:
    """A job record from its Redis hash (shared by the sync store and the API's async reads)."""
    spec = json.loads(h["spec"])
    progress = h.get("progress")
    return JobRecord(
        id=h["id"],
        tenant=h["tenant"],
        status=h["status"],
        created_at=int(h["created_at"]),
        **spec,
        worker=h.get("worker") or None,
        cancel_requested=h.get("cancel_requested") == "1",
        pause_requested=h.get("pause_requested") == "1",
        attempts=int(h.get("attempts") or 0),
        started_at=opt_int(h.get("started_at")),
        finished_at=opt_int(h.get("finished_at")),
        progress=float(progress) if progress else None,
        step=opt_int(h.get("step")),
        total_steps=opt_int(h.get("total_steps")),
        trained_tokens=opt_int(h.get("trained_tokens")),
        estimated_finish=opt_int(h.get("estimated_finish")),
        peak_memory_bytes=opt_int(h.get("peak_memory_bytes")),
        fine_tuned_model=h.get("fine_tuned_model") or None,
        error=json.loads(h["error"]) if h.get("error") else None,
        result_files=json.loads(h.get("result_files") or "[]"),
        adapter_file=h.get("adapter_file") or None,
    )


def event_from_entry(stream_id: str, fields: dict[str, str]) -> Event:
    """An event from its stream entry (the stream id is the event's id)."""
    return Event(
        id=ids.event_id(stream_id),
        stream_id=stream_id,
        created_at=int(fields.get("created_at") or 0),
        level=fields.get("level", "info"),
        message=fields.get("message", ""),
        type=fields.get("type", "message"),
        data=json.loads(fields.get("data") or "null"),
    )


def page_checkpoints(raw: Iterable[str], *, after: str | None, limit: int) -> tuple[list[Checkpoint], bool]:
    """Newest (highest step) first from the stored checkpoint JSONs; KeyError when `after` is not among them."""
    cks = sorted((Checkpoint.model_validate_json(v) for v in raw), key=lambda c: -c.step)
    if after is not None:
        idx = next((i for i, c in enumerate(cks) if c.id == after), None)
        if idx is None:
            raise KeyError(after)
        cks = cks[idx + 1 :]
    return cks[:limit], len(cks) > limit

"""A job's event stream: messages, deduplicated metrics, pages newest first."""

from __future__ import annotations

from typing import Any, cast

from service.record import redis_keys as K
from service.record.records import dumps, now
from service.record.store.connection import Connection


class Events:
    """Appends to a job's event stream (the API reads it through `service.record.reads`)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.r = conn.r

    def add(self, job_id: str, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> str:
        """Append a `message` event; returns its stream id."""
        fields = {"type": "message", "level": level, "message": message, "data": dumps(data), "created_at": str(now())}
        return cast(str, self.r.xadd(K.job_events(job_id), fields))  # type: ignore[arg-type]

    def add_metrics(self, job_id: str, worker_id: str, data: dict[str, Any], message: str) -> str | None:
        """Append a `metrics` event unless its step was already recorded; returns its id or None."""
        step = int(data["step"])
        peak = int(data.get("peak_memory_bytes") or 0)
        res = self.conn.script("add_metrics")(
            keys=[K.job_events(job_id), K.job_metrics_step(job_id), K.job(job_id)],
            args=[step, str(now()), message, dumps(data), worker_id, peak],
        )
        return cast(str | None, res or None)

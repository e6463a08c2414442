"""Job records and their state machine; each change is one guarded Lua transition.

State machine::

    validating_files -> queued -> running -> succeeded | failed | cancelled
    validating_files -> failed | cancelled
    queued  -> cancelled
    running -> queued      only by the reaper, when the job's lease has expired
    validating_files | queued | running -> paused     (a running job by its worker, after a checkpoint)
    paused  -> queued | cancelled                     (resume, cancel)

A succeeded, failed or cancelled job never changes again. The check ("is it still queued?",
"does this worker own it?", "has its lease expired?") and the change, its side indexes and its
event happen atomically, so two workers, two reapers or a cancel racing a start can never both
win. Starting, leasing and requeueing a job are the queue's (`service.record.queue`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, cast

from service.record import ids
from service.record import redis_keys as K
from service.record.records import (
    SPEC_FIELDS,
    TERMINAL,
    Checkpoint,
    JobRecord,
    LimitExceeded,
    dumps,
    job_from_hash,
    now,
)
from service.record.stop_rule import CANCEL_FLAG, stop_action
from service.record.store.connection import Connection
from service.record.store.events import Events
from service.record.store.files import zpage


class Jobs:
    """Job records: creation within the quota, the guarded transitions, checkpoints and outputs."""

    def __init__(self, conn: Connection, events: Events) -> None:
        self.conn = conn
        self.r = conn.r
        self.events = events

    def create(self, rec: JobRecord, *, tenant_limit: int) -> None:
        """Store a new job in `validating_files` (LimitExceeded beyond the tenant's quota;
        LookupError when one of its files was deleted meanwhile)."""
        spec = {k: getattr(rec, k) for k in SPEC_FIELDS}
        fields = {
            "id": rec.id,
            "tenant": rec.tenant,
            "status": "validating_files",
            "created_at": str(rec.created_at),
            "spec": dumps(spec),
            "attempts": "0",
            "cancel_requested": "0",
            "result_files": "[]",
        }
        keys = [
            K.job(rec.id),
            K.tenant_jobs(rec.tenant),
            K.tenant_active(rec.tenant),
            K.SEQ,
            K.STATS_STATUS,
            K.job_events(rec.id),
            K.file(rec.training_file),
            K.file_jobs(rec.training_file),
        ]
        if rec.validation_file:
            keys += [K.file(rec.validation_file), K.file_jobs(rec.validation_file)]
        args = {
            "job_id": rec.id,
            "tenant": rec.tenant,
            "limit": tenant_limit,
            "fields": fields,
            "message": f"Created fine-tuning job: {rec.id}",
            "now": str(now()),
        }
        res = int(self.conn.script("create_job")(keys=keys, args=[dumps(args)]))
        if res == -1:
            raise LimitExceeded(f"at most {tenant_limit} queued or running jobs per API key")
        if res == -2:
            raise LookupError("a file of this job no longer exists")

    def get(self, job_id: str, tenant: str | None = None) -> JobRecord | None:
        """The job, or None when it does not exist or belongs to another tenant."""
        if not ids.is_job_id(job_id):
            return None
        h = cast(dict[str, str], self.r.hgetall(K.job(job_id)))
        if not h or (tenant is not None and h.get("tenant") != tenant):
            return None
        return job_from_hash(h)

    def page(
        self, tenant: str, *, after: str | None, limit: int, metadata: dict[str, str] | None = None
    ) -> tuple[list[JobRecord], bool]:
        """A page of the tenant's jobs, newest first (KeyError when `after` is unknown)."""
        out: list[JobRecord] = []
        for job_id in zpage(self.r, K.tenant_jobs(tenant), after, "desc"):
            rec = self.get(job_id, tenant)
            if rec is None:
                continue
            if metadata and any((rec.metadata or {}).get(k) != v for k, v in metadata.items()):
                continue
            if len(out) == limit:
                return out, True
            out.append(rec)
        return out, False

    def transition(
        self,
        job_id: str,
        from_: Iterable[str],
        to: str,
        *,
        owner: str = "",
        new_owner: str = "",
        lease_seconds: float = 0,
        require_no_lease: bool = False,
        unless_set: str = "",
        set_fields: dict[str, Any] | None = None,
        incr: dict[str, int] | None = None,
        event: str | None = None,
        event_level: str = "info",
        event_data: dict[str, Any] | None = None,
    ) -> tuple[bool, str]:
        """Atomically move a job from one of `from_` to `to`; returns (applied, status before).

        `owner` demands that this worker holds the job; `require_no_lease` that its lease
        has expired (the reaper); `unless_set` that the job's flag of that name is not set
        (a pause is not applied once a cancel is pending: `stop_rule`). `event` is appended
        to the job's stream in the same step, so a reader never sees the new status without
        the event that explains it.
        """
        h = cast(list[str | None], self.r.hmget(K.job(job_id), ["tenant", "spec"]))
        if h[0] is None or h[1] is None:
            return False, ""
        tenant, spec = h[0], json.loads(h[1])
        file_sets = [K.file_jobs(f) for f in (spec["training_file"], spec["validation_file"]) if f]
        keys = [
            K.job(job_id),
            K.QUEUE,
            K.RUNNING,
            K.lease(job_id),
            K.tenant_active(tenant),
            K.job_events(job_id),
            K.STATS_STATUS,
            K.SEQ,
            *file_sets,
        ]
        args = {
            "job_id": job_id,
            "from": list(from_),
            "to": to,
            "owner": owner,
            "new_owner": new_owner,
            "lease_ms": max(1, int(lease_seconds * 1000)),
            "require_no_lease": require_no_lease,
            "unless_set": unless_set,
            "set": {k: (v if isinstance(v, str) else dumps(v)) for k, v in (set_fields or {}).items()},
            "incr": incr or {},
            "now": str(now()),
            "event": None if event is None else {"level": event_level, "message": event, "data": dumps(event_data)},
        }
        # cjson turns an empty Python dict into an empty Lua table either way; fine for pairs().
        applied, before = cast(list[Any], self.conn.script("transition")(keys=keys, args=[dumps(args)]))
        return bool(applied), str(before)

    def request_cancel(self, job_id: str) -> str:
        """Cancel: queued (or validating) -> cancelled now; running -> flag for the worker.

        Returns the status after the call ("cancelled", "running" with the flag set, or the
        terminal status that made the request invalid).
        """
        applied, before = self.transition(
            job_id,
            ["queued", "validating_files", "paused"],
            "cancelled",
            set_fields={"finished_at": str(now())},
            event="Fine-tuning job cancelled",
        )
        if applied:
            return "cancelled"
        if before != "running":
            return before
        msg = "Cancellation requested; the job stops after its current step"
        return self._flag_running(job_id, "cancel_requested", msg)

    def request_pause(self, job_id: str) -> str:
        """Pause: queued (or validating) -> paused now; running -> flag for the worker, which
        writes a checkpoint at its next optimizer step and stops (`pause_running`).

        Returns the status after the call ("paused", "running" with the flag set, or the
        status that made the request invalid: a finished one).
        """
        applied, before = self.transition(
            job_id, ["queued", "validating_files"], "paused", event="Fine-tuning job paused"
        )
        if applied:
            return "paused"
        if before != "running":
            return before
        if stop_action(*self.stop_requests(job_id)) == "cancel":  # cancel wins: it stops for good
            return before
        msg = "Pause requested; the job stops after its current step, with a checkpoint"
        return self._flag_running(job_id, "pause_requested", msg)

    def _flag_running(self, job_id: str, flag: str, message: str) -> str:
        """Set `flag` on a running job (once, with an event); returns its status."""
        return str(
            self.conn.script("request_stop")(
                keys=[K.job(job_id), K.job_events(job_id)], args=[flag, message, str(now())]
            )
        )

    def stop_requests(self, job_id: str) -> tuple[bool, bool]:
        """(cancel requested, pause requested) of a running job: what its worker polls, in one read."""
        cancel, pause = cast(list[str | None], self.r.hmget(K.job(job_id), ["cancel_requested", "pause_requested"]))
        return cancel == "1", pause == "1"

    def pause_running(self, job_id: str, worker_id: str, step: int) -> str:
        """running -> paused by the worker that owns it, once its checkpoint at `step` is stored;
        cancelled instead when a cancel is pending (`stop_rule`: cancel wins over pause).

        Returns "paused", "cancelled", or "" when the job is not this worker's to stop.
        """
        applied, _ = self.transition(
            job_id,
            ["running"],
            "paused",
            owner=worker_id,
            unless_set=CANCEL_FLAG,
            set_fields={"pause_requested": "0", "estimated_finish": ""},
            event=f"Fine-tuning job paused at step {step}; resume continues from its checkpoint",
            event_data={"step": step},
        )
        if applied:
            return "paused"
        cancel, pause = self.stop_requests(job_id)
        if stop_action(cancel, pause) != "cancel":
            return ""
        done = self.finish(
            job_id,
            worker_id,
            "cancelled",
            event="Fine-tuning job cancelled (its cancel came while a pause was pending; cancel wins)",
        )
        return "cancelled" if done else ""

    def resume(self, job_id: str) -> tuple[bool, str]:
        """paused -> queued (the caller then enqueues it); returns (applied, the status before the call).

        A paused job with a pending cancel (`stop_rule`: cancel wins) is cancelled instead:
        (False, "cancelled")."""
        applied, before = self.transition(
            job_id,
            ["paused"],
            "queued",
            set_fields={"pause_requested": "0"},
            unless_set=CANCEL_FLAG,
            event="Fine-tuning job resumed; queued to continue from its last checkpoint",
        )
        if applied or before != "paused" or stop_action(*self.stop_requests(job_id)) != "cancel":
            return applied, before
        cancelled, _ = self.transition(
            job_id,
            ["paused"],
            "cancelled",
            set_fields={"finished_at": str(now())},
            event="Fine-tuning job cancelled (its cancel was pending; cancel wins over resume)",
        )
        return False, "cancelled" if cancelled else before

    def update_running(self, job_id: str, worker_id: str, fields: dict[str, Any]) -> bool:
        """Set fields of a running job this worker owns (progress, ETA); False when it is not its own."""
        flat: list[str] = [worker_id]
        for k, v in fields.items():
            flat += [k, "" if v is None else str(v)]
        return bool(self.conn.script("update_owned")(keys=[K.job(job_id)], args=flat))

    def resolve_hyperparameters(self, job_id: str, worker_id: str, resolved: dict[str, Any]) -> bool:
        """Record the hyperparameters the owning worker trains with in place of "auto".

        OpenAI's job object shows the values in use once training starts; a later attempt
        (resume after a crash) reads them back and trains with the same ones. Only the
        running job's owner writes; nothing else rewrites the spec after creation.
        """
        raw = cast(str | None, self.r.hget(K.job(job_id), "spec"))
        if raw is None:
            return False
        spec = json.loads(raw)
        spec["hyperparameters"] = {**spec.get("hyperparameters", {}), **resolved}
        return self.update_running(job_id, worker_id, {"spec": dumps(spec)})

    def finish(
        self,
        job_id: str,
        worker_id: str,
        status: str,
        *,
        fields: dict[str, Any] | None = None,
        event: str,
        event_level: str = "info",
    ) -> bool:
        """running -> succeeded|failed|cancelled, only by the worker that owns it."""
        assert status in TERMINAL, status
        set_fields = {"finished_at": str(now()), **(fields or {})}
        applied, _ = self.transition(
            job_id, ["running"], status, owner=worker_id, set_fields=set_fields, event=event, event_level=event_level
        )
        return applied

    def fail_unstarted(self, job_id: str, message: str, code: str) -> bool:
        """validating_files|queued -> failed (the API could not queue it, or its files vanished)."""
        applied, _ = self.transition(
            job_id,
            ["validating_files", "queued"],
            "failed",
            set_fields={"finished_at": str(now()), "error": {"code": code, "message": message, "param": None}},
            event=message,
            event_level="error",
        )
        return applied

    # ------------------------------------------------------------------ checkpoints and outputs

    def add_checkpoint(self, job_id: str, step: int, path: str, metrics: dict[str, Any]) -> Checkpoint:
        ck = Checkpoint(
            id=ids.checkpoint_id(job_id, step), job_id=job_id, step=step, created_at=now(), path=path, metrics=metrics
        )
        self.r.hset(K.job_checkpoints(job_id), str(step), ck.model_dump_json())
        return ck

    def get_checkpoint(self, job_id: str, step: int) -> Checkpoint | None:
        raw = cast(str | None, self.r.hget(K.job_checkpoints(job_id), str(step)))
        return Checkpoint.model_validate_json(raw) if raw else None

    def checkpoint_steps(self, job_id: str) -> list[int]:
        """The steps of the job's checkpoints on record, in no particular order."""
        return [int(step) for step in cast(list[str], self.r.hkeys(K.job_checkpoints(job_id)))]

    def remove_checkpoints(self, job_id: str, steps: Iterable[int]) -> None:
        """Drop checkpoint records (their objects were pruned from storage)."""
        fields = [str(step) for step in steps]
        if fields:
            self.r.hdel(K.job_checkpoints(job_id), *fields)

    def set_output_bytes(self, job_id: str, tenant: str, size: int) -> bool:
        """Record the measured size of a job's outputs (False when the job no longer exists)."""
        keys = [K.job(job_id), K.tenant_output_bytes(tenant)]
        return bool(self.conn.script("set_output_bytes")(keys=keys, args=[size]))

    def forget_outputs(self, rec: JobRecord) -> str:
        """Unregister a finished job's checkpoints and result files; returns its status (a final
        one when this happened; otherwise nothing changed)."""
        files = list(rec.result_files)
        keys = [K.job(rec.id), K.job_checkpoints(rec.id), K.tenant_files(rec.tenant), *(K.file(f) for f in files)]
        return str(self.conn.script("forget_outputs")(keys=keys, args=[dumps(files)]))

    def forget_fine_tuned_model(self, job_id: str, name: str) -> None:
        """The job's model was deleted (its outputs are gone): it no longer names one."""
        self.r.hset(K.job(job_id), mapping={"fine_tuned_model": "", "model_deleted_at": str(now())})
        self.events.add(job_id, f"Fine-tuned model deleted: {name}")

    def delete(self, rec: JobRecord) -> str:
        """Remove a finished job whose outputs are gone: "deleted", "has_outputs", or its status."""
        keys = [
            K.job(rec.id),
            K.job_events(rec.id),
            K.job_metrics_step(rec.id),
            K.job_checkpoints(rec.id),
            K.tenant_jobs(rec.tenant),
            K.STATS_STATUS,
        ]
        return str(self.conn.script("delete_job")(keys=keys, args=[rec.id]))

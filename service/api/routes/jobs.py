"""Fine-tuning jobs: create, list, retrieve, cancel, pause/resume, events (paged and live), checkpoints,
adapter.

The read routes (retrieve, list, events, checkpoints, the event stream) are what clients
poll all day: they are `async def`, read through `service.record.reads` (one Redis round
trip on the asyncio client, no thread-pool hop) and answer pre-serialised JSON
(`service.api.views`). The write routes use the sync `Store` in the thread pool. Both map a
record to the public object with the same functions (`public_job`, `public_checkpoints`;
events: `views.event_json`).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from functools import lru_cache
from typing import Annotated, Any

import redis
from fastapi import APIRouter, BackgroundTasks, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.responses import Response

from service.api.deps import (
    BEARER,
    AdaptersDep,
    EnqueueDep,
    SettingsDep,
    StorageDep,
    StoreDep,
    StreamSlotsDep,
    TenantDep,
    caller,
)
from service.api.downloads import object_response
from service.api.errors import APIError, bad_request, not_found
from service.api.lora_names import served_names
from service.api.routes.models import refuse_while_used
from service.api.schemas import (
    CheckpointList,
    EventList,
    FineTuningJob,
    JobCheckpoint,
    JobCreate,
    JobDeleted,
    JobError,
    JobList,
)
from service.api.served_models import refuse_alias
from service.api.views import EventReplay, event_list_response, json_response, list_response, sse_end, sse_writes
from service.record import ids
from service.record.expiry import is_expired
from service.record.formats import PREFERENCE, SUPERVISED
from service.record.model_sources import resolve_fine_tuned
from service.record.models import checkpoint_model_name, organization_id, parse_model_name
from service.record.outputs import JobNotFinished, delete_outputs
from service.record.reads import EVENT_BATCH, JobHash, QueuePositions, Reads, hash_field, job_record
from service.record.settings import Settings
from service.record.store import TERMINAL, Checkpoint, FileRecord, JobRecord, LimitExceeded, Store, now

log = logging.getLogger(__name__)
router = APIRouter(prefix="/fine_tuning/jobs", tags=["fine-tuning"])

KEEPALIVE_MS = 15_000


def public_job(rec: JobRecord, store: QueuePositions) -> FineTuningJob:
    """The OpenAI job object of a record: the one mapping every route uses (`store` answers
    the queue position: the sync Store, or the positions a read took with the job).

    A function of the record and the queue position only: the read routes memoise its JSON
    (`public_job_json`), so anything else it came to depend on would be served stale.
    """
    hp = rec.hyperparameters
    return FineTuningJob(
        id=rec.id,
        created_at=rec.created_at,
        finished_at=rec.finished_at,
        model=rec.model,
        fine_tuned_model=rec.fine_tuned_model,
        organization_id=organization_id(rec.tenant),
        result_files=rec.result_files,
        status=rec.status,
        training_file=rec.training_file,
        validation_file=rec.validation_file,
        hyperparameters=hp,
        trained_tokens=rec.trained_tokens,
        error=JobError(**rec.error) if rec.error else None,
        seed=rec.seed,
        estimated_finish=rec.estimated_finish if rec.status == "running" else None,
        metadata=rec.metadata,
        method={"type": rec.method, rec.method: {"hyperparameters": hp}},
        user_provided_suffix=rec.suffix,
        queue_position=store.queue_position(rec.id) if rec.status == "queued" else None,
        progress=1.0 if rec.status == "succeeded" else rec.progress,
        step=rec.step,
        total_steps=rec.total_steps,
        peak_memory_bytes=rec.peak_memory_bytes,
        cancel_requested=rec.cancel_requested,
        pause_requested=rec.pause_requested,
        attempts=rec.attempts,
        started_at=rec.started_at,
        seco=rec.seco,
        adapter_file=rec.adapter_file,
    )


class _Position:
    """The one queue position `public_job` may ask for."""

    def __init__(self, position: int | None) -> None:
        self.position = position

    def queue_position(self, job_id: str) -> int | None:
        return self.position


@lru_cache(maxsize=4096)
def public_job_json(flat: JobHash, position: int | None) -> str:
    """`public_job`'s JSON for a job hash as read and its queue position: a poll of a job that has
    not changed since (queued, finished, or between two steps) costs a lookup."""
    return public_job(job_record(flat), _Position(position)).model_dump_json()


def public_checkpoints(rec: JobRecord, cks: list[Checkpoint], more: bool) -> CheckpointList:
    data = [
        JobCheckpoint(
            id=c.id,
            created_at=c.created_at,
            fine_tuned_model_checkpoint=checkpoint_model_name(rec.base_model, rec.tenant, rec.suffix, rec.id, c.step),
            fine_tuning_job_id=rec.id,
            step_number=c.step,
            metrics={"step": c.step, **c.metrics},
        )
        for c in cks
    ]
    return CheckpointList(
        data=data, has_more=more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
    )


def _get(store: Store, tenant: str, job_id: str) -> JobRecord:
    rec = store.get_job(job_id, tenant)
    if rec is None:
        raise not_found("fine-tuning job", job_id, param="fine_tuning_job_id")
    return rec


async def _read(reads: Reads, tenant: str, job_id: str) -> JobRecord:
    found = await reads.job(job_id, tenant)
    if found is None:
        raise not_found("fine-tuning job", job_id, param="fine_tuning_job_id")
    return job_record(found[0])


def _check_kind(param: str, frec: FileRecord, method: str) -> None:
    """A preference file needs method "dpo" and a supervised file the other methods: a clear 400 now,
    not a failed job later. Files uploaded before their kind was recorded are checked by the worker."""
    wanted = PREFERENCE if method == "dpo" else SUPERVISED
    if frec.kind is None or frec.kind == wanted:
        return
    if wanted == PREFERENCE:
        message = (
            f"{param}: file {frec.id!r} holds supervised records (text, chat or prompt/completion); a job "
            'with method type \'dpo\' needs preference pairs, one {"input", "preferred_output", '
            '"non_preferred_output"} object per line'
        )
    else:
        message = (
            f"{param}: file {frec.id!r} holds preference pairs; train on them with "
            'method={"type": "dpo"}, or give this job supervised records'
        )
    raise bad_request(message, param=param, code="invalid_file_format")


def _parent_lora(body: JobCreate, tenant: str, store: Store, settings: Settings) -> dict[str, Any]:
    """The LoRA settings of the fine-tuned model (or checkpoint) a job starts from; a 400 when
    `body.model` is no such model of the caller's, or asks for another LoRA shape."""
    refuse_alias(body.model)
    if parse_model_name(body.model) is None:
        offered = ", ".join(settings.models) or "(none configured)"
        raise bad_request(
            f"Model {body.model!r} is not offered by this server; choose one of: {offered}",
            param="model",
            code="model_not_available",
        )
    found = resolve_fine_tuned(body.model, tenant, store)
    if found is None:
        raise bad_request(
            f"Model {body.model!r} is not one of your fine-tuned models or checkpoints (GET "
            "/v1/models lists them; a checkpoint is kept while it is among the newest)",
            param="model",
            code="model_not_available",
        )
    if found.adapter_location(store) is None:
        raise bad_request(f"Model {body.model!r} no longer has its adapter", param="model", code="model_not_available")
    if found.name.base not in settings.models:
        raise bad_request(
            f"Model {body.model!r} adapts base model {found.name.base!r}, which this server no longer offers",
            param="model",
            code="model_not_available",
        )
    lora = dict(found.job.seco.get("lora") or {})
    if "lora" in body.seco.model_fields_set and body.seco.lora.model_dump() != lora:
        raise bad_request(
            f"seco.lora: a job on top of {body.model!r} continues training its adapter, whose LoRA "
            f"settings are {lora}; leave seco.lora out or give the same",
            param="seco.lora",
            code="invalid_lora",
        )
    return lora


@router.post("", response_model=FineTuningJob)
def create_job(
    body: JobCreate,
    tenant: TenantDep,
    store: StoreDep,
    settings: SettingsDep,
    storage: StorageDep,
    enqueue: EnqueueDep,
) -> FineTuningJob:
    """Create a job: check its model and files, then queue it for a worker.

    `model` is a base model, or one of the caller's fine-tuned models or checkpoints: the
    job then continues training that adapter (its LoRA shape is kept) on the same base.
    """
    seco = body.seco.model_dump()
    if body.model not in settings.models:
        seco["lora"] = _parent_lora(body, tenant, store, settings)
    files = {"training_file": body.training_file, "validation_file": body.validation_file}
    stored: dict[str, str] = {}  # file id -> storage key
    for param, file_id in files.items():
        if file_id is None:
            continue
        frec = store.get_file(file_id, tenant)
        if frec is None or is_expired(frec):
            raise bad_request(f"{param}: no such file {file_id!r}", param=param, code="file_not_found")
        if frec.purpose != "fine-tune":
            raise bad_request(
                f"{param}: file {file_id!r} has purpose {frec.purpose!r}; upload training data "
                "with purpose 'fine-tune'",
                param=param,
            )
        _check_kind(param, frec, body.method_type)
        stored[file_id] = frec.path
    if store.tenant_storage_bytes(tenant) >= settings.max_file_bytes:  # its outputs would not fit
        raise APIError(
            429,
            f"Storage quota of {settings.max_file_bytes} bytes for this API key is used up by files "
            "and job outputs; delete files or finished jobs first",
            code="quota_exceeded",
            retry=False,
        )
    rec = JobRecord(
        id=ids.new_job_id(),
        tenant=tenant,
        status="validating_files",
        created_at=now(),
        model=body.model,
        training_file=body.training_file,
        validation_file=body.validation_file,
        hyperparameters=body.effective_hyperparameters().model_dump(),
        suffix=body.suffix,
        seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
        metadata=body.metadata,
        seco=seco,
        method=body.method_type,
    )
    try:
        store.create_job(rec, tenant_limit=settings.max_queued_jobs)
    except LimitExceeded:
        raise APIError(
            429,
            f"This API key already has {settings.max_queued_jobs} queued or running jobs; wait "
            "for one to finish or cancel one",
            code="quota_exceeded",
            retry=False,
        ) from None
    except LookupError:
        raise bad_request(
            "A file of this job was deleted while the job was being created", param="training_file"
        ) from None
    store.add_event(
        rec.id,
        f"Validating training file: {rec.training_file}"
        + (f" and validation file: {rec.validation_file}" if rec.validation_file else ""),
    )
    # Records were validated at upload; here only check the bytes are still in storage.
    missing = [file_id for file_id, key in stored.items() if not storage.exists(key)]
    if missing:
        store.fail_unstarted(rec.id, f"File content missing from storage: {', '.join(missing)}", "file_missing")
    elif store.transition(rec.id, ["validating_files"], "queued", event="Files validated, moving job to queued state")[
        0
    ]:
        try:
            enqueue(rec.id)
        except Exception as e:
            log.exception("could not enqueue job %s", rec.id)
            store.fail_unstarted(rec.id, f"Could not queue the job: {type(e).__name__}", "queue_unavailable")
            raise APIError(
                503, "The job queue is unavailable; retry shortly", type="server_error", code="queue_unavailable"
            ) from None
    log.info("job created", extra={"job_id": rec.id, "tenant": tenant, "model": rec.model})
    return public_job(_get(store, tenant, rec.id), store)


@router.get("", response_model=JobList, openapi_extra=BEARER)
async def list_jobs(
    request: Request,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> Response:
    """The caller's jobs, newest first; `metadata[k]=v` query parameters filter them."""
    tenant, reads = caller(request)
    meta = {k[9:-1]: v for k, v in request.query_params.items() if k.startswith("metadata[") and k.endswith("]")}
    try:
        flats, more, positions = await reads.jobs(tenant, after=after, limit=limit, metadata=meta or None)
    except KeyError:
        raise bad_request(f"after: no such job {after!r}", param="after") from None
    jobs = [public_job_json(f, positions.queue_position(hash_field(f, "id") or "")) for f in flats]
    return list_response(jobs, more)  # JobList


@router.get("/{fine_tuning_job_id}", response_model=FineTuningJob, openapi_extra=BEARER)
async def retrieve_job(fine_tuning_job_id: str, request: Request) -> Response:
    """One job, with its progress, ETA and queue position."""
    tenant, reads = caller(request)
    found = await reads.job(fine_tuning_job_id, tenant)
    if found is None:
        raise not_found("fine-tuning job", fine_tuning_job_id, param="fine_tuning_job_id")
    flat, positions = found
    return Response(public_job_json(flat, positions.queue_position(fine_tuning_job_id)), media_type="application/json")


@router.post("/{fine_tuning_job_id}/cancel", response_model=FineTuningJob)
def cancel_job(fine_tuning_job_id: str, tenant: TenantDep, store: StoreDep) -> FineTuningJob:
    """Cancel: a queued job at once; a running job at its next optimizer step.

    A running job is returned with `status: "running"` and `cancel_requested: true`; it
    becomes `cancelled` when its worker stops (within one optimizer step). Cancelling a
    finished job is a 400 the SDK does not retry.
    """
    rec = _get(store, tenant, fine_tuning_job_id)
    status = store.request_cancel(rec.id)
    if status in ("succeeded", "failed"):
        raise bad_request(
            f"Job {rec.id} has already {status} and cannot be cancelled",
            param="fine_tuning_job_id",
            code="invalid_state",
        )
    return public_job(_get(store, tenant, rec.id), store)


@router.post("/{fine_tuning_job_id}/pause", response_model=FineTuningJob)
def pause_job(fine_tuning_job_id: str, tenant: TenantDep, store: StoreDep) -> FineTuningJob:
    """Pause: a queued job at once; a running job after its next optimizer step, once that
    step's checkpoint is stored (its worker then takes the next job).

    A running job is returned with `status: "running"` and `pause_requested: true`; it
    becomes `paused` when its worker stops. Pausing a paused job returns it unchanged;
    pausing a finished one is a 400.
    """
    rec = _get(store, tenant, fine_tuning_job_id)
    status = store.request_pause(rec.id)
    if status in TERMINAL:
        raise bad_request(
            f"Job {rec.id} has already {'been ' if status == 'cancelled' else ''}{status} and cannot be paused",
            param="fine_tuning_job_id",
            code="invalid_state",
        )
    return public_job(_get(store, tenant, rec.id), store)


@router.post("/{fine_tuning_job_id}/resume", response_model=FineTuningJob)
def resume_job(fine_tuning_job_id: str, tenant: TenantDep, store: StoreDep, enqueue: EnqueueDep) -> FineTuningJob:
    """Resume a paused job: it is queued again and continues from its last checkpoint, exactly
    as a job resumed after its worker died. A job that is not paused is a 400."""
    rec = _get(store, tenant, fine_tuning_job_id)
    applied, before = store.resume(rec.id)
    if not applied:
        raise bad_request(
            f"Job {rec.id} is {before}, not paused; only a paused job can be resumed",
            param="fine_tuning_job_id",
            code="invalid_state",
        )
    try:
        enqueue(rec.id)
    except Exception as e:  # paused again (unless a worker took it already), so a retry of the resume works
        log.exception("could not enqueue resumed job %s", rec.id)
        store.transition(rec.id, ["queued"], "paused", event="Could not queue the job; it stays paused")
        raise APIError(
            503,
            f"The job queue is unavailable ({type(e).__name__}); the job stays paused, retry the resume shortly",
            type="server_error",
            code="queue_unavailable",
        ) from None
    log.info("job resumed", extra={"job_id": rec.id, "tenant": tenant})
    return public_job(_get(store, tenant, rec.id), store)


@router.delete("/{fine_tuning_job_id}", response_model=JobDeleted)
def delete_job(
    fine_tuning_job_id: str,
    tenant: TenantDep,
    store: StoreDep,
    storage: StorageDep,
    adapters: AdaptersDep,
    background: BackgroundTasks,
) -> JobDeleted:
    """Delete a finished job: its checkpoints, adapter and metrics (freeing their storage
    quota), then the job and its events. A queued or running job must be cancelled first."""
    rec = _get(store, tenant, fine_tuning_job_id)
    if rec.status in TERMINAL:  # an unfinished one is refused below, whoever depends on it
        refuse_while_used(
            rec.id, tenant, store, f"Job {rec.id} (with its fine-tuned model)", param="fine_tuning_job_id"
        )
    served = served_names(rec, store)
    try:
        delete_outputs(store, storage, rec)
    except JobNotFinished as e:
        raise bad_request(
            f"Job {rec.id} is {e}; only a finished job can be deleted (cancel it first)",
            param="fine_tuning_job_id",
            code="invalid_state",
        ) from None
    if store.delete_job(rec) != "deleted":  # something wrote under the job meanwhile: deleting again clears it
        raise APIError(409, f"Job {rec.id} was still being written to; retry", code="conflict")
    background.add_task(adapters.forget, served)  # what serving kept of its model and checkpoints
    log.info("job deleted", extra={"job_id": rec.id, "tenant": tenant})
    return JobDeleted(id=rec.id)


def _stream_id(value: str | None, param: str) -> str | None:
    if value is None:
        return None
    sid = ids.stream_id_of(value)
    if sid is None:
        raise bad_request(f"{param}: not an event id: {value!r}", param=param)
    return sid


@router.get("/{fine_tuning_job_id}/events", response_model=EventList, openapi_extra=BEARER)
async def list_events(
    fine_tuning_job_id: str,
    request: Request,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> Response:
    """The job's events, newest first; `after` (an event id) pages to older ones."""
    tenant, reads = caller(request)
    if after is not None and ids.stream_id_of(after) is None:
        await _read(reads, tenant, fine_tuning_job_id)  # an unknown job is a 404 whatever the parameters
    found = await reads.events(fine_tuning_job_id, tenant, after=_stream_id(after, "after"), limit=limit)
    if found is None:
        raise not_found("fine-tuning job", fine_tuning_job_id, param="fine_tuning_job_id")
    return event_list_response(*found)


@router.get(
    "/{fine_tuning_job_id}/events/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
    openapi_extra=BEARER,
)
async def stream_events(
    fine_tuning_job_id: str,
    request: Request,
    settings: SettingsDep,
    stream_slots: StreamSlotsDep,
    after: str | None = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Response:
    """Server-Sent Events, oldest first: `id:` is the event's stream id, `data:` the event.

    Resumes after `Last-Event-ID` (or `?after=`); without either it replays from the
    first event. Ends with `event: end` once the job is finished and every event sent.
    A key holds at most SECO_MAX_STREAMS streams open at once (429 beyond); a finished
    job's events are answered at once, in one response that holds no stream open.
    """
    tenant, reads = caller(request)
    if any(v is not None and ids.stream_id_of(v) is None for v in (last_event_id, after)):
        await _read(reads, tenant, fine_tuning_job_id)  # an unknown job is a 404 whatever the parameters
    start = _stream_id(last_event_id, "Last-Event-ID") or _stream_id(after, "after") or "0-0"
    opened = await reads.open_stream(fine_tuning_job_id, tenant, start)
    if opened is None:
        raise not_found("fine-tuning job", fine_tuning_job_id, param="fine_tuning_job_id")
    flat, first = opened
    status = hash_field(flat, "status")
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    if status in TERMINAL and len(first) < EVENT_BATCH:  # read with the final status: nothing more will come
        writes = sse_writes(first) or [""]  # the retry hint rides with the first write, the end with the last
        writes[0], writes[-1] = "retry: 2000\n\n" + writes[0], writes[-1] + sse_end(str(status))
        return EventReplay(writes, headers)
    slot = await stream_slots.take(tenant, settings.max_streams)
    if slot is None:
        raise APIError(
            429,
            f"This API key already has {settings.max_streams} open event streams; close one "
            "(or poll the events list) first",
            code="too_many_streams",
            retry=False,
        )

    async def gen() -> AsyncIterator[str]:
        try:
            async for chunk in follow():
                yield chunk
        except redis.RedisError as e:  # headers are sent: end the stream; the client resumes by Last-Event-ID
            log.warning("event stream of %s interrupted: %s", fine_tuning_job_id, type(e).__name__)

    async def follow() -> AsyncIterator[str]:
        yield "retry: 2000\n\n"
        for chunk in sse_writes(first):
            yield chunk
        last = first[-1][0] if first else start
        while True:
            await slot.renew()
            # new events and the status in one read: none new and a final status means none will come
            # (the final event is written atomically with the status)
            events, status = await reads.stream(fine_tuning_job_id, last)
            if not events:
                if status in TERMINAL:
                    yield sse_end(status)
                    return
                events = await reads.wait_events(fine_tuning_job_id, last, KEEPALIVE_MS)
                if not events:
                    yield ": keep-alive\n\n"
                    continue
            last = events[-1][0]
            for chunk in sse_writes(events):
                yield chunk

    # the slot is given back once the stream ends, the client's disconnect included
    return StreamingResponse(
        gen(), media_type="text/event-stream", headers=headers, background=BackgroundTask(slot.release)
    )


@router.get("/{fine_tuning_job_id}/checkpoints", response_model=CheckpointList, openapi_extra=BEARER)
async def list_checkpoints(
    fine_tuning_job_id: str,
    request: Request,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 10,
) -> Response:
    """The job's checkpoints with their metrics, newest first."""
    tenant, reads = caller(request)
    try:
        found = await reads.checkpoints(fine_tuning_job_id, tenant, after=after, limit=limit)
    except KeyError:
        raise bad_request(f"after: no such checkpoint {after!r}", param="after") from None
    if found is None:
        raise not_found("fine-tuning job", fine_tuning_job_id, param="fine_tuning_job_id")
    return json_response(public_checkpoints(*found))


@router.get(
    "/{fine_tuning_job_id}/adapter", response_class=FileResponse, responses={200: {"content": {"application/gzip": {}}}}
)
async def download_adapter(
    fine_tuning_job_id: str, tenant: TenantDep, store: StoreDep, storage: StorageDep
) -> Response:
    """The trained LoRA adapter as a .tar.gz (adapter_config.json + adapter_model.safetensors at its root)."""
    rec = await run_in_threadpool(_get, store, tenant, fine_tuning_job_id)
    if rec.status != "succeeded":
        raise bad_request(
            f"Job {rec.id} is {rec.status}; its adapter is available once it has succeeded",
            param="fine_tuning_job_id",
            code="adapter_not_ready",
        )
    frec = await run_in_threadpool(store.get_file, rec.adapter_file or "", tenant)
    response = await object_response(storage, frec.path, frec.filename, "application/gzip") if frec else None
    if response is None:
        raise APIError(404, f"The adapter of job {rec.id} was deleted", code="not_found")
    return response

"""`GET /v1/fine_tuning/jobs/{id}/merged`: a succeeded job's base weights with its adapter merged
in, as a streamed .tar.gz of a Hugging Face directory (safetensors), for tools that take no
adapters.

Built on first request by a worker (the API imports no torch): that request records a build
and queues it (`Merges.request`, `Enqueue.merge`) and answers 202 with `Retry-After`; so do
requests while it builds (no second build). Once built the archive is streamed as the
adapter is, and counted against the tenant's storage quota while it is kept (it lives under
the job's outputs: deleting the job or its model deletes it). A failed build is reported to
the next request, and the request after that builds again. Only the job's owner sees it
(anyone else: 404, as for the adapter).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from starlette.responses import Response

from service.api.deps import SettingsDep, StorageDep, StoreDep, TenantDep
from service.api.downloads import object_response
from service.api.errors import APIError, bad_request
from service.api.routes.jobs import _get
from service.record.queue import Enqueue
from service.record.settings import Settings
from service.record.storage import Storage, keys
from service.record.store import JobRecord, Store
from service.record.store.merges import MergedState

log = logging.getLogger(__name__)
router = APIRouter(prefix="/fine_tuning/jobs", tags=["fine-tuning"])

RETRY_AFTER_SECONDS = 10
"""What a 202 asks the client to wait before asking again (a small model merges in seconds)."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
FAILURE_STATUS = {"quota_exceeded": 429, "model_not_available": 404}
"""The HTTP status a failed build is reported with, by its code; any other failure is a 500."""


def weights_bytes(model_dir: Path) -> int:
    """What the base model's weights take on disk: the merged model's size, near enough (same
    dtype, same tensors), so a build the quota cannot hold is refused before it starts. 0 where
    this process cannot see the directory (an API on another host than the workers)."""
    if not model_dir.is_dir():
        return 0
    return sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def _building(rec: JobRecord, state: MergedState) -> Response:
    body: dict[str, Any] = {
        "object": "fine_tuning.job.merged_model",
        "fine_tuning_job_id": rec.id,
        "status": "building",
        "building_since": state.since,
        "message": f"The merged model of job {rec.id} is being built; ask again in {RETRY_AFTER_SECONDS} seconds",
    }
    return JSONResponse(body, status_code=202, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def _failed(rec: JobRecord, state: MergedState) -> APIError:
    error = state.error or {}
    code = str(error.get("code") or "merge_failed")
    status = FAILURE_STATUS.get(code, 500)
    message = f"Building the merged model of job {rec.id} failed: {error.get('message') or 'no reason recorded'}"
    if status == 500:
        message += "; ask again to retry"
        return APIError(500, message, type="server_error", code=code, retry=False)
    return APIError(status, message, code=code, param="fine_tuning_job_id", retry=False)


async def _serve(rec: JobRecord, state: MergedState, storage: Storage) -> Response | None:
    key = keys.merged_key(rec.tenant, rec.id, state.token)
    return await object_response(storage, key, f"{rec.id}-merged.tar.gz", "application/gzip")


def _check_quota(rec: JobRecord, store: Store, settings: Settings) -> None:
    """A 429 naming the quota when the tenant's storage cannot hold the merged model: before a
    build starts, so nothing is built only to be thrown away (the worker checks the real size)."""
    base_dir = settings.models.get(rec.base_model)
    needed = weights_bytes(base_dir) if base_dir is not None else 0
    used = store.tenant_storage_bytes(rec.tenant)
    if used >= settings.max_file_bytes or used + needed > settings.max_file_bytes:
        raise APIError(
            429,
            f"Storage quota of {settings.max_file_bytes} bytes for this API key cannot hold the merged model "
            f"(about {needed} bytes; {used} bytes used by files and job outputs); delete files or finished "
            "jobs first",
            code="quota_exceeded",
            retry=False,
        )


def _queue_build(rec: JobRecord, state: MergedState, store: Store, enqueue: Enqueue) -> None:
    """Publish the build `Merges.request` recorded; forgotten again (a 503) if it cannot be queued."""
    try:
        enqueue.merge(rec.id, state.token)
    except Exception as e:
        log.exception("could not queue the merge of job %s", rec.id)
        store.merges.forget(rec.id, state.token)
        raise APIError(
            503,
            f"The job queue is unavailable ({type(e).__name__}); retry shortly",
            type="server_error",
            code="queue_unavailable",
        ) from None
    store.add_event(rec.id, "Merged model requested; a worker is building it")
    log.info("merge queued", extra={"job_id": rec.id, "tenant": rec.tenant})


@router.get(
    "/{fine_tuning_job_id}/merged",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/gzip": {}}},
        202: {"description": "Being built: ask again after `Retry-After` seconds"},
    },
)
async def download_merged(
    fine_tuning_job_id: str,
    request: Request,
    tenant: TenantDep,
    store: StoreDep,
    storage: StorageDep,
    settings: SettingsDep,
) -> Response:
    """The base model with the job's adapter merged into its weights: a .tar.gz whose root is a
    Hugging Face model directory (config, safetensors, tokenizer) that
    `AutoModelForCausalLM.from_pretrained` loads. 202 with `Retry-After` while it is built."""
    rec = await run_in_threadpool(_get, store, tenant, fine_tuning_job_id)
    if rec.status != "succeeded":
        raise bad_request(
            f"Job {rec.id} is {rec.status}; its merged model can be built once it has succeeded",
            param="fine_tuning_job_id",
            code="merged_not_ready",
        )
    state = await run_in_threadpool(store.merges.get, rec.id)
    if state is not None and state.status == "ready":
        response = await _serve(rec, state, storage)
        if response is not None:
            return response
        await run_in_threadpool(store.merges.forget, rec.id, state.token)  # its archive is gone: build again
        state = None
    if state is None:
        await run_in_threadpool(_check_quota, rec, store, settings)
    found = await run_in_threadpool(store.merges.request, rec.id)
    if found.no_adapter or found.state is None:  # the model (or the job) was deleted
        raise APIError(404, f"The adapter of job {rec.id} was deleted", code="not_found")
    state = found.state
    if found.build:
        await run_in_threadpool(_queue_build, rec, state, store, request.app.state.enqueue)
    if state.status == "building":
        return _building(rec, state)
    if state.status == "failed":
        raise _failed(rec, state)
    response = await _serve(rec, state, storage)  # built between the two reads
    if response is None:
        raise APIError(503, f"The merged model of job {rec.id} is being replaced; retry", type="server_error")
    return response

"""Files: upload (streamed, size-limited, validated JSONL), list, retrieve, content, delete."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from starlette.responses import Response

from service.api.deps import SettingsDep, StorageDep, StoreDep, TenantDep
from service.api.downloads import object_response
from service.api.errors import APIError, bad_request, not_found
from service.api.jsonl import InvalidFile, validate_jsonl
from service.api.schemas import FileDeleted, FileList, FileObject
from service.api.upload_slots import UploadSlots
from service.api.uploads import UNREAD_BODY, TooLarge, receive_file
from service.record import ids
from service.record.expiry import MAX_SECONDS, MIN_SECONDS, InvalidExpiry, expires_at, is_expired
from service.record.formats import record_kind
from service.record.outputs import measure_outputs
from service.record.settings import Settings
from service.record.storage import Storage, keys, scratch_dir
from service.record.store import FileInUse, FileRecord, LimitExceeded, Store, now

log = logging.getLogger(__name__)
router = APIRouter(prefix="/files", tags=["files"])

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": ["fine-tune"]},
                        "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                        "expires_after[seconds]": {"type": "integer", "minimum": MIN_SECONDS, "maximum": MAX_SECONDS},
                    },
                }
            }
        },
    }
}


def public(rec: FileRecord) -> FileObject:
    return FileObject(
        id=rec.id,
        bytes=rec.bytes,
        created_at=rec.created_at,
        filename=rec.filename,
        purpose=rec.purpose,
        status=rec.status,
        expires_at=rec.expires_at,
    )


def _quota_error(limit: int, headers: dict[str, str] | None = None) -> APIError:
    return APIError(
        429,
        f"Storage quota of {limit} bytes for this API key is used up by files and job outputs; "
        "delete files or finished jobs first",
        code="quota_exceeded",
        retry=False,
        headers=headers,
    )


@router.post("", response_model=FileObject, openapi_extra=UPLOAD_BODY)
async def create_file(
    request: Request, tenant: TenantDep, store: StoreDep, settings: SettingsDep, storage: StorageDep
) -> FileObject:
    """Upload a JSONL training file (multipart: `file`, `purpose="fine-tune"`).

    The body is streamed to this host's scratch space, validated there, and only then
    published to storage (a rename on the local back-end, a multipart upload on S3):
    storage never holds a file that did not validate, and readers never see part of one.
    Each upload holds one of the process's upload slots throughout (`upload_slots`), so
    what validation takes in memory has a ceiling.
    """
    slots: UploadSlots = request.app.state.upload_slots
    with slots.hold(tenant):
        return await _create_file(request, tenant, store, settings, storage)


async def _create_file(request: Request, tenant: str, store: Store, settings: Settings, storage: Storage) -> FileObject:
    used = await run_in_threadpool(store.tenant_storage_bytes, tenant)  # uploads and job outputs
    room = settings.max_file_bytes - used
    if room <= 0:
        raise _quota_error(settings.max_file_bytes)
    limit = min(settings.max_upload_bytes, room)
    file_id = ids.new_file_id()
    key = keys.file_key(tenant, file_id)
    tmp = scratch_dir(settings, "uploads", f"api.{os.getpid()}", f"{file_id}.part")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        try:
            up = await receive_file(request, tmp, limit)
        except TooLarge:
            if limit < settings.max_upload_bytes:
                raise _quota_error(settings.max_file_bytes, UNREAD_BODY) from None
            raise APIError(
                413,
                f"File is larger than the limit of {settings.max_upload_bytes} bytes",
                param="file",
                code="file_too_large",
                retry=False,
                headers=UNREAD_BODY,
            ) from None
        purpose = up.fields["purpose"]
        if purpose != "fine-tune":
            raise bad_request(f"purpose must be 'fine-tune' (got {purpose!r})", param="purpose")
        created_at = now()
        try:
            expires = expires_at(
                created_at, up.fields.get("expires_after[anchor]"), up.fields.get("expires_after[seconds]")
            )
        except InvalidExpiry as e:
            raise bad_request(str(e), param=e.param, code="invalid_expires_after") from None
        try:
            n, fmt = await run_in_threadpool(validate_jsonl, tmp, max_line_bytes=settings.max_line_bytes)
        except InvalidFile as e:
            raise bad_request(f"Invalid training file: {e}", param="file", code="invalid_file") from None
        await run_in_threadpool(storage.put_file, key, tmp, move=True)  # publish: complete, validated files only
        kind = record_kind(fmt.split("+")[0])  # a file holds one kind of record (formats.py)
        rec = FileRecord(
            id=file_id,
            tenant=tenant,
            bytes=up.bytes,
            created_at=created_at,
            filename=up.filename,
            purpose=purpose,
            path=key,
            kind=kind,
            expires_at=expires,
        )
        outputs = await run_in_threadpool(store.tenant_output_bytes, tenant)
        try:  # the script checks uploads against what the outputs leave of the quota, atomically
            await run_in_threadpool(
                store.create_file, rec, counted=True, tenant_limit=settings.max_file_bytes - outputs
            )
        except LimitExceeded:
            await run_in_threadpool(storage.delete, key)
            raise _quota_error(settings.max_file_bytes) from None
        except BaseException:
            await run_in_threadpool(storage.delete, key)
            raise
        log.info(
            "file uploaded",
            extra={"file_id": file_id, "tenant": tenant, "bytes": up.bytes, "records": n, "format": fmt},
        )
        return public(rec)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


@router.get("", response_model=FileList)
def list_files(
    tenant: TenantDep,
    store: StoreDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    order: Literal["asc", "desc"] = "desc",
    purpose: str | None = None,
) -> FileList:
    """The caller's files, newest first by default."""
    try:
        recs, more = store.list_files(tenant, after=after, limit=limit, order=order, purpose=purpose)
    except KeyError:
        raise bad_request(f"after: no such file {after!r}", param="after") from None
    data = [public(r) for r in recs if not is_expired(r)]  # the sweep deletes them soon
    return FileList(
        data=data, has_more=more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
    )


def _get(store: StoreDep, tenant: str, file_id: str) -> FileRecord:
    """The caller's file; an expired one is a 404 as if the sweep had deleted it already."""
    rec = store.get_file(file_id, tenant)
    if rec is None or is_expired(rec):
        raise not_found("file", file_id, param="file_id")
    return rec


@router.get("/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, tenant: TenantDep, store: StoreDep) -> FileObject:
    """One file's metadata."""
    return public(_get(store, tenant, file_id))


@router.get("/{file_id}/content", response_class=FileResponse)
async def file_content(file_id: str, tenant: TenantDep, store: StoreDep, storage: StorageDep) -> Response:
    """The file's bytes, streamed from storage."""
    rec = await run_in_threadpool(_get, store, tenant, file_id)
    response = await object_response(storage, rec.path, rec.filename, "application/octet-stream")
    if response is None:
        raise APIError(404, f"The content of file {file_id!r} is no longer in storage", code="not_found")
    return response


def _refuse_model_adapter(store: Store, rec: FileRecord) -> None:
    """A 400 for the adapter result file of a model that still exists, pointing to the model's delete."""
    if not rec.job_id or rec.purpose != "fine-tune-results":
        return
    job = store.get_job(rec.job_id, rec.tenant)
    if job is not None and job.adapter_file == rec.id and job.fine_tuned_model:
        raise bad_request(
            f"File {rec.id!r} is the adapter of fine-tuned model {job.fine_tuned_model!r}; delete the "
            f"model instead (DELETE /v1/models/{job.fine_tuned_model}), which removes its adapter, "
            "checkpoints and result files together",
            param="file_id",
            code="file_in_use",
        )


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, tenant: TenantDep, store: StoreDep, storage: StorageDep) -> FileDeleted:
    """Delete a file and its object, unless an unfinished job still needs it. A fine-tuned
    model's adapter is deleted with its model (`DELETE /v1/models/{name}`), never alone: the
    model would stay listed and accepted as a job's `model` without the adapter it stands for."""
    rec = _get(store, tenant, file_id)
    _refuse_model_adapter(store, rec)
    try:
        store.delete_file(rec)
    except FileInUse as e:
        raise bad_request(
            f"File {file_id!r} is used by job {e} which has not finished; cancel it first",
            param="file_id",
            code="file_in_use",
        ) from None
    storage.delete(rec.path)
    if rec.job_id:  # a job's result file: the job's outputs shrank
        measure_outputs(store, storage, tenant, rec.job_id)
    return FileDeleted(id=file_id)

"""Serving a stored object to a client: streamed, never read whole into memory.

On the local back-end a `FileResponse` (sendfile, HTTP ranges); on object storage the
API proxies the object's stream chunk by chunk, so clients need no access to the store
and no store URL (presigned or not) ever reaches them.
"""

from __future__ import annotations

from urllib.parse import quote

from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse
from starlette.responses import Response

from service.record.storage import ObjectNotFound, Storage


def content_disposition(filename: str) -> str:
    """`attachment; filename=...` as Starlette's FileResponse writes it (RFC 6266 for non-ASCII)."""
    quoted = quote(filename)
    if quoted != filename:
        return f"attachment; filename*=utf-8''{quoted}"
    return f'attachment; filename="{filename}"'


async def object_response(storage: Storage, key: str, filename: str, media_type: str) -> Response | None:
    """The object as a download, or None when it no longer exists."""
    path = storage.local_path(key)
    if path is not None:
        return FileResponse(path, media_type=media_type, filename=filename) if path.is_file() else None
    try:
        download = await run_in_threadpool(storage.open, key)
    except ObjectNotFound:
        return None
    headers = {"Content-Length": str(download.size), "Content-Disposition": content_disposition(filename)}
    return StreamingResponse(download.chunks, media_type=media_type, headers=headers)

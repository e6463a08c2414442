"""Dependencies as `Annotated` aliases, and the plain accessors of the hot read routes.

All `async def`: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per
dependency per request for what is an attribute lookup. The routes clients poll all day
skip the dependency machinery altogether (`caller`, `BEARER`): resolving the tenant's
dependency chain cost more than their Redis read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.adapters import Adapters
from service.api.streams import StreamSlots
from service.record.reads import Reads
from service.record.settings import Settings
from service.record.storage import Storage
from service.record.store import Store

# Documents the bearer scheme in the OpenAPI schema; the check itself is BearerAuth.
_bearer = HTTPBearer(auto_error=False)


async def get_tenant(request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    """The caller's tenant, set by the BearerAuth middleware."""
    return str(request.state.tenant)


async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_reads(request: Request) -> Reads:
    return request.app.state.reads


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage


async def get_stream_slots(request: Request) -> StreamSlots:
    return request.app.state.stream_slots


async def get_enqueue(request: Request) -> Callable[[str], None]:
    return request.app.state.enqueue


async def get_adapters(request: Request) -> Adapters:
    return request.app.state.adapters


BEARER: dict[str, Any] = {"security": [{"HTTPBearer": []}]}
"""`openapi_extra` of a route that reads its caller with `caller`: documents the bearer scheme as
`TenantDep` does (the check itself is BearerAuth's either way)."""


def caller(request: Request) -> tuple[str, Reads]:
    """The caller's tenant (set by the BearerAuth middleware) and the process's async reads."""
    return str(request.state.tenant), request.app.state.reads


TenantDep = Annotated[str, Depends(get_tenant)]
StoreDep = Annotated[Store, Depends(get_store)]
ReadsDep = Annotated[Reads, Depends(get_reads)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]
StreamSlotsDep = Annotated[StreamSlots, Depends(get_stream_slots)]
EnqueueDep = Annotated[Callable[[str], None], Depends(get_enqueue)]
AdaptersDep = Annotated[Adapters, Depends(get_adapters)]

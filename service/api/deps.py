"""Dependencies as `Annotated` aliases, as in full-stack-fastapi-template."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.record.settings import Settings
from service.record.storage import Storage
from service.record.store import Store

# Documents the bearer scheme in the OpenAPI schema; the check itself is BearerAuth.
_bearer = HTTPBearer(auto_error=False)


def get_tenant(request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    """The caller's tenant, set by the BearerAuth middleware."""
    return str(request.state.tenant)


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def get_enqueue(request: Request) -> Callable[[str], None]:
    return request.app.state.enqueue


TenantDep = Annotated[str, Depends(get_tenant)]
StoreDep = Annotated[Store, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]
EnqueueDep = Annotated[Callable[[str], None], Depends(get_enqueue)]

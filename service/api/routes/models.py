"""Models: the base models this server offers and the caller's fine-tuned results."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import SettingsDep, StoreDep, TenantDep
from service.api.errors import not_found
from service.api.schemas import Model, ModelList
from service.record.settings import Settings
from service.record.store import Store

router = APIRouter(prefix="/models", tags=["models"])


def _all(tenant: str, store: Store, settings: Settings) -> list[Model]:
    out = [Model(id=name, created=0, owned_by="system") for name in settings.models]
    after: str | None = None
    while True:  # the tenant's succeeded jobs; a per-tenant model index would avoid this scan
        recs, more = store.list_jobs(tenant, after=after, limit=100)
        for rec in recs:
            if rec.status == "succeeded" and rec.fine_tuned_model:
                out.append(Model(id=rec.fine_tuned_model, created=rec.finished_at or rec.created_at,
                                 owned_by=f"org-{tenant}"))  # fmt: skip
        if not more or not recs:
            return out
        after = recs[-1].id


@router.get("", response_model=ModelList)
def list_models(tenant: TenantDep, store: StoreDep, settings: SettingsDep) -> ModelList:
    """Base models (owned by "system") and the caller's fine-tuned models."""
    return ModelList(data=_all(tenant, store, settings))


@router.get("/{model:path}", response_model=Model)
def retrieve_model(model: str, tenant: TenantDep, store: StoreDep, settings: SettingsDep) -> Model:
    """One model by id."""
    for m in _all(tenant, store, settings):
        if m.id == model:
            return m
    raise not_found("model", model, param="model")

"""Models: the base models this server offers and the caller's fine-tuned results.

Fine-tuned models and their checkpoints are named like OpenAI's (`service.record.models`):
`ft:{base}:{org}:{suffix}:{job}` and `...:ckpt-step-N`. A name leads to its job, so one is
resolved with one lookup; only the owning tenant sees it (anyone else: 404, as for a name
that never existed).
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, BackgroundTasks

from service.api.deps import AdaptersDep, SettingsDep, StorageDep, StoreDep, TenantDep
from service.api.errors import APIError, bad_request, not_found
from service.api.lora_names import served_names
from service.api.schemas import Model, ModelDeleted, ModelList
from service.api.served_models import refuse_alias
from service.record.model_sources import resolve_fine_tuned, unfinished_dependents
from service.record.models import organization_id
from service.record.outputs import delete_outputs
from service.record.settings import Settings
from service.record.store import Store

log = logging.getLogger(__name__)
router = APIRouter(prefix="/models", tags=["models"])


def refuse_while_used(job_id: str, tenant: str, store: Store, what: str, param: str = "model") -> None:
    """A 409 naming the unfinished jobs that start from job `job_id`'s model or checkpoints:
    deleting `what` (that model, or its job) would take the adapter they need."""
    users = unfinished_dependents(job_id, tenant, store)
    if users:
        shown = ", ".join(users[:10]) + (f" and {len(users) - 10} more" if len(users) > 10 else "")
        raise APIError(
            409,
            f"{what} cannot be deleted while unfinished jobs start from it or its checkpoints: "
            f"{shown}; wait until they finish, or cancel them first",
            param=param,
            code="model_in_use",
            retry=False,
        )


def _all(tenant: str, store: Store, settings: Settings) -> list[Model]:
    out = [Model(id=name, created=0, owned_by="system") for name in settings.models]
    after: str | None = None
    while True:  # the tenant's succeeded jobs; a per-tenant model index would avoid this scan
        recs, more = store.list_jobs(tenant, after=after, limit=100)
        for rec in recs:
            if rec.status == "succeeded" and rec.fine_tuned_model:
                out.append(
                    Model(
                        id=rec.fine_tuned_model,
                        created=rec.finished_at or rec.created_at,
                        owned_by=organization_id(tenant),
                    )
                )
        if not more or not recs:
            return out
        after = recs[-1].id


@router.get("", response_model=ModelList)
def list_models(tenant: TenantDep, store: StoreDep, settings: SettingsDep) -> ModelList:
    """Base models (owned by "system") and the caller's fine-tuned models."""
    return ModelList(data=_all(tenant, store, settings))


@router.get("/{model:path}", response_model=Model)
def retrieve_model(model: str, tenant: TenantDep, store: StoreDep, settings: SettingsDep) -> Model:
    """One model by id: a base model, a fine-tuned model or one of its checkpoints."""
    if model in settings.models:
        return Model(id=model, created=0, owned_by="system")
    refuse_alias(model)
    found = resolve_fine_tuned(model, tenant, store)
    if found is None:
        raise not_found("model", model, param="model")
    rec, ck = found.job, found.checkpoint
    created = ck.created_at if ck is not None else rec.finished_at or rec.created_at
    return Model(id=model, created=created, owned_by=organization_id(tenant))


@router.delete("/{model:path}", response_model=ModelDeleted)
def delete_model(
    model: str,
    tenant: TenantDep,
    store: StoreDep,
    storage: StorageDep,
    settings: SettingsDep,
    adapters: AdaptersDep,
    background: BackgroundTasks,
) -> ModelDeleted:
    """Delete a fine-tuned model: its adapter, checkpoints and result files (freeing their
    storage quota). The job record stays, without a `fine_tuned_model`. Base models are the
    server's and cannot be deleted; a checkpoint goes with its model."""
    if model in settings.models:
        raise APIError(
            403,
            f"Model {model!r} is a base model offered by this server; only fine-tuned models can be deleted",
            param="model",
            code="model_not_deletable",
            retry=False,
        )
    refuse_alias(model)
    found = resolve_fine_tuned(model, tenant, store)
    if found is None:
        raise not_found("model", model, param="model")
    parsed, rec = found.name, found.job
    if parsed.step is not None:
        final = parsed.format().rsplit(":", 1)[0]
        raise bad_request(
            f"{model!r} is a checkpoint of job {rec.id}; delete the fine-tuned model {final!r} "
            "(which removes its checkpoints too) or the job",
            param="model",
            code="model_not_deletable",
        )
    refuse_while_used(rec.id, tenant, store, f"Model {model!r}")
    served = served_names(rec, store)
    delete_outputs(store, storage, rec)  # the job has succeeded, so its outputs can go
    store.forget_fine_tuned_model(rec.id, model)
    background.add_task(adapters.forget, served)
    log.info("model deleted", extra={"job_id": rec.id, "tenant": tenant})
    return ModelDeleted(id=model)

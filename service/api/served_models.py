"""What the `model` of a completion request stands for: a base model, or a base model and one of
the caller's adapters in storage, named for the inference process.

The caller's name is resolved for the caller's tenant only (`resolve_fine_tuned`), so another
tenant's model, a deleted one and an unknown name are the same 404 `model_not_found`, as
OpenAI answers. The inference process knows an adapter by a name of ours (`lora_name`): a hash
of the fine-tuned or checkpoint name, unique per job and checkpoint (and so per tenant), and
safe in any URL, path or log line; answers carry the caller's own name again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, cast

from service.api.errors import APIError
from service.api.routes.models import refuse_alias
from service.record.model_sources import resolve_fine_tuned
from service.record.settings import Settings
from service.record.store import Store

STORAGE_SCHEME = "seco-storage"
"""The inference contract's `lora_path` for a location in the service's storage."""


def lora_name_of(model: str) -> str:
    """The name the inference process knows a fine-tuned model's adapter by."""
    return "seco-" + hashlib.sha256(model.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class StoredAdapter:
    """An adapter in storage: an archive (a final model) or a directory prefix (a checkpoint)."""

    lora_name: str
    kind: Literal["archive", "dir"]
    key: str

    @property
    def storage_path(self) -> str:
        """`seco-storage:archive:<key>` or `seco-storage:dir:<prefix>`, which `seco serve` fetches."""
        return f"{STORAGE_SCHEME}:{self.kind}:{self.key}"


@dataclass(frozen=True)
class Target:
    """Where a request goes: `served` is the inference process's model name (a base model's
    registry name, or the adapter's lora_name); `model` the caller's, echoed in answers."""

    model: str
    base: str
    adapter: StoredAdapter | None

    @property
    def served(self) -> str:
        return self.adapter.lora_name if self.adapter is not None else self.base


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model {model!r} does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
        retry=False,
    )


def resolve_target(model: str, tenant: str, store: Store, settings: Settings) -> Target:
    """The target of `model` for `tenant`; a 404 `model_not_found` when it has none (a 400 for a
    checkpoint name spelled with leading zeros, as `/v1/models` answers)."""
    if model in settings.models:
        return Target(model=model, base=model, adapter=None)
    refuse_alias(model)
    found = resolve_fine_tuned(model, tenant, store)
    location = found.adapter_location(store) if found is not None else None
    if found is None or location is None or found.job.base_model not in settings.models:
        raise model_not_found(model)
    kind, key = location
    adapter = StoredAdapter(lora_name_of(model), cast(Literal["archive", "dir"], kind), key)
    return Target(model=model, base=found.job.base_model, adapter=adapter)

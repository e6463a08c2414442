"""The names the inference process knows adapters by (`lora_name`), one per fine-tuned model and
per checkpoint.

A hash of the fine-tuned or checkpoint name: unique per job and checkpoint (and so per
tenant), and safe in any URL, path or log line, where the `ft:` name holds colons and the
tenant's organization id. Used to serve a model (`service.api.served_models`) and to forget
what serving kept once a model or job is deleted (`service.api.adapters.Adapters.forget`).
"""

from __future__ import annotations

import hashlib

from service.record.models import checkpoint_model_name
from service.record.store import JobRecord, Store


def lora_name_of(model: str) -> str:
    """The name the inference process knows a fine-tuned model's (or checkpoint's) adapter by."""
    return "seco-" + hashlib.sha256(model.encode()).hexdigest()[:32]


def served_names(rec: JobRecord, store: Store) -> list[str]:
    """The lora_names a job's adapters may be served by: its fine-tuned model's and each of its
    checkpoints' on record (read before they are deleted, to forget them after)."""
    names = [rec.fine_tuned_model] if rec.fine_tuned_model else []
    for step in store.checkpoint_steps(rec.id):
        names.append(checkpoint_model_name(rec.base_model, rec.tenant, rec.suffix, rec.id, step))
    return [lora_name_of(name) for name in names]

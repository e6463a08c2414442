"""What a fine-tuned model name stands for: its job, its checkpoint, where its adapter is stored.

Used by the API (`/v1/models`, creating a job on top of a fine-tuned model) and by the
worker (fetching that adapter as the new job's starting point), so both resolve a name
the same way. A name resolves only for the tenant that owns it.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.record.models import ModelName, parse_model_name
from service.record.store import TERMINAL, Checkpoint, JobRecord, Store

ADAPTER_DIR = "adapter"
"""The PEFT adapter inside a checkpoint (worker/checkpoints.py writes it there)."""


@dataclass(frozen=True)
class FineTunedModel:
    name: ModelName
    job: JobRecord
    checkpoint: Checkpoint | None  # None: the job's final adapter

    def adapter_location(self, store: Store) -> tuple[str, str] | None:
        """("archive", key of the adapter .tar.gz) for a final model, ("dir", prefix of the PEFT files)
        for a checkpoint; None once the adapter is gone."""
        if self.checkpoint is not None:
            return "dir", f"{self.checkpoint.path}/{ADAPTER_DIR}"
        frec = store.get_file(self.job.adapter_file or "", self.job.tenant) if self.job.adapter_file else None
        return ("archive", frec.path) if frec is not None else None


def resolve_fine_tuned(name: str, tenant: str, store: Store) -> FineTunedModel | None:
    """The job (and, for a checkpoint name, the checkpoint) `name` stands for, when it exists and
    belongs to `tenant`; None otherwise.

    A final model exists while its job has succeeded and the model was not deleted; a
    checkpoint model while its checkpoint is kept (the newest SECO_KEEP_CHECKPOINTS are).
    """
    parsed = parse_model_name(name)
    if parsed is None or parsed.tenant != tenant:
        return None
    rec = store.get_job(parsed.job_id, tenant)
    if rec is None or rec.base_model != parsed.base or (rec.suffix or None) != parsed.suffix:
        return None
    if parsed.step is None:
        ok = rec.status == "succeeded" and rec.fine_tuned_model == name
        return FineTunedModel(parsed, rec, None) if ok else None
    ck = store.get_checkpoint(rec.id, parsed.step)
    return FineTunedModel(parsed, rec, ck) if ck is not None else None


def unfinished_dependents(job_id: str, tenant: str, store: Store) -> list[str]:
    """The unfinished jobs (validating, queued, running or paused) of `tenant` that start from
    the fine-tuned model of job `job_id` or one of its checkpoints, oldest first.

    Deleting that model (or its job) would take the adapter they start from: one not yet
    started, or restarted without a checkpoint of its own, could then only fail. A name
    resolves for its owner only, so only the owner's jobs can depend on it.
    """
    out: list[str] = []
    after: str | None = None
    while True:  # the tenant's jobs, newest first; a per-model index would avoid this scan
        recs, more = store.list_jobs(tenant, after=after, limit=100)
        for rec in recs:
            parsed = parse_model_name(rec.model) if rec.status not in TERMINAL else None
            if parsed is not None and parsed.job_id == job_id:
                out.append(rec.id)
        if not more or not recs:
            return out[::-1]
        after = recs[-1].id

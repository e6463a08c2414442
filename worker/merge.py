"""The merged model of a succeeded job: base weights with its adapter merged in, for tools that
take no adapters; the worker's task `seco.merge_adapter` (`service.record.queue.MERGE_TASK_NAME`).

The API records a build and queues it (`service.record.store.merges`); a worker builds it:
the base model (this worker's SECO_MODELS directory) and the job's adapter archive (from
storage) through peft, `merge_and_unload()`, `save_pretrained(safe_serialization=True)` with
the base's tokenizer, packed as one .tar.gz, a Hugging Face directory at its root. The
archive goes under the job's outputs (`keys.merged_key`, one name per build) and the quota
counts it from then on (`measure_outputs`), as it counts checkpoints.

Whatever happens, nothing half-written stays: an archive that would not fit the tenant's
storage quota is never published (the next request reports the quota); one whose build the
job no longer waits for (the job or its model deleted meanwhile, or the build abandoned and
started again) is deleted again. A failure is recorded for the next request to report.

The merge runs on the host's CPU, in the pool child like training (a fresh child per task,
so its memory goes back when it ends): the base in its own dtype, so the merged weights take
what the base's take, and the GPU stays free of a model nobody trains.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery.signals import worker_ready

from service.archives import safe_extract
from service.record import ids
from service.record.outputs import measure_outputs
from service.record.queue import MERGE_TASK_NAME
from service.record.settings import Settings, get_settings
from service.record.storage import Storage, keys, scratch_dir, sweep_scratch
from service.record.store import JobRecord, Store
from worker.celery_app import app
from worker.tasks import _scrub, process_storage, process_store, storage_failure

log = logging.getLogger(__name__)

MergeFn = Callable[[Path, Path, Path], Path]
"""(base model dir, adapter dir, output dir) -> the output dir, a Hugging Face model directory."""


class MergeFailed(Exception):
    """A build that cannot succeed as things stand; `code` is what the next request reports."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """Write the base model with the adapter merged into its weights to `out_dir` (safetensors
    and config, the base's tokenizer beside them): a directory `AutoModelForCausalLM` loads."""
    import torch  # the task module stays light: torch is imported in the pool child only
    from peft import PeftModel
    from transformers import AutoTokenizer

    from seco_core.loading import load_causal_lm

    with torch.no_grad():
        base = load_causal_lm(base_dir, dtype="auto")
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
        merged.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    return out_dir


def build_merged(settings: Settings, store: Store, job_id: str, token: str, *, merge: MergeFn | None = None) -> str:
    """Build job `job_id`'s merged model for build `token`; what happened ("ready", "failed",
    "stale" when the job no longer waits for this build, "discarded" when it stopped waiting
    while we built), for logs and tests. `merge` stands in for `merge_adapter` in tests."""
    if not store.merges.is_current(job_id, token):
        log.info("merge build no longer wanted", extra={"job_id": job_id})
        return "stale"
    rec = store.get_job(job_id)
    if rec is None:
        return "stale"
    storage = process_storage(settings)
    scratch = scratch_dir(settings, "merges", f"{job_id}.{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        archive = _build(rec, settings, store, storage, scratch, merge or merge_adapter)
        return _publish(rec, token, archive, settings, store, storage)
    except MergeFailed as e:
        log.info("merge failed: %s", e, extra={"job_id": job_id, "code": e.code})
        store.merges.settle_failed(job_id, token, e.code, str(e))
        return "failed"
    except Exception as e:
        log.exception("merge of job %s crashed", job_id, extra={"job_id": job_id})
        failure = storage_failure(e)
        if failure is not None:
            reason, remedy = failure
            code, message = (
                "storage_error",
                f"The worker could not build the merged model: {reason}. {remedy or storage.remedy}",
            )
        else:
            code, message = "merge_failed", _scrub(f"Merging the adapter failed: {type(e).__name__}: {e}", settings)
        store.merges.settle_failed(job_id, token, code, message.strip())
        return "failed"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _build(rec: JobRecord, settings: Settings, store: Store, storage: Storage, scratch: Path, merge: MergeFn) -> Path:
    """Fetch the adapter, merge it into the base, pack the result: the archive in `scratch`."""
    base_dir = settings.models.get(rec.base_model)
    if base_dir is None:
        raise MergeFailed(
            f"Base model {rec.base_model!r} is not configured on this worker (SECO_MODELS)", "model_not_available"
        )
    frec = store.get_file(rec.adapter_file or "", rec.tenant)
    if frec is None:
        raise MergeFailed(f"The adapter of job {rec.id} was deleted", "model_not_available")
    adapter = scratch / "adapter"
    safe_extract(storage.fetch(frec.path, scratch / "adapter.tar.gz"), adapter)
    out = merge(base_dir, adapter, scratch / "merged")
    from seco_core.lora import pack_files  # torch: in the pool child only

    names = sorted(p.name for p in out.iterdir() if p.is_file())
    return pack_files(out, names, scratch / keys.MERGED_NAME)


def _publish(rec: JobRecord, token: str, archive: Path, settings: Settings, store: Store, storage: Storage) -> str:
    """Store the archive if the quota holds it and record it; undone if the job stopped waiting."""
    size = archive.stat().st_size
    used = store.tenant_storage_bytes(rec.tenant)
    if used + size > settings.max_file_bytes:
        raise MergeFailed(
            f"The merged model ({size} bytes) does not fit the storage quota of {settings.max_file_bytes} "
            f"bytes for this API key ({used} bytes used by files and job outputs); delete files or finished "
            "jobs first",
            "quota_exceeded",
        )
    key = keys.merged_key(rec.tenant, rec.id, token)
    storage.put_file(key, archive, move=True)
    measure_outputs(store, storage, rec.tenant, rec.id)  # the quota counts it from now on
    if store.merges.settle_ready(rec.id, token, size):
        store.add_event(rec.id, f"Merged model built ({size} bytes); GET .../merged downloads it")
        log.info("merged model built", extra={"job_id": rec.id, "bytes": size})
        return "ready"
    storage.delete(key)  # the job or its model was deleted meanwhile, or this build was superseded
    measure_outputs(store, storage, rec.tenant, rec.id)
    return "discarded"


def _merge_task(job_id: str, token: str) -> str:
    """Celery entry point (`service.record.queue.publish_merge`)."""
    if not ids.is_job_id(job_id) or not keys.BUILD_RE.match(token):
        log.error("refusing a merge task with malformed arguments %r, %r", job_id, token)
        return "invalid"
    settings = get_settings()
    return build_merged(settings, process_store(settings), job_id, token)


merge_task = app.task(name=MERGE_TASK_NAME, acks_late=True, reject_on_worker_lost=True, ignore_result=True)(_merge_task)


@worker_ready.connect
def _sweep_merges(**_: Any) -> None:
    """What merges of worker processes killed on this host left in their scratch space."""
    for path in sweep_scratch(get_settings(), "merges"):
        log.info("removed the scratch space of a dead merge", extra={"path": path.name})

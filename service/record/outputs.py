"""A job's outputs: what its checkpoints, adapter and metrics take in storage, and deleting them.

Outputs live under the job's prefix (`keys.job_prefix`) and count against the tenant's
storage quota next to its uploads (SECO_MAX_FILE_BYTES). A worker measures the prefix after
each checkpoint it publishes (and prunes) and after the results; the store keeps the
measured size per job and the total per tenant. Measuring the prefix, rather than adding
up what each step wrote, keeps the count right after a retry, a resume on another host or
a worker killed between writing and recording.
"""

from __future__ import annotations

from service.record.storage import Storage, keys
from service.record.store import TERMINAL, JobRecord, Store


class JobNotFinished(Exception):
    """Outputs are deleted only once a job has ended (its worker may still be writing them)."""


def measure_outputs(store: Store, storage: Storage, tenant: str, job_id: str) -> int:
    """Measure the job's outputs in storage and record the size; returns it."""
    size = storage.size_under(keys.job_prefix(tenant, job_id))
    store.set_output_bytes(job_id, tenant, size)
    return size


def delete_outputs(store: Store, storage: Storage, rec: JobRecord) -> int:
    """Delete a finished job's checkpoints, adapter and metrics: records, objects and quota.

    The records go first (in one step: nothing is served half-deleted), then the objects
    under the job's prefix, then the measured size (zero) is recorded. Safe to repeat after
    a storage failure part-way. Returns the bytes freed; JobNotFinished for a job that has
    not ended.
    """
    status = store.forget_outputs(rec)
    if status not in TERMINAL:
        raise JobNotFinished(status)
    before = storage.size_under(keys.job_prefix(rec.tenant, rec.id))
    storage.delete_under(keys.job_prefix(rec.tenant, rec.id))
    return before - measure_outputs(store, storage, rec.tenant, rec.id)

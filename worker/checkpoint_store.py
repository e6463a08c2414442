"""Checkpoints between a worker's local scratch space and storage.

The training loop writes each checkpoint into the job's scratch directory
(`worker/checkpoints.py`); this module publishes it to storage under
`tenants/<t>/jobs/<id>/checkpoints/step-NNNNNN/` with its marker object
(`checkpoint.json`) last, together with the metrics CSV up to that step. A worker
killed mid-upload leaves objects without a marker, which nothing trusts; a resume, on
any host, fetches the newest checkpoint whose marker exists into its own scratch space.

Torch-free, so the Celery task module that uses it stays light to import.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from service.record.storage import ObjectNotFound, Storage, keys

MARKER = "checkpoint.json"
"""Written last by `save_checkpoint` and published last: its presence means "complete"."""
METRICS_CSV = "metrics.csv"
CHECKPOINTS_DIR = "checkpoints"


def publish_checkpoint(storage: Storage, tenant: str, job_id: str, ckpt_dir: Path, metrics_csv: Path) -> str:
    """Publish `ckpt_dir` (consumed: scratch keeps only what is being written); returns its prefix."""
    if metrics_csv.is_file():  # the CSV as of this step, so a resume elsewhere continues it
        shutil.copyfile(metrics_csv, ckpt_dir / METRICS_CSV)
    prefix = f"{keys.checkpoints_prefix(tenant, job_id)}/{ckpt_dir.name}"
    storage.put_dir(prefix, ckpt_dir, MARKER, move=True)
    return prefix


def prune_checkpoints(storage: Storage, tenant: str, job_id: str, keep: int) -> list[int]:
    """Delete all but the newest `keep` complete checkpoints, and unfinished uploads older than
    the newest one (left by a worker killed mid-upload); returns the steps of those deleted.

    Only ever called after a newer checkpoint is complete, so a resume always finds one.
    """
    prefix = keys.checkpoints_prefix(tenant, job_id)
    complete = storage.complete_dirs(prefix, MARKER)
    if not complete:
        return []
    everything = {o.key[len(prefix) + 1 :].partition("/")[0] for o in storage.list_under(prefix)}
    stale = set(complete[:-keep]) | {n for n in everything - set(complete) if n < complete[-1]}
    for name in sorted(stale):
        storage.delete_under(f"{prefix}/{name}")
    return sorted(int(name.rsplit("-", 1)[1]) for name in stale)


def restore_latest_checkpoint(storage: Storage, tenant: str, job_id: str, output_dir: Path) -> int | None:
    """Fetch the newest complete checkpoint into `output_dir/checkpoints/` and its metrics CSV
    to `output_dir/metrics.csv`; returns its step, or None when there is none."""
    prefix = keys.checkpoints_prefix(tenant, job_id)
    names: list[str] = storage.complete_dirs(prefix, MARKER)
    for name in reversed(names):
        try:
            local = storage.fetch_dir(f"{prefix}/{name}", output_dir / CHECKPOINTS_DIR / name)
        except ObjectNotFound:  # deleted meanwhile (job being deleted): try an older one
            continue
        if (local / METRICS_CSV).is_file():
            shutil.copyfile(local / METRICS_CSV, output_dir / METRICS_CSV)
        return int(name.rsplit("-", 1)[1])
    return None

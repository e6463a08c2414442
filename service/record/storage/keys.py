"""Where every object lives: keys built from validated ids only, prefixed by tenant.

Layout (the same for the local directory and the object store)::

    tenants/<tenant>/files/<file_id>                          an uploaded training file
    tenants/<tenant>/jobs/<job_id>/checkpoints/step-NNNNNN/    one checkpoint (marker object last)
    tenants/<tenant>/jobs/<job_id>/adapter.tar.gz              the trained adapter (a result file)
    tenants/<tenant>/jobs/<job_id>/metrics.csv                 per-step metrics (a result file)
    tenants/<tenant>/jobs/<job_id>/merged-<build>.tar.gz       the base with the adapter merged (built on request)

A tenant id is the 16 hex digits `tenants.tenant_of` derives from an API key; file and
job ids match `service.record.ids`. Nothing a user sends ever becomes part of a key, so
one tenant's keys can never reach into another's, and a bucket policy or lifecycle rule
can be written per tenant (`tenants/<tenant>/`) or per job.

Records in Redis hold these keys (relative to the data dir or the bucket prefix), so
moving a deployment between back-ends is a copy of the tree, nothing in Redis changes.
"""

from __future__ import annotations

import re

from service.record.ids import is_file_id, is_job_id

TENANT_RE = re.compile(r"^[0-9a-f]{16}$")
SEGMENT_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}$")
"""One path segment of a key: no separators, no leading dot (hidden names are temporaries)."""

CHECKPOINTS = "checkpoints"
RESULT_NAMES = ("adapter.tar.gz", "metrics.csv")
MERGED_NAME = "merged.tar.gz"
BUILD_RE = re.compile(r"^[0-9a-f]{8,64}$")


def check_key(key: str) -> str:
    """`key` if it is a relative, normalised key made of plain segments; ValueError otherwise."""
    parts = key.split("/")
    if not key or not all(SEGMENT_RE.match(p) and p not in (".", "..") for p in parts):
        raise ValueError(f"not a storage key: {key!r}")
    return key


def tenant_prefix(tenant: str) -> str:
    if not TENANT_RE.match(tenant):
        raise ValueError(f"not a tenant id: {tenant!r}")
    return f"tenants/{tenant}"


def file_key(tenant: str, file_id: str) -> str:
    if not is_file_id(file_id):
        raise ValueError(f"not a file id: {file_id!r}")
    return f"{tenant_prefix(tenant)}/files/{file_id}"


def job_prefix(tenant: str, job_id: str) -> str:
    """Everything a job wrote; `Storage.delete_under` / `size_under` take it whole."""
    if not is_job_id(job_id):
        raise ValueError(f"not a job id: {job_id!r}")
    return f"{tenant_prefix(tenant)}/jobs/{job_id}"


def checkpoints_prefix(tenant: str, job_id: str) -> str:
    return f"{job_prefix(tenant, job_id)}/{CHECKPOINTS}"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def result_key(tenant: str, job_id: str, name: str) -> str:
    if name not in RESULT_NAMES:
        raise ValueError(f"not a result file name: {name!r}")
    return f"{job_prefix(tenant, job_id)}/{name}"


def merged_key(tenant: str, job_id: str, build: str) -> str:
    """The job's merged model of build `build` (`service.record.store.merges`): under the job's
    prefix, so the quota counts it and deleting the job's outputs deletes it; one name per
    build, so a late build that cleans up after itself never removes a newer one's archive."""
    if not BUILD_RE.match(build):
        raise ValueError(f"not a merge build token: {build!r}")
    return f"{job_prefix(tenant, job_id)}/merged-{build}.tar.gz"

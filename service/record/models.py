"""Names of fine-tuned models, shaped like OpenAI's, and parsing them back.

A job's result is called ``ft:{base}:{org}:{suffix}:{job}`` (the suffix part is empty when
the job had none, as OpenAI writes ``ft:gpt-4o-mini:my-org::abc123``) and each of its
checkpoints ``ft:{base}:{org}:{suffix}:{job}:ckpt-step-{N}``. ``{org}`` is the owner's
organization id as the job object shows it (``org-<tenant id>``); ``{job}`` is the hex part
of the job id, so a name leads back to its job with one lookup. The API (``/v1/models``,
job creation) and the worker (which adapter a job starts from) both parse names here, so
the two can never disagree on what a name means.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from service.record import ids

PREFIX = "ft"
JOB_ID_PREFIX = "ftjob-"
_JOB_HEX_RE = re.compile(r"^[0-9a-f]{24}$")
_CKPT_RE = re.compile(r"^ckpt-step-(0|[1-9][0-9]{0,8})$")
"""The one spelling of a checkpoint step: decimal without leading zeros, as the name is written."""
_CKPT_ANY_RE = re.compile(r"^ckpt-step-([0-9]{1,9})$")
_ORG_RE = re.compile(r"^org-[0-9a-f]{16}$")


def organization_id(tenant: str) -> str:
    """The organization id the job and model objects show for a tenant."""
    return f"org-{tenant}"


def fine_tuned_model_name(base: str, tenant: str, suffix: str | None, job_id: str) -> str:
    """The name of a job's final adapter."""
    return f"{PREFIX}:{base}:{organization_id(tenant)}:{suffix or ''}:{job_id.removeprefix(JOB_ID_PREFIX)}"


def checkpoint_model_name(base: str, tenant: str, suffix: str | None, job_id: str, step: int) -> str:
    """The name of the adapter saved at a job's checkpoint after `step` optimizer steps."""
    return f"{fine_tuned_model_name(base, tenant, suffix, job_id)}:ckpt-step-{step}"


@dataclass(frozen=True)
class ModelName:
    """A parsed fine-tuned model name: whose job, which base, and which checkpoint (None: the final adapter)."""

    base: str
    org: str
    suffix: str | None
    job_id: str
    step: int | None = None

    @property
    def tenant(self) -> str:
        return self.org.removeprefix("org-")

    def format(self) -> str:
        if self.step is None:
            return fine_tuned_model_name(self.base, self.tenant, self.suffix, self.job_id)
        return checkpoint_model_name(self.base, self.tenant, self.suffix, self.job_id, self.step)


def parse_model_name(name: str) -> ModelName | None:
    """The parts of a fine-tuned or checkpoint model name; None when `name` is not one."""
    parts = name.split(":")
    if len(parts) < 5 or parts[0] != PREFIX:
        return None
    step: int | None = None
    m = _CKPT_RE.match(parts[-1])
    if m is not None:
        step = int(m.group(1))
        parts = parts[:-1]
        if len(parts) < 5:
            return None
    base, org, suffix, job_hex = ":".join(parts[1:-3]), parts[-3], parts[-2], parts[-1]
    if not base or not _ORG_RE.match(org) or not _JOB_HEX_RE.match(job_hex):
        return None
    job_id = JOB_ID_PREFIX + job_hex
    if not ids.is_job_id(job_id):
        return None
    return ModelName(base=base, org=org, suffix=suffix or None, job_id=job_id, step=step)


def canonical_spelling(name: str) -> str | None:
    """The one spelling of `name` when it is a checkpoint name written another way (a step with
    leading zeros, `ckpt-step-0045`); None when `name` is written canonically or is no such name.

    `parse_model_name` does not read such a name (every model has one name, so a name can
    be compared, cached and listed as a string); callers answer it with a 400 naming this.
    """
    head, sep, last = name.rpartition(":")
    m = _CKPT_ANY_RE.match(last)
    if not sep or m is None or _CKPT_RE.match(last) is not None:
        return None
    canonical = f"{head}:ckpt-step-{int(m.group(1))}"
    return canonical if parse_model_name(canonical) is not None else None

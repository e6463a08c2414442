"""A succeeded job's merged model: the base weights with its adapter merged in, built on request.

The API cannot build one (it imports no torch), so the first request records a build and
queues it for a worker (`service.record.queue.publish_merge`); the worker writes the archive
under the job's outputs and records the outcome. The state is one JSON field of the job's
hash (`merged`), changed only by two scripts: `merge_request.lua` (the API: serve, wait, or
start a build, atomically, so racing requests start one) and `merge_settle.lua` (the worker:
the outcome, recorded only if its build is still the one the job waits for). Deleting the
job's outputs drops the field with them (`forget_outputs.lua`).

Each build has a token: a build that ran too long is abandoned and started again, and the
late one's outcome (and what it wrote) must not replace the new one's.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Literal, cast

from pydantic import BaseModel

from service.record import redis_keys as K
from service.record.records import dumps, now
from service.record.store.connection import Connection

MERGED_FIELD = "merged"
ABANDON_SECONDS = 6 * 3600
"""A build not settled after this long is taken for lost (its worker died with the message, or
Redis lost it) and the next request starts another. Long, because a merge message waits behind
the training job a busy worker runs, and a worker that dies mid-merge gets its message back."""


class MergedState(BaseModel):
    """The merged model's state on its job: being built, ready (its archive's bytes), or failed (why)."""

    status: Literal["building", "ready", "failed"]
    since: int
    token: str
    bytes: int | None = None
    error: dict[str, Any] | None = None


def merged_state(raw: str | None) -> MergedState | None:
    """The state of a job hash's `merged` field (None when there is none)."""
    return MergedState.model_validate_json(raw) if raw else None


@dataclass(frozen=True)
class MergeRequest:
    """What `Merges.request` found: the job's status, the merged model's state after the request,
    whether the caller must queue the build it recorded, and whether the adapter is gone."""

    job_status: str
    state: MergedState | None
    build: bool = False
    no_adapter: bool = False


class Merges:
    """The merged-model state of jobs (see the module docstring)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.r = conn.r

    def get(self, job_id: str) -> MergedState | None:
        return merged_state(cast(str | None, self.r.hget(K.job(job_id), MERGED_FIELD)))

    def request(self, job_id: str, *, abandon_seconds: int = ABANDON_SECONDS) -> MergeRequest:
        """Serve, wait for, or start the job's merged model, atomically; `build` says the caller must
        queue the build recorded here (`state.token` names it). A failed state is returned once
        and forgotten, so the next request builds again."""
        token = secrets.token_hex(8)
        status, raw, action = cast(
            list[str], self.conn.script("merge_request")(keys=[K.job(job_id)], args=[now(), abandon_seconds, token])
        )
        return MergeRequest(str(status), merged_state(raw), build=action == "build", no_adapter=action == "no_adapter")

    def is_current(self, job_id: str, token: str) -> bool:
        """Whether build `token` is still the one the job waits for (a worker checks before it starts)."""
        state = self.get(job_id)
        return state is not None and state.status == "building" and state.token == token

    def settle_ready(self, job_id: str, token: str, size: int) -> bool:
        """Build `token` stored an archive of `size` bytes; False when the job no longer waits for it."""
        return self._settle(job_id, token, {"status": "ready", "since": now(), "token": token, "bytes": size})

    def settle_failed(self, job_id: str, token: str, code: str, message: str) -> bool:
        """Build `token` failed; the next request reports `message` (and the one after builds again)."""
        error = {"code": code, "message": message, "param": None}
        return self._settle(job_id, token, {"status": "failed", "since": now(), "token": token, "error": error})

    def forget(self, job_id: str, token: str) -> bool:
        """Drop the state of build `token` (it could not be queued, or its archive is gone)."""
        return bool(self.conn.script("merge_settle")(keys=[K.job(job_id)], args=[token, ""]))

    def _settle(self, job_id: str, token: str, state: dict[str, Any]) -> bool:
        MergedState.model_validate(state)  # what is stored is what `get` reads back
        return bool(self.conn.script("merge_settle")(keys=[K.job(job_id)], args=[token, dumps(state)]))

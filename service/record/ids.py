"""Object ids shaped like OpenAI's, and the regexes that gate every lookup.

An id is checked against its pattern before it is used in a Redis key or a file path,
so `../etc/passwd` or `file-x/../../y` can only ever be a 404.
"""

from __future__ import annotations

import hashlib
import re
import secrets

FILE_RE = re.compile(r"^file-[0-9a-f]{24}$")
JOB_RE = re.compile(r"^ftjob-[0-9a-f]{24}$")
EVENT_RE = re.compile(r"^ftevent-([0-9]{1,20})-([0-9]{1,20})$")
CHECKPOINT_RE = re.compile(r"^ftckpt-[0-9a-f]{24}$")
STREAM_ID_RE = re.compile(r"^([0-9]{1,20})-([0-9]{1,20})$")
STREAM_ID_MAX = 2**64 - 1
"""Both halves of a Redis Stream id are unsigned 64-bit integers; Redis refuses anything larger."""
MIN_STREAM_ID = "0-0"
MAX_STREAM_ID = f"{STREAM_ID_MAX}-{STREAM_ID_MAX}"


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def new_job_id() -> str:
    return "ftjob-" + secrets.token_hex(12)


def result_file_id(job_id: str, kind: str) -> str:
    """Deterministic, so a job that finishes twice (after a redelivery) registers one file."""
    return "file-" + hashlib.sha256(f"{job_id}:{kind}".encode()).hexdigest()[:24]


def checkpoint_id(job_id: str, step: int) -> str:
    """Deterministic per (job, step): a checkpoint re-saved after a resume replaces its entry."""
    return "ftckpt-" + hashlib.sha256(f"{job_id}:{step}".encode()).hexdigest()[:24]


def event_id(stream_id: str) -> str:
    """The public event id is the Redis Stream entry id, so it also orders events."""
    return "ftevent-" + stream_id


def stream_id_of(value: str) -> str | None:
    """Accept an `ftevent-...` id or a raw stream id (SSE Last-Event-ID); None if neither.

    Range-checked, not only pattern-checked: twenty digits can exceed 2^64 - 1, which
    Redis refuses with an error, so such an id is as invalid as a malformed one.
    """
    m = EVENT_RE.match(value) or STREAM_ID_RE.match(value)
    if m is None:
        return None
    ms, seq = int(m.group(1)), int(m.group(2))
    if ms > STREAM_ID_MAX or seq > STREAM_ID_MAX:
        return None
    return f"{ms}-{seq}"  # normalised: "007-1" and "7-1" are the same entry


def is_file_id(value: str) -> bool:
    return bool(FILE_RE.match(value))


def is_job_id(value: str) -> bool:
    return bool(JOB_RE.match(value))

"""Concurrent uploads of one API process: at most a few per key, and a few in all.

Validating an upload reads each JSONL line whole and parses it (a long document is one
line of up to SECO_MAX_LINE_BYTES), which holds about three times the line in memory
while it runs: four parallel uploads of a 60 MB line took the API to 781 MiB. Holding a
slot for the whole upload bounds what uploads can take to SECO_MAX_UPLOADS of them at
once, whoever sends them, and one key to SECO_MAX_UPLOADS_PER_KEY of those, so one key
cannot take every slot. A request past either limit is refused before its body is read,
with Retry-After: a 429 for the key's own limit, a 503 when the process is full.

The counts live in the process (the event loop runs one handler at a time between
awaits, so taking and giving back a slot needs no lock) and are given back however the
upload ends; `seco api --workers N` multiplies both limits by N.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from service.api.errors import APIError
from service.api.uploads import UNREAD_BODY

RETRY_AFTER_SECONDS = 5
"""What a refused upload is told to wait: about what a large upload takes to validate."""


class UploadSlots:
    """The upload slots of one API process (one per app)."""

    def __init__(self, per_key: int, per_process: int) -> None:
        self.per_key = per_key
        self.per_process = per_process
        self.held: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.held.values())

    @contextmanager
    def hold(self, tenant: str) -> Iterator[None]:
        """A slot for one upload of `tenant` while the block runs; APIError 429/503 when none is free."""
        headers = {**UNREAD_BODY, "retry-after": str(RETRY_AFTER_SECONDS)}
        if self.held[tenant] >= self.per_key:
            raise APIError(
                429,
                f"This API key already has {self.per_key} uploads in progress (the limit, "
                "SECO_MAX_UPLOADS_PER_KEY); retry when one has finished",
                code="too_many_uploads",
                headers=headers,
            )
        if self.total >= self.per_process:
            raise APIError(
                503,
                f"The server is receiving {self.per_process} uploads already (the limit, "
                "SECO_MAX_UPLOADS); retry shortly",
                type="server_error",
                code="server_busy",
                headers=headers,
            )
        self.held[tenant] += 1
        try:
            yield
        finally:
            self.held[tenant] -= 1
            if not self.held[tenant]:
                del self.held[tenant]

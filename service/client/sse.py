"""Following a job's Server-Sent Events stream, resuming after dropped connections.

The API's stream (`GET /v1/fine_tuning/jobs/{id}/events/stream`) tags each event with
`id:` (its Redis Stream id) and resumes after the `Last-Event-ID` header. Following it
"without losing or repeating events" therefore needs exactly what browsers' EventSource
does: remember the id of the last *dispatched* event (never that of a half-received
one), and send it when reconnecting. Stdlib + httpx only (the CLI's import budget).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from service.client.http import ClientError, raise_for_status


@dataclass(frozen=True)
class SSEMessage:
    event: str
    """"message" unless the server named it (`event: end` closes a finished job's stream)."""
    data: str
    id: str | None
    """The last event id once this message was dispatched (what a reconnect resumes after)."""


class SSEParser:
    """Line-by-line parser for text/event-stream (the WHATWG rules for id, event, data, retry)."""

    def __init__(self, last_id: str | None = None) -> None:
        self.last_id = last_id
        self.retry_ms: int | None = None
        self._id_buffer = last_id
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> SSEMessage | None:
        """Take one line (without its end-of-line); a blank line dispatches the pending message."""
        if line == "":
            return self._dispatch()
        if line.startswith(":"):  # a comment (the server's keep-alive)
            return None
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id" and "\0" not in value:
            self._id_buffer = value
        elif field == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None

    def drop_partial(self) -> None:
        """The connection broke: forget a half-received message, keep the last dispatched id."""
        self._data, self._event, self._id_buffer = [], "", self.last_id

    def _dispatch(self) -> SSEMessage | None:
        self.last_id = self._id_buffer
        data, event = self._data, self._event or "message"
        self._data, self._event = [], ""
        if not data:
            return None
        return SSEMessage(event=event, data="\n".join(data), id=self.last_id)


class StreamSource(Protocol):
    url: str

    def open_stream(self, job_id: str, last_event_id: str | None) -> Any: ...


# Called before each reconnect with (why the connection ended, seconds until the retry).
OnReconnect = Callable[[str, float], None]


def follow_events(
    client: StreamSource,
    job_id: str,
    *,
    last_event_id: str | None = None,
    max_failures: int = 12,
    on_reconnect: OnReconnect | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield `("event", job_event)` for every event after `last_event_id`, then `("end", {"status"})`.

    A connection that drops after delivering events is resumed at once; one that fails
    without delivering anything is retried after the server's `retry:` delay (growing,
    capped at 10 s), and `max_failures` such failures in a row raise `ClientError`. An
    error status (a 404, a bad key) is raised at once: retrying cannot fix it.
    """
    parser = SSEParser(last_event_id)
    failures = 0
    connected = False
    while True:
        delivered = False
        try:
            with client.open_stream(job_id, parser.last_id) as resp:
                if resp.status_code >= 500:
                    resp.read()
                    reason = f"HTTP {resp.status_code}"
                else:
                    if not resp.is_success:
                        resp.read()
                        raise_for_status(resp)
                    connected = True
                    for line in resp.iter_lines():
                        msg = parser.feed(line)
                        if msg is None:
                            continue
                        delivered = True
                        failures = 0
                        try:
                            data = json.loads(msg.data)
                        except ValueError:
                            raise ClientError(f"malformed event from the server: {msg.data[:200]!r}") from None
                        if msg.event == "end":
                            yield "end", data
                            return
                        if msg.event == "message":
                            yield "event", data
                    reason = "the server closed the stream"
        except httpx.TransportError as e:
            if not connected:  # never reached it: say so now rather than retry for minutes
                raise ClientError(
                    f"cannot reach the seco server at {client.url} ({type(e).__name__}: {e}); "
                    "is it running? (set SECO_URL or pass --url)"
                ) from None
            reason = f"connection lost ({type(e).__name__})"
        parser.drop_partial()
        if not delivered:
            failures += 1
            if failures > max_failures:
                raise ClientError(f"lost the event stream of {job_id} and could not resume it: {reason}")
        delay = 0.0 if delivered else min((parser.retry_ms or 2000) / 1000 * failures, 10.0)
        if on_reconnect is not None:
            on_reconnect(reason, delay)
        sleep(delay)

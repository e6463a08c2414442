"""Responses of the hot read routes, serialised once.

A route that returns a pydantic model under `response_model` has FastAPI dump it, validate
the dump against the model again and dump that: three passes over every job of a list.
These routes build their model once (with the same mapping functions as every other route)
and answer pydantic's own JSON of it: the same object, fields and values FastAPI sent
(non-finite floats as null, as before; a float below 1e-4 may be written in the other
notation, 0.00001 for 1e-05), serialised in Rust rather than dumped to Python objects and
encoded again. `response_model` stays on the routes for the OpenAPI schema.

Events are the exception, because a page holds many and a stream replays hundreds: the
public event object (OpenAI's `fine_tuning.job.event`, `schemas.JobEvent`) is written
straight from its stream entry by `event_json`, its `data` copied as stored (the store wrote
it with `json.dumps`), except that NaN and infinities, which the store's JSON keeps but JSON
has no word for, become null. The event list and the event stream both use it.
"""

from __future__ import annotations

import json

from pydantic import BaseModel
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.record.reads import Entry

EVENTS_PER_WRITE = 8
"""Events per write of an event stream (see `sse_writes`)."""

_encode_str = json.JSONEncoder(ensure_ascii=False).encode
_decode_finite = json.JSONDecoder(parse_constant=lambda _: None).decode
_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


def json_response(model: BaseModel) -> Response:
    """`model`'s JSON, as a route with a `response_model` of its own class would answer it."""
    return Response(model.model_dump_json(), media_type="application/json")


def _data_json(raw: str | None) -> str:
    """An event's `data`, stored as JSON text by the store, as JSON without NaN or infinities."""
    if not raw:
        return "null"
    if "NaN" in raw or "Infinity" in raw:  # maybe a non-finite number (or only a string saying so)
        return _encode(_decode_finite(raw))
    return raw


def event_json(entry: Entry) -> str:
    """The public event object of a stream entry, as JSON text (`schemas.JobEvent`)."""
    sid, f = entry
    return (
        f'{{"id":"ftevent-{sid}","object":"fine_tuning.job.event","created_at":{int(f.get("created_at") or 0)},'
        f'"level":{_encode_str(f.get("level", "info"))},"message":{_encode_str(f.get("message", ""))},'
        f'"type":{_encode_str(f.get("type", "message"))},"data":{_data_json(f.get("data"))}}}'
    )


def list_response(items: list[str], has_more: bool) -> Response:
    """A page of objects already written as JSON (`schemas.JobList`, `schemas.EventList`)."""
    body = '{"object":"list","data":[' + ",".join(items) + '],"has_more":'
    return Response(body + ("true}" if has_more else "false}"), media_type="application/json")


def event_list_response(entries: list[Entry], has_more: bool) -> Response:
    """A page of events (`schemas.EventList`)."""
    return list_response([event_json(e) for e in entries], has_more)


def sse_writes(entries: list[Entry]) -> list[str]:
    """Server-Sent Events frames for a batch of entries (`id:` the stream id, `data:` the event),
    `EVENTS_PER_WRITE` to a write: a client whose connection is cut keeps the writes that arrived
    whole (a browser drops a torn chunk of a chunked response, so one big write would leave it
    nothing and it would resume from where it was, again and again)."""
    frames = [f"id: {entry[0]}\ndata: {event_json(entry)}\n\n" for entry in entries]
    return ["".join(frames[i : i + EVENTS_PER_WRITE]) for i in range(0, len(frames), EVENTS_PER_WRITE)]


def sse_end(status: str) -> str:
    """The frame that ends a finished job's stream."""
    return f"event: end\ndata: {json.dumps({'status': status})}\n\n"


class EventReplay(Response):
    """A finished job's whole event stream, known at once: sent as `writes` (chunked, like a live
    stream, so a cut connection keeps what arrived whole) without a streaming response's
    machinery (a task watching for the client's disconnect, a generator)."""

    def __init__(self, writes: list[str], headers: dict[str, str]) -> None:
        super().__init__(None, media_type="text/event-stream", headers=headers)
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.writes = writes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        last = len(self.writes) - 1
        for i, chunk in enumerate(self.writes):
            await send({"type": "http.response.body", "body": chunk.encode(), "more_body": i < last})

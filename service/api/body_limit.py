"""A byte limit on request bodies, enforced while they are read, before anything parses them.

Without it a JSON body is read whole and then parsed: a 24 MB `POST /v1/fine_tuning/jobs`
made the API hold over a GiB and stall every other request before ending in a 400. Here
a declared `Content-Length` over the limit is refused before the body is read, and a
chunked body is cut off as soon as it passes the limit, so no request costs more than the
limit in memory. Uploads (`POST /v1/files`) are exempt: they stream to disk under their
own, larger limit (`service.api.uploads`).
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import NO_RETRY, error_response

TOO_LARGE_CODE = "request_too_large"


class BodyTooLarge(HTTPException):
    """Raised from `receive` once the body passes the limit; FastAPI lets an HTTPException
    raised while it reads a body pass through, so the app's handler answers it."""

    def __init__(self, limit: int) -> None:
        # close the connection: kept alive, the server would go on reading the rest of the body
        headers = {**NO_RETRY, "connection": "close"}
        super().__init__(413, f"The request body is larger than the limit of {limit} bytes", headers)


class BodyLimit:
    """Pure ASGI middleware: `max_bytes` for every request body except the `exempt` (method, path)s."""

    def __init__(self, app: ASGIApp, max_bytes: int, exempt: frozenset[tuple[str, str]] = frozenset()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in self.exempt:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _refuse(self.max_bytes, scope, receive, send)
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:  # read by something that does not turn it into a response itself
            if started:
                raise
            await _refuse(self.max_bytes, scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def _refuse(limit: int, scope: Scope, receive: Receive, send: Send) -> None:
    exc = BodyTooLarge(limit)
    response = error_response(
        413, str(exc.detail), "invalid_request_error", None, TOO_LARGE_CODE, dict(exc.headers or {})
    )
    await response(scope, receive, send)

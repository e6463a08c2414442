"""Unhandled exceptions answered as a 500 without breaking the client's connection.

Starlette's outermost middleware answers an unhandled exception with the app's 500
handler and then raises it again, for the server to log; uvicorn, seeing an exception
after the response, closes the connection, so the client's next request on that
keep-alive connection is reset. This middleware, inside that one, answers the 500 itself
(OpenAI's error body) and does not re-raise: the exception is logged here once, and the
connection serves the next request. Only an exception raised after the response has
started still ends the connection: the response cannot be completed.
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_response
from service.api.metrics import route_label

log = logging.getLogger(__name__)


class UnhandledErrors:
    """Pure ASGI middleware: an exception before the response starts becomes a complete 500."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def _send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, _send)
        except Exception:
            if started:
                raise
            log.exception("unhandled error", extra={"method": scope.get("method"), "route": route_label(scope)})
            response = error_response(500, "Internal server error", "server_error", None, "internal_error")
            await response(scope, receive, send)

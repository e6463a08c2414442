"""Bearer-key authentication for /v1, as a pure ASGI middleware.

A middleware (not only a dependency) so that the key is checked before anything else
looks at the request: an unauthenticated caller gets a 401 even when its body is
malformed, and learns nothing about which ids exist. Keys are compared in constant
time against every configured key, and never logged.

A key's tenant id derives from a secret kept in Redis (`service.record.tenants`), read
when the API starts or, if Redis is down then, as soon as it answers: until then a valid
key gets a 503 like any request that needs Redis.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send


def match_key(presented: str, keys: dict[str, str]) -> str | None:
    """The tenant of `presented`, comparing with every key so timing reveals nothing."""
    found: str | None = None
    for key, tenant in keys.items():
        if hmac.compare_digest(presented.encode(), key.encode()):
            found = tenant
    return found


class TenantKeys:
    """The configured API keys and, once resolved, their tenant ids."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = {k: k for k in keys}
        self.tenants: dict[str, str] = {}


class BearerAuth:
    def __init__(self, app: ASGIApp, keys: TenantKeys, prefix: str = "/v1") -> None:
        self.app = app
        self.keys = keys
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        header = ""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        scheme, _, token = header.partition(" ")
        if not header:
            await _deny(send, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.", None)
            return
        key = match_key(token.strip(), self.keys.keys) if scheme.lower() == "bearer" else None
        if key is None:
            await _deny(send, "Incorrect API key provided.", "invalid_api_key")
            return
        tenant = self.keys.tenants.get(key)
        if tenant is None:
            await _respond(
                send,
                503,
                {
                    "message": "The job store (Redis) is unavailable; retry shortly",
                    "type": "server_error",
                    "param": None,
                    "code": "store_unavailable",
                },
                [(b"retry-after", b"2")],
            )
            return
        scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)


async def _deny(send: Send, message: str, code: str | None) -> None:
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    await _respond(send, 401, error, [(b"www-authenticate", b"Bearer"), (b"x-should-retry", b"false")])


async def _respond(send: Send, status: int, error: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> None:
    raw = json.dumps({"error": error}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": raw})

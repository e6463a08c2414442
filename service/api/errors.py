"""Every error is OpenAI's body `{"error": {"message", "type", "param", "code"}}`.

The `openai` SDK retries 408/409/429/5xx by default, so a request that cannot succeed
by being repeated (an invalid state change, a quota) carries `x-should-retry: false`.
A validation error is a 400 (not FastAPI's 422) whose `param` names the field.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.record.storage import StorageError

log = logging.getLogger(__name__)

NO_RETRY = {"x-should-retry": "false"}


class APIError(Exception):
    """An error answered as is; `retry=False` tells the SDK not to try again."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry: bool | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        if retry is False:
            self.headers.update(NO_RETRY)


def not_found(kind: str, obj_id: str, param: str = "id") -> APIError:
    """Same answer for "does not exist" and "belongs to another tenant": nothing leaks."""
    return APIError(404, f"No such {kind}: {obj_id!r}", param=param, code="not_found")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code, retry=False)


def error_response(
    status: int, message: str, type: str, param: str | None, code: str | None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    # drop pydantic's union-branch tags ("int", "literal['auto']", "function-after[...]")
    parts = [p for p in parts if not (p in ("int", "float", "str") or "[" in p or p.startswith("constrained"))]
    return ".".join(parts) or None


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One clear sentence for the first problem (all unknown fields of an object together)."""
    errors = list(exc.errors())
    extra = [e for e in errors if e.get("type") == "extra_forbidden"]
    if extra:
        parent = _loc_to_param(tuple(extra[0]["loc"][:-1]))
        same = [str(e["loc"][-1]) for e in extra if _loc_to_param(tuple(e["loc"][:-1])) == parent]
        where = f"in {parent!r}" if parent else "in the request body"
        return f"Unknown field(s) {', '.join(repr(s) for s in same)} {where}", (
            f"{parent}.{same[0]}" if parent else same[0]
        )
    # For "auto"-or-number fields pydantic reports one error per union branch; the
    # numeric one carries the range, so prefer it.
    first = errors[0]
    param = _loc_to_param(tuple(first["loc"]))
    for e in errors:
        if _loc_to_param(tuple(e["loc"])) == param and e.get("type") not in ("literal_error",):
            first = e
            break
    msg = str(first.get("msg", "invalid value"))
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON", None
    if param:
        return f"Invalid value for '{param}': {msg}", param
    return msg, None


def install(app: FastAPI) -> None:
    """Register the handlers that turn every failure into OpenAI's error body."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param = validation_message(exc)
        return error_response(400, msg, "invalid_request_error", param, "invalid_value", NO_RETRY)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        return error_response(
            exc.status_code, str(exc.detail), "invalid_request_error", None, code, dict(exc.headers or {})
        )

    @app.exception_handler(redis.exceptions.ConnectionError)
    @app.exception_handler(redis.exceptions.TimeoutError)
    @app.exception_handler(redis.exceptions.BusyLoadingError)
    async def _redis_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("job store unavailable: %s", type(exc).__name__)
        return error_response(
            503,
            "The job store (Redis) is unavailable; retry shortly",
            "server_error",
            None,
            "store_unavailable",
            {"retry-after": "2"},
        )

    @app.exception_handler(StorageError)
    async def _storage_down(_: Request, exc: StorageError) -> JSONResponse:
        log.warning("file storage failed: %s", exc.reason)
        return error_response(
            503,
            f"File storage is unavailable ({exc.reason}); retry shortly",
            "server_error",
            None,
            "storage_unavailable",
            {"retry-after": "2"},
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "Internal server error", "server_error", None, "internal_error")

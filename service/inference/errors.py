"""The OpenAI error body, `{"error": {"message", "type", "param", "code"}}`, and its exception."""

from __future__ import annotations

from typing import Any


class OpenAIError(Exception):
    """An error answered to the client as OpenAI answers it; `param` names the offending field."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str, code: str = "invalid_value") -> OpenAIError:
    """A 400 about one request field."""
    return OpenAIError(400, message, param=param, code=code)


def model_not_found(name: str) -> OpenAIError:
    return OpenAIError(
        404,
        f"The model `{name}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )

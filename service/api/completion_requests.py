"""The bodies of /v1/chat/completions and /v1/completions: OpenAI's parameters that the inference
contract supports, validated here, before a slot is taken or the inference process is called.

Every other parameter is a 400 naming it (`extra="forbid"`; `service.api.errors` turns the
error into OpenAI's body): a parameter that would change the answer must never be dropped
silently. `user` is accepted (the SDK's end-user id) and not forwarded. Parameters that some
clients send with their neutral value are accepted with that value only, and not forwarded
(`NEUTRAL`: `presence_penalty: 0`, `logit_bias: {}`, chat `logprobs: false`, completions
`echo: false`, `best_of: 1`, ...); any other value of them is a 400 like an unknown parameter.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MAX_STOP = 4
"""OpenAI's limit on stop sequences."""

NEUTRAL: dict[str, Any] = {
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": {},
    "top_logprobs": 0,
    "echo": False,
    "best_of": 1,
    "suffix": None,
}
"""Parameters accepted only with the value that changes nothing (null too), never forwarded."""


def _neutral(name: str, value: Any) -> Any:
    """`value` when it is `name`'s neutral value (or null); a ValueError saying it is not served."""
    if value is not None and value != NEUTRAL[name]:
        raise ValueError(f"{name} is not supported; only {NEUTRAL[name]!r} (no effect) is accepted")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    """A content part of a message; only text (no images, audio or files) is served."""

    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        """The content as one string: the text parts joined, as the chat template expects it."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class _Generation(_Strict):
    """The parameters both endpoints share."""

    model: str = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("presence_penalty", "frequency_penalty", "logit_bias")
    @classmethod
    def _check_neutral(cls, value: Any, info: ValidationInfo) -> Any:
        return _neutral(str(info.field_name), value)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, not {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("a stop sequence cannot be empty")
        return value

    @field_validator("n")
    @classmethod
    def _check_n(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError(f"only n=1 is supported (one choice per request), not {value}")
        return value

    @field_validator("stream_options")
    @classmethod
    def _check_stream_options(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    def upstream(self, max_tokens: int | None) -> dict[str, Any]:
        """The body for the inference process, without `model` (the caller sets the served name)."""
        out = self.model_dump(exclude_none=True, exclude={"model", "user", "max_tokens", *NEUTRAL, "logprobs"})
        if max_tokens is not None:
            out["max_tokens"] = max_tokens
        return out


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _check_top_logprobs(cls, value: int | None) -> int | None:
        return _neutral("top_logprobs", value)

    @field_validator("logprobs")
    @classmethod
    def _check_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("log probabilities are not supported")
        return value

    @field_validator("max_completion_tokens")
    @classmethod
    def _check_max(cls, value: int | None, info: ValidationInfo) -> int | None:
        other = info.data.get("max_tokens")
        if value is not None and other is not None and other != value:
            raise ValueError(f"max_tokens ({other}) and max_completion_tokens ({value}) disagree; give one of them")
        return value

    def upstream_body(self) -> dict[str, Any]:
        body = self.upstream(self.max_completion_tokens or self.max_tokens)
        body.pop("max_completion_tokens", None)
        body["messages"] = [{"role": m.role, "content": m.text()} for m in self.messages]
        return body


class CompletionRequest(_Generation):
    prompt: str | list[int] = Field(description="The prompt: one string, or its token ids (one prompt per request)")
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None
    logprobs: int | None = None

    @field_validator("echo", "best_of", "suffix")
    @classmethod
    def _check_completion_neutral(cls, value: Any, info: ValidationInfo) -> Any:
        return _neutral(str(info.field_name), value)

    @field_validator("logprobs")
    @classmethod
    def _check_logprobs(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError("log probabilities are not supported")
        return value

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str | list[int]) -> str | list[int]:
        if isinstance(value, list) and (not value or min(value) < 0):
            raise ValueError("token ids must be a non-empty list of non-negative integers")
        return value

    def upstream_body(self) -> dict[str, Any]:
        return self.upstream(self.max_tokens)

"""OpenAI completion request bodies, checked field by field.

Every field is either used, accepted because its value changes nothing (the harmless
values the SDK or other clients send: `user`, `n: 1`, `logprobs: false`, penalties of 0,
`echo: false`, `best_of: 1`, ...), or refused with a 400 naming it: an unsupported option
is never silently ignored. The checks are plain Python rather than a pydantic model so
each message names the field and says what it takes, as OpenAI's do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.inference.errors import OpenAIError, invalid

MAX_STOP = 4
CHAT_ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class GenerationRequest:
    """What a completion request asks for, validated; `prompt` or `messages` is set."""

    model: str
    kind: str  # "chat" or "completion"
    prompt: str | list[int] | None
    messages: list[dict[str, str]] | None
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool

    @property
    def prompt_param(self) -> str:
        """The field a too-long prompt is blamed on."""
        return "messages" if self.kind == "chat" else "prompt"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not low <= v <= high:
        raise invalid(name, f"'{name}' must be a number between {low:g} and {high:g}, got {v!r}")
    return float(v)


def _optional_int(body: dict[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v) or v < low or (high is not None and v > high):
        bound = f"an integer of at least {low}" if high is None else f"an integer between {low} and {high}"
        raise invalid(name, f"'{name}' must be {bound}, got {v!r}")
    return int(v)


def _harmless(value: Any, allowed: Callable[[Any], bool]) -> bool:
    return value is None or allowed(value)


HARMLESS: dict[str, Callable[[Any], bool]] = {
    "user": lambda v: isinstance(v, str),
    "n": lambda v: v == 1 and _is_int(v),
    "presence_penalty": lambda v: v == 0 and not isinstance(v, bool),
    "frequency_penalty": lambda v: v == 0 and not isinstance(v, bool),
    "logit_bias": lambda v: v == {},
}
"""Fields accepted when their value is the no-op one (or null); any other value is a 400."""
HARMLESS_CHAT = {**HARMLESS, "logprobs": lambda v: v is False, "top_logprobs": lambda v: v == 0 and _is_int(v)}
HARMLESS_COMPLETION = {
    **HARMLESS,
    "logprobs": lambda v: False,  # only null
    "echo": lambda v: v is False,
    "best_of": lambda v: v == 1 and _is_int(v),
    "suffix": lambda v: False,
}
USED_COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options"}
USED_CHAT = USED_COMMON | {"messages", "max_completion_tokens"}
USED_COMPLETION = USED_COMMON | {"prompt"}


def _check_fields(body: dict[str, Any], used: set[str], harmless: dict[str, Callable[[Any], bool]]) -> None:
    for name, value in body.items():
        if name in used:
            continue
        check = harmless.get(name)
        if check is None:
            raise invalid(name, f"Unrecognized request argument supplied: {name}", code="unsupported_parameter")
        if not _harmless(value, check):
            raise invalid(name, f"'{name}' = {value!r} is not supported by this server", code="unsupported_value")


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if (
        not isinstance(items, list)
        or not all(isinstance(s, str) and s for s in items)
        or not 1 <= len(items) <= MAX_STOP
    ):
        raise invalid("stop", f"'stop' must be a non-empty string or a list of 1 to {MAX_STOP} non-empty strings")
    return tuple(items)


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid("stream", f"'stream' must be a boolean, got {stream!r}")
    options = body.get("stream_options")
    if options is None:
        return bool(stream), False
    if not stream:
        raise invalid("stream_options", "The 'stream_options' parameter is only allowed when 'stream' is enabled.")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise invalid("stream_options", "'stream_options' takes only 'include_usage' (a boolean)")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise invalid("stream_options.include_usage", f"'include_usage' must be a boolean, got {include!r}")
    return True, include


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", "'model' is required: a base model or a loaded adapter's name", code="missing_required")
    return model


def _content(i: int, content: Any) -> str:
    """A message's content: a string, or a list of text parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"messages[{i}].content", "only text content parts ({'type': 'text', 'text': ...})")
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(f"messages[{i}].content", "a message's content must be a string or a list of text parts")


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "'messages' must be a non-empty list of messages", code="missing_required")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}]", "each message must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise invalid(f"messages[{i}].role", f"role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise invalid(f"messages[{i}]", f"unsupported message field(s): {', '.join(sorted(extra))}")
        out.append({"role": "system" if role == "developer" else str(role), "content": _content(i, m.get("content"))})
    return out


def _prompt(body: dict[str, Any]) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # one prompt in a list, as some clients send it
    if isinstance(prompt, str):
        if not prompt:
            raise invalid("prompt", "'prompt' must not be empty")
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt):
        return [int(t) for t in prompt]
    raise invalid("prompt", "'prompt' must be a non-empty string (or one list of token ids); batches are not supported")


def _body(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise OpenAIError(400, "the request body must be a JSON object", code="invalid_json")
    return raw


def parse_chat(raw: Any) -> GenerationRequest:
    """A `/v1/chat/completions` body; OpenAIError (400) naming the first bad field."""
    body = _body(raw)
    _check_fields(body, USED_CHAT, HARMLESS_CHAT)
    model = _model(body)
    messages = _messages(body)
    max_tokens = _optional_int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _optional_int(body, "max_tokens", 1)
    elif body.get("max_tokens") is not None:
        raise invalid("max_tokens", "give 'max_completion_tokens' or 'max_tokens', not both")
    return _finish(body, model, "chat", None, messages, max_tokens)


def parse_completion(raw: Any) -> GenerationRequest:
    """A `/v1/completions` body; OpenAIError (400) naming the first bad field."""
    body = _body(raw)
    _check_fields(body, USED_COMPLETION, HARMLESS_COMPLETION)
    model = _model(body)
    prompt = _prompt(body)
    return _finish(body, model, "completion", prompt, None, _optional_int(body, "max_tokens", 1))


def _finish(
    body: dict[str, Any],
    model: str,
    kind: str,
    prompt: str | list[int] | None,
    messages: list[dict[str, str]] | None,
    max_tokens: int | None,
) -> GenerationRequest:
    stream, include_usage = _stream(body)
    return GenerationRequest(
        model=model,
        kind=kind,
        prompt=prompt,
        messages=messages,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        seed=_optional_int(body, "seed", -(1 << 63), (1 << 64) - 1),
        stop=_stop(body),
        stream=stream,
        include_usage=include_usage,
    )


@dataclass(frozen=True)
class LoadRequest:
    lora_name: str
    lora_path: str
    base_model: str | None


def _name(body: dict[str, Any], field: str) -> str:
    v = body.get(field)
    if not isinstance(v, str) or not v.strip():
        raise invalid(field, f"'{field}' is required (a non-empty string)", code="missing_required")
    return v


def parse_load(raw: Any) -> LoadRequest:
    """A `/v1/load_lora_adapter` body: lora_name, lora_path, optional base_model (our API sends it)."""
    body = _body(raw)
    extra = set(body) - {"lora_name", "lora_path", "base_model"}
    if extra:
        name = sorted(extra)[0]
        raise invalid(name, f"Unrecognized request argument supplied: {name}", code="unsupported_parameter")
    base = body.get("base_model")
    if base is not None and not isinstance(base, str):
        raise invalid("base_model", "'base_model' must be a base model's name")
    return LoadRequest(_name(body, "lora_name"), _name(body, "lora_path"), base)


def parse_unload(raw: Any) -> str:
    """A `/v1/unload_lora_adapter` body: the adapter's name."""
    body = _body(raw)
    extra = set(body) - {"lora_name", "lora_int_id"}  # vLLM's clients may send its integer id too
    if extra:
        name = sorted(extra)[0]
        raise invalid(name, f"Unrecognized request argument supplied: {name}", code="unsupported_parameter")
    return _name(body, "lora_name")

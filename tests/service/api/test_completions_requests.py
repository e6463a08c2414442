"""The completion endpoints' own duties before any generation: the body, the model, the limits.

Unit tests check what the request schemas accept and forward, and the names adapters are
served by; the rest runs through a real API process (uvicorn, Redis) with no inference
process behind it: bad parameters are a 400 naming them, a name the caller does not own a 404
`model_not_found`, and a valid request a 503 with Retry-After, whether no inference server is
configured or the configured one cannot be reached.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from pydantic import ValidationError

from service.api.completion_requests import ChatCompletionRequest, CompletionRequest
from service.api.served_models import STORAGE_SCHEME, StoredAdapter, lora_name_of
from tests.conftest import free_port

FT_NAME = "ft:tiny:org-0123456789abcdef::0123456789abcdef01234567"


def _chat(**kw: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **kw}
    )


def _error_field(exc: ValidationError) -> str:
    return ".".join(str(p) for p in exc.errors()[0]["loc"])


def test_the_chat_body_forwarded_is_the_validated_one() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "model": "tiny",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            ],
            "max_completion_tokens": 7,
            "temperature": 0,
            "stop": ["\n"],
            "seed": 3,
            "n": 1,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "someone",
            "logprobs": False,
            "presence_penalty": 0,
            "frequency_penalty": 0.0,
            "logit_bias": {},
            "top_logprobs": 0,
        }
    )
    assert req.upstream_body() == {
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}],
        "max_tokens": 7,
        "temperature": 0.0,
        "stop": ["\n"],
        "seed": 3,
        "n": 1,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert _chat(max_tokens=5).upstream_body()["max_tokens"] == 5
    assert "max_tokens" not in _chat().upstream_body()  # default: the inference process's (up to the context)


def test_the_completion_body_forwarded_is_the_validated_one() -> None:
    req = CompletionRequest.model_validate(
        {"model": "tiny", "prompt": "once", "max_tokens": 4, "top_p": 0.5, "echo": False, "best_of": 1, "suffix": None}
    )
    assert req.upstream_body() == {"prompt": "once", "max_tokens": 4, "top_p": 0.5}


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"n": 2}, "n"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": ""}, "stop"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"logprobs": True}, "logprobs"),
        ({"max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": -1}, "presence_penalty"),
        ({"logit_bias": {"12": 5}}, "logit_bias"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"tools": []}, "tools"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages.0.content"),
    ],
)
def test_chat_parameters_that_are_not_served_are_refused(extra: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as e:
        _chat(**extra)
    assert _error_field(e.value).startswith(field), e.value


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": "a", "echo": True}, "echo"),
        ({"prompt": "a", "suffix": "b"}, "suffix"),
        ({"prompt": "a", "best_of": 2}, "best_of"),
        ({"prompt": "a", "logprobs": 2}, "logprobs"),
        ({"prompt": "a", "seed": "x"}, "seed"),
        ({}, "prompt"),
    ],
)
def test_completion_parameters_that_are_not_served_are_refused(body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as e:
        CompletionRequest.model_validate({"model": "tiny", **body})
    assert _error_field(e.value).startswith(field), e.value


def test_adapters_are_served_by_a_safe_name_unique_per_model() -> None:
    ckpt = f"{FT_NAME}:ckpt-step-4"
    a, b = lora_name_of(FT_NAME), lora_name_of(ckpt)
    assert a != b and a == lora_name_of(FT_NAME)
    assert a.startswith("seco-") and a[5:].isalnum() and len(a) == 37
    assert (
        StoredAdapter(a, "archive", "tenants/t/x.tar.gz").storage_path == f"{STORAGE_SCHEME}:archive:tenants/t/x.tar.gz"
    )
    assert StoredAdapter(b, "dir", "tenants/t/ck/adapter").storage_path == f"{STORAGE_SCHEME}:dir:tenants/t/ck/adapter"


# ---------------------------------------------------------------- through a real API process


@pytest.fixture(scope="module")
def svc(launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The API with no inference server configured (SECO_INFERENCE_URL unset)."""
    s = launch_service(redis_url, tmp_path_factory.mktemp("no-inference"))
    yield s
    s.close()


def _status_error(call: Callable[[], Any]) -> Any:
    with pytest.raises(openai.APIStatusError) as e:
        call()
    return e.value


def test_bad_parameters_are_a_400_naming_them(svc: Any) -> None:
    client = svc.client()
    msgs = [{"role": "user", "content": "hi"}]
    for kwargs, param in (
        ({"n": 2}, "n"),
        ({"temperature": -1}, "temperature"),
        ({"extra_body": {"repetition_penalty": 1.2}}, "repetition_penalty"),
        ({"frequency_penalty": 1}, "frequency_penalty"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ):
        err = _status_error(lambda kw=kwargs: client.chat.completions.create(model="tiny", messages=msgs, **kw))
        assert err.status_code == 400, err
        assert err.body["param"] == param and err.body["type"] == "invalid_request_error", err.body
        assert param in err.body["message"], err.body
    err = _status_error(lambda: client.completions.create(model="tiny", prompt=["a", "b"]))
    assert err.status_code == 400 and err.body["param"] == "prompt", err.body


def test_a_model_the_caller_does_not_have_is_a_404_model_not_found(svc: Any) -> None:
    client = svc.client()
    for model in ("no-such-model", FT_NAME, f"{FT_NAME}:ckpt-step-2"):
        err = _status_error(
            lambda m=model: client.chat.completions.create(model=m, messages=[{"role": "user", "content": "x"}])
        )
        assert err.status_code == 404, err
        assert err.body["code"] == "model_not_found" and err.body["param"] == "model", err.body
        err = _status_error(lambda m=model: client.completions.create(model=m, prompt="x"))
        assert err.status_code == 404 and err.body["code"] == "model_not_found", err.body


def test_without_an_inference_server_a_valid_request_is_a_503_with_retry_after(svc: Any) -> None:
    with svc.http() as http:
        r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["code"] == "inference_unavailable" and err["type"] == "server_error", err
        assert "SECO_INFERENCE_URL" in err["message"] and int(r.headers["retry-after"]) > 0
        # a generation slot is given back on the way out: the next requests get the same 503, never a 429
        for _ in range(6):
            assert http.post("/v1/completions", json={"model": "tiny", "prompt": "x"}).status_code == 503


def test_an_unreachable_inference_server_is_a_503_that_names_no_address(
    launch_service: Callable[..., Any], redis_url: str, tmp_path: Path
) -> None:
    port = free_port()  # nothing listens there
    svc = launch_service(redis_url, tmp_path, SECO_INFERENCE_URL=f"http://127.0.0.1:{port}/v1")
    try:
        with svc.http() as http:
            r = http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "stream": True})
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "inference_unavailable" and "retry-after" in r.headers
            assert str(port) not in r.text
    finally:
        svc.close()

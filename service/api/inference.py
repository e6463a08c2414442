"""The API's HTTP client of the inference process (`seco serve`, or a vLLM server).

One contract, vLLM's OpenAI server with runtime LoRA loading: `POST /v1/load_lora_adapter
{"lora_name", "lora_path"}`, `GET /v1/models`, then `POST /v1/chat/completions` and
`/v1/completions` with `model` = a base model or a loaded adapter's name. A process that
cannot be reached is a 503 with Retry-After (the SDK retries it), one that stops answering
for SECO_INFERENCE_TIMEOUT a 504; its own error answers are passed on by the caller
(`service.api.routes.completions`). The URL is the operator's business and is never shown
to a client (it is logged).
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from service.api.errors import APIError

log = logging.getLogger(__name__)

CONNECT_SECONDS = 5.0
RETRY_AFTER_SECONDS = 5
"""What a 503 asks the client to wait: about a restart of the inference process."""


def unavailable(why: str) -> APIError:
    return APIError(
        503,
        f"The inference server is unavailable ({why}); retry shortly",
        type="server_error",
        code="inference_unavailable",
        headers={"retry-after": str(RETRY_AFTER_SECONDS)},
    )


class Inference:
    """The inference process at `url` (None: none configured, every call is a 503)."""

    def __init__(self, url: str | None, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        # Generations are bounded per key (SECO_MAX_GENERATIONS_PER_KEY) and connections per API
        # process (SECO_MAX_CONCURRENCY): the pool adds no third, lower limit of its own.
        self._http = httpx.AsyncClient(
            base_url=url or "http://inference.invalid",
            timeout=httpx.Timeout(timeout, connect=CONNECT_SECONDS),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
        )

    async def send(self, method: str, path: str, body: dict[str, Any] | None = None, *, stream: bool = False) -> Any:
        """The process's answer, whatever its status (`stream`: the body not read yet, to be
        closed by the caller); a 503 / 504 APIError when it cannot be had."""
        if self.url is None:
            raise unavailable("no inference server is configured: set SECO_INFERENCE_URL")
        request = self._http.build_request(method, path, json=body)
        try:
            return await self._http.send(request, stream=stream)
        except httpx.TimeoutException as e:
            log.warning("inference server %s timed out on %s: %s", self.url, path, type(e).__name__)
            if isinstance(e, httpx.ConnectTimeout | httpx.PoolTimeout):
                raise unavailable("it does not accept connections") from None
            raise APIError(
                504,
                f"The inference server did not answer within {self.timeout:g} s",
                type="server_error",
                code="inference_timeout",
            ) from None
        except httpx.TransportError as e:
            log.warning("inference server %s unreachable on %s: %s", self.url, path, type(e).__name__)
            raise unavailable("it cannot be reached") from None

    async def load_adapter(self, lora_name: str, lora_path: str, base_model: str | None) -> Any:
        """`POST /v1/load_lora_adapter`; `base_model` (our extension of the contract) when the
        process serves several base models."""
        body = {"lora_name": lora_name, "lora_path": lora_path}
        if base_model is not None:
            body["base_model"] = base_model
        resp = await self.send("POST", "/v1/load_lora_adapter", body)
        return resp

    async def served_models(self) -> set[str]:
        """The names the process serves now (`GET /v1/models`): its base models and loaded adapters."""
        resp = await self.send("GET", "/v1/models")
        if resp.status_code != 200:
            return set()
        try:
            return {str(m["id"]) for m in resp.json().get("data", [])}
        except (ValueError, KeyError, TypeError, AttributeError):
            return set()

    async def aclose(self) -> None:
        await self._http.aclose()

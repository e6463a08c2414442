"""`POST /v1/chat/completions` and `/v1/completions`: a base, fine-tuned or checkpoint model of the
caller's, answered by the inference process.

A request is validated (`service.api.completion_requests`), its `model` resolved for the
caller's tenant (`service.api.served_models`: anyone else's name is a 404 `model_not_found`),
a generation slot taken (SECO_MAX_GENERATIONS_PER_KEY per key across API processes, 429
beyond), the adapter loaded if needed (`service.api.adapters`), and the body forwarded with
`model` = the name the inference process serves it by. Its answer comes back as it is, with
the caller's model name in it: its errors with their status (a prompt that does not fit, a
model without a chat template, ...), a stream chunk by chunk as Server-Sent Events. A client
that goes away closes the upstream request, which stops the generation there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from service.api.adapters import Adapters
from service.api.completion_requests import ChatCompletionRequest, CompletionRequest
from service.api.deps import TenantDep
from service.api.errors import APIError, error_response
from service.api.inference import Inference
from service.api.served_models import Target, resolve_target
from service.api.streams import Slot, StreamSlots
from service.record.settings import Settings
from service.record.store import Store

log = logging.getLogger(__name__)
router = APIRouter(tags=["completions"])

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
RATE_LIMIT_RETRY_SECONDS = 1
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DISCONNECT_POLL_SECONDS = 0.5


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, tenant: TenantDep) -> Response:
    """A chat completion (OpenAI's shape; `stream: true` for Server-Sent Events)."""
    return await _generate(request, tenant, body.model, CHAT_PATH, body.upstream_body(), bool(body.stream))


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request, tenant: TenantDep) -> Response:
    """A text completion of `prompt` (OpenAI's legacy shape; `stream: true` for Server-Sent Events)."""
    return await _generate(request, tenant, body.model, COMPLETIONS_PATH, body.upstream_body(), bool(body.stream))


async def _generate(
    request: Request, tenant: str, model: str, path: str, body: dict[str, Any], stream: bool
) -> Response:
    state = request.app.state
    settings: Settings = state.settings
    store: Store = state.store
    target = await run_in_threadpool(resolve_target, model, tenant, store, settings)
    slots: StreamSlots = state.generation_slots
    slot = await slots.take(tenant, settings.max_generations_per_key)
    if slot is None:
        raise APIError(
            429,
            f"This API key already has {settings.max_generations_per_key} completions being generated; "
            "wait for one to finish (SECO_MAX_GENERATIONS_PER_KEY)",
            type="requests",
            code="rate_limit_exceeded",
            headers={"retry-after": str(RATE_LIMIT_RETRY_SECONDS)},
        )
    keeper = asyncio.create_task(slot.keep())
    handed_over = False
    try:
        upstream = {**body, "model": target.served}
        answer = await _unless_gone(request, _answer(state.inference, state.adapters, target, path, upstream, stream))
        if isinstance(answer, Response):
            return answer
        handed_over = True  # the stream gives the slot back when it ends
        return StreamingResponse(
            _relay(answer, target, slot, keeper), media_type="text/event-stream", headers=SSE_HEADERS
        )
    finally:
        if not handed_over:
            await _give_back(slot, keeper)


async def _answer(
    inference: Inference, adapters: Adapters, target: Target, path: str, body: dict[str, Any], stream: bool
) -> Response | httpx.Response:
    """The whole answer (an error, or a complete generation), or the open upstream stream."""
    resp = await _call(inference, adapters, target, path, body, stream)
    if resp.status_code != 200 or not stream:
        return await _whole(resp, target)
    return resp


async def _unless_gone(
    request: Request, answer: Coroutine[Any, Any, Response | httpx.Response]
) -> Response | httpx.Response:
    """`answer`, unless the client disconnects first: then it is cancelled, which drops the
    upstream connection, so the inference process stops generating for nobody. (Starlette
    cancels a stream whose client went away, but not a request still waiting for its answer.)"""
    task = asyncio.ensure_future(answer)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                log.info("client disconnected while its completion was being generated")
                return Response(status_code=499)  # nobody is there to read it
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                late = await task
                if isinstance(late, httpx.Response):
                    await late.aclose()


async def _call(
    inference: Inference, adapters: Adapters, target: Target, path: str, body: dict[str, Any], stream: bool
) -> Any:
    """The inference process's answer; an adapter it does not know (404: restarted, or it
    forgot it) is loaded again and the request retried once."""
    await adapters.ensure(target)
    resp = await inference.send("POST", path, body, stream=stream)
    if resp.status_code == 404 and target.adapter is not None:
        await resp.aclose()
        log.info("adapter unknown to the inference server: loading it again", extra={"model": target.served})
        await adapters.ensure(target, reload=True)
        resp = await inference.send("POST", path, body, stream=stream)
    return resp


async def _give_back(slot: Slot, keeper: asyncio.Task[None]) -> None:
    keeper.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await keeper
    await slot.release()


def _named(obj: Any, target: Target) -> Any:
    """An answer (or chunk) with the caller's model name in place of the served one."""
    if isinstance(obj, dict) and "model" in obj:
        obj["model"] = target.model
    return obj


async def _whole(resp: Any, target: Target) -> Response:
    """A complete answer, success or error, passed on with its status."""
    try:
        raw = await resp.aread()
    except httpx.TransportError as e:
        raise APIError(
            502, f"The inference server's answer was cut off ({type(e).__name__})", type="server_error"
        ) from None
    finally:
        await resp.aclose()
    try:
        obj = json.loads(raw)
    except ValueError:
        obj = None
    if resp.status_code == 200 and isinstance(obj, dict):
        return JSONResponse(_named(obj, target))
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
        err = obj["error"]
        if target.adapter is not None and isinstance(err.get("message"), str):
            err["message"] = err["message"].replace(target.adapter.lora_name, target.model)
        headers = {k: v for k, v in resp.headers.items() if k.lower() == "retry-after"}
        return JSONResponse({"error": err}, status_code=resp.status_code, headers=headers)
    log.warning("inference server answered %s without an error body", resp.status_code)
    return error_response(
        502,
        f"The inference server answered {resp.status_code} without a readable body",
        "server_error",
        None,
        "bad_gateway",
    )


async def _relay(resp: Any, target: Target, slot: Slot, keeper: asyncio.Task[None]) -> AsyncIterator[str]:
    """The upstream event stream, event by event, with the caller's model name in each chunk.

    A client that disconnects cancels this generator where it waits for the next upstream line;
    closing the upstream response then drops that connection, which is how the inference
    process learns to stop. The clean-up is shielded, since an await in a cancelled task is
    itself cancelled at once.
    """
    try:
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                if line.startswith(":"):
                    yield line + "\n\n"  # a comment (keep-alive): passed on
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                yield "data: [DONE]\n\n"
                continue
            try:
                chunk = json.loads(data)
            except ValueError:
                yield f"data: {data}\n\n"
                continue
            yield f"data: {json.dumps(_named(chunk, target), separators=(',', ':'))}\n\n"
    except httpx.HTTPError as e:  # headers are sent: say so in the stream, as OpenAI's streams do
        log.warning("inference stream interrupted: %s", type(e).__name__)
        error = {"message": "The inference server's stream was interrupted", "type": "server_error", "code": None}
        yield f"data: {json.dumps({'error': error})}\n\n"
    finally:
        await asyncio.shield(_close(resp, slot, keeper))


async def _close(resp: Any, slot: Slot, keeper: asyncio.Task[None]) -> None:
    await resp.aclose()
    await _give_back(slot, keeper)

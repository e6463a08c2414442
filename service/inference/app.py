"""The FastAPI app of `seco serve` (`uvicorn service.inference.app:create_app --factory`).

Routes are vLLM's OpenAI server with runtime LoRA loading, so the API can point
`SECO_INFERENCE_URL` at either. Only the API process should reach it: it has no keys of
its own (as vLLM's docs warn for runtime loading), which is why it binds 127.0.0.1 by
default. `GET /stats` shows the engine's counters (running, cancelled, tokens generated).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from transformers.utils import logging as hf_logging

from seco_core.generate import SamplingParams
from service.inference.adapters import AdapterFetcher
from service.inference.engine import Engine, Job, Update, asyncio_emitter
from service.inference.errors import OpenAIError, invalid, model_not_found
from service.inference.models import KnownAdapter, MemoryShare, ServedModel
from service.inference.requests import GenerationRequest, parse_chat, parse_completion, parse_load, parse_unload
from service.inference.responses import ResponseShape, sse
from service.record.logs import configure_logging
from service.record.settings import Settings, get_settings
from service.record.storage import open_storage, scratch_dir, sweep_scratch

log = logging.getLogger(__name__)

DISCONNECT_POLL_SECONDS = 0.5
"""How often a non-streamed request checks that its client is still there."""


@dataclass
class Served:
    """Everything the routes share: the base models, the known adapters, the engine."""

    models: dict[str, ServedModel]
    adapters: dict[str, KnownAdapter]
    engine: Engine
    fetcher: AdapterFetcher
    lock: asyncio.Lock

    def resolve(self, name: str) -> tuple[ServedModel, KnownAdapter | None]:
        """A request's `model`: a base model's name or a loaded adapter's; 404 model_not_found otherwise."""
        if name in self.models:
            return self.models[name], None
        adapter = self.adapters.get(name)
        if adapter is None:
            raise model_not_found(name)
        return self.models[adapter.base], adapter

    def base(self, name: str | None) -> ServedModel:
        """The base model an adapter is for: the one named, else the first served (vLLM serves one)."""
        if name is None:
            return next(iter(self.models.values()))
        if name not in self.models:
            raise OpenAIError(
                404, f"base model {name!r} is not served here", param="base_model", code="model_not_found"
            )
        return self.models[name]


def _load_models(settings: Settings) -> dict[str, ServedModel]:
    if not settings.models:
        raise RuntimeError("SECO_MODELS is empty: name the base models to serve (name=/local/hf/dir,...)")
    device = torch.device(settings.serve_on)
    memory = MemoryShare(settings.serve_memory_bytes)
    return {
        name: ServedModel(name, path, device, settings.serve_max_adapters, memory)
        for name, path in settings.models.items()
    }


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hf_logging.disable_progress_bar()  # a log file, not a terminal
        sweep_scratch(settings, "serve")
        cache = scratch_dir(settings, "serve", f"adapters.{os.getpid()}")
        cache.mkdir(parents=True, exist_ok=True)
        engine = Engine(settings.serve_prefill_chunk)
        app.state.served = Served(
            models=await asyncio.to_thread(_load_models, settings),
            adapters={},
            engine=engine,
            fetcher=AdapterFetcher(open_storage(settings), cache),
            lock=asyncio.Lock(),
        )
        engine.start()
        log.info("serving %s on %s", ", ".join(app.state.served.models), settings.serve_on)
        try:
            yield
        finally:
            engine.stop()
            shutil.rmtree(cache, ignore_errors=True)

    app = FastAPI(title="seco serve", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it: the client closed the connection

    def served(request: Request) -> Served:
        return request.app.state.served

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/stats")
    async def stats(request: Request) -> dict[str, int]:
        return served(request).engine.stats.as_dict()

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        s = served(request)
        data = [_model_card(name, name, None, m.context) for name, m in s.models.items()]
        data += [_model_card(a.name, a.base, a.base, s.models[a.base].context) for a in s.adapters.values()]
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        s = served(request)
        body = parse_load(await _json(request))
        if body.lora_name in s.models:
            raise invalid("lora_name", f"{body.lora_name!r} is a base model's name")
        async with s.lock:
            known = s.adapters.get(body.lora_name)
            if known is not None:
                if known.lora_path == body.lora_path and (body.base_model in (None, known.base)):
                    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' is already loaded.")
                raise invalid(
                    "lora_name",
                    f"The lora adapter '{body.lora_name}' has already been loaded from another path; unload it first.",
                    code="adapter_exists",
                )
            model = s.base(body.base_model)
            local = await asyncio.to_thread(s.fetcher.local_dir, body.lora_path)
            adapter = KnownAdapter(body.lora_name, body.lora_path, local, model.name)
            await asyncio.wrap_future(s.engine.call(lambda: s.engine.load(model, adapter)))
            s.adapters[adapter.name] = adapter
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        s = served(request)
        name = parse_unload(await _json(request))
        async with s.lock:
            adapter = s.adapters.pop(name, None)
            if adapter is None:
                raise OpenAIError(
                    404, f"The lora adapter '{name}' cannot be found.", param="lora_name", code="adapter_not_found"
                )
            model = s.models[adapter.base]
            await asyncio.wrap_future(s.engine.call(lambda: s.engine.unload(model, name)))
            s.fetcher.forget(adapter.local_dir)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(request, served(request), parse_chat(await _json(request)))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(request, served(request), parse_completion(await _json(request)))

    return app


def _model_card(name: str, root: str, parent: str | None, context: int | None) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "seco",
        "root": root,
        "parent": parent,
        "max_model_len": context,
    }


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OpenAIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None


def _context_error(req: GenerationRequest, context: int, prompt: int, completion: int) -> OpenAIError:
    total = prompt + completion
    if req.kind == "chat":
        message = (
            f"This model's maximum context length is {context} tokens. However, you requested {total} tokens "
            f"({prompt} in the messages, {completion} in the completion). "
            "Please reduce the length of the messages or completion."
        )
    else:
        message = (
            f"This model's maximum context length is {context} tokens, however you requested {total} tokens "
            f"({prompt} in your prompt; {completion} for the completion). "
            "Please reduce your prompt; or completion length."
        )
    return OpenAIError(400, message, param=req.prompt_param, code="context_length_exceeded")


async def _generate(request: Request, s: Served, req: GenerationRequest) -> Response:
    model, adapter = s.resolve(req.model)
    if req.messages is not None:
        ids = await asyncio.to_thread(model.encode_chat, req.messages)
    else:
        assert req.prompt is not None
        ids = await asyncio.to_thread(model.encode_prompt, req.prompt)
    if not ids:
        raise invalid(req.prompt_param, "the prompt encodes to no tokens")
    context = model.context
    max_tokens = req.max_tokens
    if max_tokens is None:
        max_tokens = max(1, context - len(ids)) if context else 1 << 30
    if context and len(ids) + max_tokens > context:
        raise _context_error(req, context, len(ids), max_tokens)
    params = SamplingParams(
        max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=req.stop
    )
    updates: asyncio.Queue[Update] = asyncio.Queue()
    job = s.engine.submit(Job(model, adapter, ids, params, asyncio_emitter(updates)))
    try:
        first = await _next(request, updates, job)
    except BaseException:
        job.cancel()
        raise
    if first.error is not None:
        raise first.error
    shape = ResponseShape(req.kind, req.model)
    if req.stream:
        return StreamingResponse(
            _stream(job, updates, shape, req.include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    parts: list[str] = []
    while True:
        update = await _next(request, updates, job)
        if update.error is not None:
            raise update.error
        parts.append(update.text)
        if update.final:
            assert update.finish_reason is not None
            return JSONResponse(
                shape.body("".join(parts), update.finish_reason, update.prompt_tokens, update.completion_tokens)
            )


class ClientGone(Exception):
    """The client of a non-streamed request disconnected; its job is cancelled."""


async def _next(request: Request, updates: asyncio.Queue[Update], job: Job) -> Update:
    """The job's next update, checking every half second that the client is still connected."""
    while True:
        try:
            return await asyncio.wait_for(updates.get(), DISCONNECT_POLL_SECONDS)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                raise ClientGone() from None


async def _stream(
    job: Job, updates: asyncio.Queue[Update], shape: ResponseShape, include_usage: bool
) -> AsyncIterator[bytes]:
    """SSE chunks until the finish chunk (and the usage chunk), then `[DONE]`. A client that goes
    away cancels this generator, and with it the job, before its next token."""
    try:
        if shape.kind == "chat":
            yield sse(shape.chunk("", None, first=True))
        while True:
            update = await updates.get()
            if update.error is not None:
                yield sse(update.error.body())
                break
            if update.text:
                yield sse(shape.chunk(update.text, None))
            if update.final:
                yield sse(shape.chunk(None if shape.kind == "chat" else "", update.finish_reason))
                if include_usage:
                    yield sse(shape.usage_chunk(update.prompt_tokens, update.completion_tokens))
                break
        yield sse("[DONE]")
    finally:
        job.cancel()  # nothing when it finished; otherwise the engine drops it at its next step

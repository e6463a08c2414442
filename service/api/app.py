"""The FastAPI application: routers, middlewares, error handlers and background reaper."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import redis
import redis.asyncio as aioredis
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from service.api import dashboard, docs, errors
from service.api.adapters import Adapters
from service.api.auth import BearerAuth, TenantKeys
from service.api.body_limit import BodyLimit
from service.api.inference import Inference
from service.api.metrics import Metrics, MetricsMiddleware
from service.api.routes import completions, files, health, jobs, merged, models
from service.api.streams import StreamSlots
from service.api.unhandled import UnhandledErrors
from service.api.upload_slots import UploadSlots
from service.record import redis_keys
from service.record.expiry import expire_files
from service.record.logs import configure_logging
from service.record.private import private_dir, restrict_umask
from service.record.queue import Enqueue
from service.record.reads import Reads
from service.record.settings import Settings, get_settings
from service.record.storage import Storage, StorageError, open_storage, sweep_scratch
from service.record.store import POOL_WAIT_SECONDS, Store
from service.record.tenants import resolve_tenants

log = logging.getLogger(__name__)

SSE_SOCKET_TIMEOUT = 60.0  # > routes.jobs.KEEPALIVE_MS
STARTUP_WAIT_SECONDS = 10.0
"""How long start-up waits for a first try at the tenant ids (a long move of old data may take
longer: requests get a 503 until it is done)."""


async def _resolve_tenants(store: Store, storage: Storage, keys: TenantKeys, tried: asyncio.Event) -> None:
    """Tenant ids for the configured keys (moving data still under an old id first), once Redis answers."""
    while True:
        try:
            keys.tenants = await run_in_threadpool(resolve_tenants, store, storage, list(keys.keys))
            return
        except (redis.RedisError, StorageError) as e:
            log.warning("tenant ids not resolved yet (%s); retrying", type(e).__name__)
            await asyncio.sleep(1)
        finally:
            tried.set()


async def _reaper_loop(store: Store, storage: Storage, enqueue: Callable[[str], None], settings: Settings) -> None:
    """Requeue running jobs whose worker died (lease expired; workers run the same sweep), and
    delete files whose `expires_after` has passed."""
    while True:
        await asyncio.sleep(settings.reaper_interval)
        try:
            for job_id in await run_in_threadpool(store.reap_expired, settings.max_attempts):
                await run_in_threadpool(enqueue, job_id)
        except Exception as e:
            log.warning("reaper sweep failed: %s: %s", type(e).__name__, e)
        try:
            await run_in_threadpool(expire_files, store, storage)
        except Exception as e:
            log.warning("file expiry sweep failed: %s: %s", type(e).__name__, e)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app from `settings` (default: the environment)."""
    settings = settings or get_settings()
    configure_logging(settings.log_level)
    restrict_umask()  # however the process was started: what it writes is its user's only
    private_dir(Path(settings.data_dir))
    redis_url = settings.redis_url
    if not redis_url:
        raise RuntimeError("REDIS_URL is not set (use `seco up` to run an embedded server)")
    store = Store.from_url(redis_url, name="seco-api")
    storage = open_storage(settings)
    sweep_scratch(settings, "uploads")  # uploads a killed API process was receiving
    enqueue = Enqueue(settings)  # the queue's contract; its Celery app is built at the first job
    tenant_keys = TenantKeys(settings.api_keys)
    _ = settings.models  # fail at start-up, not at the first request, on a malformed SECO_MODELS

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # SSE readers block on XREAD for up to the keep-alive interval: the read timeout must be longer.
        # One connection at most per request uvicorn serves at once, so streams cannot exhaust the pool.
        pool = aioredis.BlockingConnectionPool.from_url(
            redis_url,
            max_connections=settings.max_concurrency,
            timeout=POOL_WAIT_SECONDS,
            decode_responses=True,
            socket_connect_timeout=3,
            socket_timeout=SSE_SOCKET_TIMEOUT,
            client_name="seco-api-async",
        )
        app.state.aredis = aioredis.Redis.from_pool(pool)
        app.state.reads = Reads.from_url(
            redis_url, max_connections=settings.max_concurrency, name="seco-api-reads", blocking=app.state.aredis
        )
        app.state.stream_slots = StreamSlots(app.state.aredis)
        app.state.generation_slots = StreamSlots(app.state.aredis, redis_keys.tenant_generations)
        app.state.inference = Inference(settings.inference_url, settings.inference_timeout)
        app.state.adapters = Adapters(app.state.inference, storage, settings)
        tried = asyncio.Event()
        resolver = asyncio.create_task(_resolve_tenants(store, storage, tenant_keys, tried))
        with contextlib.suppress(asyncio.TimeoutError):  # Redis up: requests are served with their tenants at once
            await asyncio.wait_for(tried.wait(), STARTUP_WAIT_SECONDS)
        reaper = asyncio.create_task(_reaper_loop(store, storage, enqueue, settings))
        # What start-up built (modules, routes, models) lives as long as the process: out of the
        # collector's generations, a full collection no longer walks it, and no request waits
        # for that walk (tens of milliseconds, several times a minute under load).
        gc.freeze()
        log.info(
            "api started",
            extra={"models": list(settings.models), "tenants": len(settings.api_keys), "storage": storage.describe()},
        )
        try:
            yield
        finally:
            for task in (reaper, resolver):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await app.state.inference.aclose()
            await app.state.aredis.aclose()
            await app.state.reads.aclose()

    app = FastAPI(
        title="seco fine-tuning service",
        version="0.1.0",
        summary="OpenAI-compatible long-context LoRA fine-tuning (SeCO / SpaCO)",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's pages load their scripts from a CDN: see service/api/docs.py
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.store = store
    app.state.storage = storage
    app.state.enqueue = enqueue
    app.state.metrics = Metrics(store, settings.lease_seconds)
    app.state.upload_slots = UploadSlots(settings.max_uploads_per_key, settings.max_uploads)

    # Routes are matched in order, router by router: the jobs routes, which clients poll all
    # day, come first, and each router is included at the app itself (one level to descend).
    for router in (jobs.router, merged.router, files.router, models.router, completions.router):
        app.include_router(router, prefix="/v1")
    app.include_router(health.router)
    dashboard.install(app)  # the web UI at /ui (static files, no auth: the page asks for the key)
    if settings.api_docs:
        docs.install(app)
    errors.install(app)
    app.add_middleware(UnhandledErrors)  # innermost: a 500 keeps the connection (and is counted in metrics)
    # Inside the key check (a caller without a key gets its 401 before any body is read);
    # uploads stream to disk under their own limit.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, exempt=frozenset({("POST", "/v1/files")}))
    app.add_middleware(BearerAuth, keys=tenant_keys)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app

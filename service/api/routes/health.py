"""Liveness, readiness and Prometheus metrics (no authentication: for probes and scrapers)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import SettingsDep, StoreDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up (does not touch Redis: a Redis outage must not restart the API)."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(store: StoreDep, settings: SettingsDep) -> JSONResponse:
    """Ready to take jobs: Redis answers and at least one worker has a recent heartbeat."""
    try:
        store.ping()
        workers = store.live_workers(settings.lease_seconds)
    except Exception as e:
        return JSONResponse({"status": "unavailable", "redis": False, "reason": type(e).__name__}, status_code=503)
    ready = len(workers) > 0
    body = {"status": "ready" if ready else "no_workers", "redis": True, "workers": len(workers)}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics")
def metrics(request: Request) -> Response:
    """Prometheus exposition format."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

"""The interactive API reference at /docs: off unless SECO_API_DOCS is set, and self-hosted.

FastAPI's own /docs and /redoc pages load Swagger UI and ReDoc from a CDN, with a floating
version, no integrity hash and no Content-Security-Policy, on the same origin as the
dashboard, which keeps an API key in the browser: whoever controls that CDN could read it.
Here FastAPI's pages are always off; with SECO_API_DOCS=true, /docs serves Swagger UI from
the `swagger-ui-bundle-v2` package (a pinned copy of Swagger UI's own distribution) with
an initialiser file of ours, under the dashboard's CSP. ReDoc is not offered: no package
ships it without a web framework of its own. The schema itself stays at /openapi.json.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from service.api.dashboard import PAGE_HEADERS, STATIC_DIR

router = APIRouter(include_in_schema=False)


@router.get("/docs")
def docs_page() -> FileResponse:
    """Swagger UI for /openapi.json."""
    return FileResponse(STATIC_DIR / "docs" / "index.html", media_type="text/html", headers=PAGE_HEADERS)


def install(app: FastAPI) -> None:
    """Serve /docs and Swagger UI's files (RuntimeError when the package is missing)."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        missing = "SECO_API_DOCS is set but Swagger UI is not installed: pip install swagger-ui-bundle-v2"
        raise RuntimeError(missing) from None
    app.include_router(router)
    app.mount("/docs/swagger-ui", StaticFiles(directory=swagger_ui_path), name="swagger-ui")

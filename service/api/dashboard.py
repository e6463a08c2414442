"""The web dashboard: one static page at /ui that calls the /v1 API from the browser.

The page and its assets are plain files under service/api/static (no build step, nothing
fetched from the internet). They need no key to load: the page asks for the API key
and sends it as `Authorization: Bearer` on every /v1 call, as any other client does,
so the dashboard can see exactly what that key's tenant may see.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"

# Scripts and styles only from this server (uPlot sets inline styles from script, which
# CSP allows); no framing, so the key-holding page cannot be clickjacked.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
def root() -> RedirectResponse:
    """The server root opens the dashboard."""
    return RedirectResponse("/ui", status_code=307)


@router.get("/ui")
def page() -> FileResponse:
    """The dashboard page."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)


def install(app: FastAPI) -> None:
    """Serve the page at /ui and its assets at /ui/static."""
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=STATIC_DIR), name="ui-static")

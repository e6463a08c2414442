"""The dashboard's files as the API serves them (no browser needed): page, assets, headers, no key."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

STATIC = Path(__file__).resolve().parents[3] / "service" / "api" / "static"


@pytest.fixture(scope="module")
def svc(launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    s = launch_service(redis_url, tmp_path_factory.mktemp("ui-static"))  # the API alone: no worker needed
    yield s
    s.close()


def test_root_redirects_to_the_page_which_needs_no_key(svc: Any) -> None:
    r = httpx.get(svc.url + "/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/ui"
    page = httpx.get(svc.url + "/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>seco" in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-eval" not in csp
    # the data it shows still needs the key
    assert httpx.get(svc.url + "/v1/fine_tuning/jobs").status_code == 401


def test_every_asset_the_page_loads_is_served(svc: Any) -> None:
    html = (STATIC / "index.html").read_text()
    assets = set(re.findall(r'(?:src|href)="(/ui/static/[^"]+)"', html))
    for js in STATIC.glob("*.js"):  # ES module imports between our scripts
        assets |= {f"/ui/static/{m}" for m in re.findall(r'from "\./([^"]+)"', js.read_text())}
    assert {"/ui/static/app.js", "/ui/static/vendor/uplot/uPlot.iife.min.js"} <= assets
    for path in sorted(assets):
        r = httpx.get(svc.url + path)
        assert r.status_code == 200 and len(r.content) > 0, path
    assert "MIT License" in httpx.get(svc.url + "/ui/static/vendor/uplot/LICENSE").text
    assert httpx.get(svc.url + "/ui/static/%2e%2e/app.py").status_code == 404  # service/api/app.py stays private

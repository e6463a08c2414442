"""A small HTTP client for the seco API, used by the `seco` CLI.

It imports only the standard library and httpx, so the CLI runs on a laptop without
torch or the server stack. Every failure becomes a `ClientError` whose text is what a
person should read: the server's own error message when there is one.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


class ClientError(Exception):
    """A request that failed; `str()` is the message to show, `status` the HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def base_url(url: str | None) -> str:
    """The server root: accepts `http://host:port` or the SDK-style `http://host:port/v1`."""
    url = (url or os.environ.get("SECO_URL") or DEFAULT_URL).strip().rstrip("/")
    return re.sub(r"/v1$", "", url)


def resolve_api_key(key: str | None, url: str) -> str | None:
    """--api-key, else SECO_API_KEY, else (for a server on this machine only) the key `seco up` saved.

    The saved-key fallback makes the README walkthrough work in a second terminal; it is
    never sent to another host, where it would leak the local server's key.
    """
    key = key or os.environ.get("SECO_API_KEY")
    if key:
        return key.strip()
    if urlsplit(url).hostname not in LOCAL_HOSTS:
        return None
    saved = Path(os.environ.get("SECO_DATA_DIR") or "data") / "api_key"
    with contextlib.suppress(OSError):
        return saved.read_text().strip() or None
    return None


def error_message(resp: httpx.Response) -> tuple[str, str | None]:
    """The server's `{"error": {"message", "code"}}`, or a plain description of the status."""
    try:
        body = resp.json()
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"]), err.get("code")
    except ValueError:
        pass
    text = resp.text.strip()[:200] if resp.headers.get("content-type", "").startswith("text/") else ""
    return f"HTTP {resp.status_code} {resp.reason_phrase}" + (f": {text}" if text else ""), None


def raise_for_status(resp: httpx.Response) -> None:
    if resp.is_success:
        return
    message, code = error_message(resp)
    if resp.status_code == 401:
        message += " (set SECO_API_KEY or pass --api-key)"
    raise ClientError(message, resp.status_code, code)


class Client:
    """The calls the CLI makes; one httpx connection pool per command."""

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 30.0) -> None:
        self.url = base_url(url)
        self.api_key = resolve_api_key(api_key, self.url)
        headers = {"User-Agent": "seco-cli"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self.http = httpx.Client(base_url=self.url + "/v1", headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- plumbing

    def request(self, method: str, path: str, **kw: Any) -> Any:
        """One JSON call; transport failures and error statuses become `ClientError`."""
        try:
            resp = self.http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise self.unreachable(e) from None
        raise_for_status(resp)
        return resp.json()

    def unreachable(self, e: Exception) -> ClientError:
        return ClientError(
            f"cannot reach the seco server at {self.url} ({type(e).__name__}: {e}); "
            "is it running? (set SECO_URL or pass --url)"
        )

    # ----------------------------------------------------------------- files and jobs

    def upload(self, path: Path) -> dict[str, Any]:
        """POST /v1/files (multipart), streaming the file from disk."""
        with path.open("rb") as f:
            return dict(
                self.request(
                    "POST", "/files", files={"file": (path.name, f)}, data={"purpose": "fine-tune"}, timeout=None
                )
            )

    def delete_file(self, file_id: str) -> None:
        self.request("DELETE", f"/files/{file_id}")

    def create_job(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self.request("POST", "/fine_tuning/jobs", json=body))

    def jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest `limit` jobs, following the cursor across pages."""
        out: list[dict[str, Any]] = []
        params: dict[str, Any] = {}
        while len(out) < limit:
            params["limit"] = min(100, limit - len(out))
            page = self.request("GET", "/fine_tuning/jobs", params=params)
            out.extend(page["data"])
            if not page.get("has_more") or not page["data"]:
                break
            params["after"] = page["data"][-1]["id"]
        return out

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/fine_tuning/jobs/{job_id}"))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return dict(self.request("POST", f"/fine_tuning/jobs/{job_id}/cancel"))

    def pause(self, job_id: str) -> dict[str, Any]:
        return dict(self.request("POST", f"/fine_tuning/jobs/{job_id}/pause"))

    def resume(self, job_id: str) -> dict[str, Any]:
        return dict(self.request("POST", f"/fine_tuning/jobs/{job_id}/resume"))

    def events(self, job_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """The newest `limit` events, oldest first (the API pages newest first)."""
        out: list[dict[str, Any]] = []
        params: dict[str, Any] = {}
        while len(out) < limit:
            params["limit"] = min(1000, limit - len(out))
            page = self.request("GET", f"/fine_tuning/jobs/{job_id}/events", params=params)
            out.extend(page["data"])
            if not page.get("has_more") or not page["data"]:
                break
            params["after"] = page["data"][-1]["id"]
        return out[::-1]

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        return list(self.request("GET", f"/fine_tuning/jobs/{job_id}/checkpoints", params={"limit": 100})["data"])

    def download_adapter(self, job_id: str, out: BinaryIO) -> int:
        """Stream the adapter .tar.gz into `out`; returns its size in bytes."""
        n = 0
        try:
            with self.http.stream("GET", f"/fine_tuning/jobs/{job_id}/adapter", timeout=None) as resp:
                if not resp.is_success:
                    resp.read()
                    raise_for_status(resp)
                for chunk in resp.iter_bytes():
                    out.write(chunk)
                    n += len(chunk)
        except httpx.TransportError as e:
            raise self.unreachable(e) from None
        return n

    def open_stream(self, job_id: str, last_event_id: str | None) -> contextlib.AbstractContextManager[httpx.Response]:
        """The job's SSE stream, resumed after `last_event_id`; the caller reads its lines."""
        headers = {"Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        # The server sends a keep-alive comment every 15 s: 60 s of silence means a dead
        # connection, which surfaces as a transport error that the follower recovers from.
        timeout = httpx.Timeout(10.0, read=60.0)
        return self.http.stream("GET", f"/fine_tuning/jobs/{job_id}/events/stream", headers=headers, timeout=timeout)

"""What the benchmark scripts share: a free port, waiting for a server, stopping what they started.

Each script starts its servers (Valkey, the API, a worker, a reference app) as child
processes in sessions of their own, so stopping one stops every process it spawned
(uvicorn's workers, Celery's pool children).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(
    url: str,
    procs: Sequence[subprocess.Popen[bytes]],
    *,
    timeout: float = 60,
    ready: Callable[[int], bool] = lambda status: status < 500,
    log: object = "its log",
) -> None:
    """Poll `url` until its status is `ready`; raise if one of `procs` exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not become ready; see {log}")
        with contextlib.suppress(httpx.HTTPError):
            if ready(httpx.get(url, timeout=1).status_code):
                return
        time.sleep(0.2)


def stop_groups(procs: Sequence[subprocess.Popen[bytes]], grace: float = 15) -> None:
    """SIGTERM each process's session, then SIGKILL what has not exited after `grace` seconds."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)

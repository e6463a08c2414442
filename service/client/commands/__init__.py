"""Client commands of `seco`, one module per group: submit, jobs (status, cancel, pause, resume,
events), follow, download, chat, bench.

They talk HTTP only, through `service.client.http` (stdlib + httpx), so they run on a laptop
that has neither torch nor the server stack; `seco bench` alone needs torch, and says so.
The server is `--url` or SECO_URL (default http://127.0.0.1:8000), the key `--api-key`
or SECO_API_KEY. Any failure prints one line (the server's own message when it sent
one) and exits non-zero; a traceback is never the answer.

Exit codes: 0 success, 1 an error or a failed job, 2 a usage error, 3 a cancelled job,
130 interrupted.
"""

from __future__ import annotations

from typing import Any

from service.client.commands import bench, chat, download, follow, jobs, submit
from service.client.commands.base import server_options


def register(sub: Any) -> None:
    """Add the client subcommands to `seco`'s subparsers (called by service.client.cli), in help order."""
    conn = server_options()
    for group in (submit, jobs, follow, download, chat):
        group.register(sub, conn)
    bench.register(sub)

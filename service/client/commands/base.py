"""What every client command shares: the server options, exit codes, and the wrapper that turns
a failure into one line on stderr and an exit code (a traceback is never the answer)."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import Any, TextIO

from service.client.http import Client, ClientError

EXIT_OK, EXIT_ERROR, EXIT_CANCELLED, EXIT_INTERRUPTED = 0, 1, 3, 130
JOB_EXIT = {"succeeded": EXIT_OK, "failed": EXIT_ERROR, "cancelled": EXIT_CANCELLED}

Command = Callable[[argparse.Namespace], int]


def server_options() -> argparse.ArgumentParser:
    """The parent parser of every command that talks to the server: `--url`, `--api-key`."""
    conn = argparse.ArgumentParser(add_help=False)
    g = conn.add_argument_group("server")
    g.add_argument("--url", help="server root URL (default: $SECO_URL or http://127.0.0.1:8000)")
    g.add_argument("--api-key", help="API key (default: $SECO_API_KEY)")
    return conn


def command(fn: Callable[[argparse.Namespace, Client], int]) -> Command:
    """Run `fn` with a client; turn failures into one line on stderr and an exit code."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        try:
            with Client(args.url, args.api_key) as client:
                return fn(args, client)
        except ClientError as e:
            print(f"seco: error: {e}", file=sys.stderr)
            return EXIT_ERROR
        except OSError as e:  # a local file that cannot be read or written
            print(f"seco: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
            return EXIT_ERROR
        except KeyboardInterrupt:
            print("\nseco: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED

    return run


def emit(text: str = "", file: TextIO | None = None) -> None:
    print(text, file=file or sys.stdout, flush=True)


def queue_text(job: dict[str, Any]) -> str:
    """`(#3 in queue)` for a queued job, else nothing."""
    return f"(#{job['queue_position']} in queue)" if job.get("queue_position") else ""

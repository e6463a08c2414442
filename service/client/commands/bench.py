"""`seco bench`: the library's benchmark, run locally (the one command that needs torch)."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from service.client.commands.base import EXIT_ERROR, EXIT_INTERRUPTED


def register(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        add_help=False,
        help="run the chunk-wise training benchmark (needs torch; --help for its options)",
        description="Runs `python -m benchmarks.bench` with the arguments given.",
    )
    p.__class__ = _PassThroughParser  # every argument, options included, goes to benchmarks.bench


class _PassThroughParser(argparse.ArgumentParser):
    """A subcommand parser that hands all of its arguments to another program, unparsed.

    argparse's REMAINDER cannot start with an option (`seco bench --lengths 1024` would be
    "unrecognized arguments"), so the bench subparser collects them itself.
    """

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        namespace = namespace if namespace is not None else argparse.Namespace()
        namespace.args = list(args if args is not None else [])
        namespace.func = cmd_bench
        return namespace, []


def cmd_bench(args: argparse.Namespace) -> int:
    """Delegate to `python -m benchmarks.bench` (a subprocess: its exit code is ours)."""
    # find_spec on top-level names only: it locates them without importing torch here.
    missing = [m for m in ("torch", "seco_core", "benchmarks") if importlib.util.find_spec(m) is None]
    if missing:
        print(
            f"seco: error: `seco bench` runs the training library locally and needs {', '.join(missing)}; "
            "install the worker extras: pip install 'seco-tune[worker]'",
            file=sys.stderr,
        )
        return EXIT_ERROR
    try:
        return subprocess.call([sys.executable, "-m", "benchmarks.bench", *args.args])
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED

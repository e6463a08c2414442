"""`seco`: the console script. Dispatches to subcommands registered by small modules.

This module imports only the standard library so the client commands work on a laptop
without the server stack; each command module imports what it needs when it runs.
A command module exposes `register(subparsers)` and sets `func(args) -> int` on its parsers.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute subcommands; a missing optional one is skipped.
COMMAND_MODULES = ("service.launch", "service.client.commands")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seco", description="Long-context LoRA fine-tuning service (SeCO / SpaCO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

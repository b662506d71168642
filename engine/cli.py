"""`pollinate-engine`: the engine's command line (serve blocks, run a DHT peer, and the other commands)."""

from __future__ import annotations

import argparse
import gc
import sys
from typing import NoReturn


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every part's subcommands."""
    from engine import service_cli
    from engine.client import cli as client_cli
    from engine.server import cli as server_cli
    from engine.swarm import cli as swarm_cli

    parser = argparse.ArgumentParser(prog="pollinate-engine", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    server_cli.add_commands(subparsers)
    service_cli.add_commands(subparsers)
    client_cli.add_commands(subparsers)
    swarm_cli.add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen command; returns the exit code."""
    from engine import envs

    envs.prefer_passive_openmp_threads()  # before anything below imports torch
    from engine.server.cli import configure_logging

    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    return int(args.handler(args) or 0)


def exit_with(code: int) -> NoReturn:
    """End the process with `code`, skipping the interpreter's last walks over every object.

    At exit Python collects cycles among everything still alive (torch, transformers, sympy: millions of
    objects), which took 3-4 s of a stopping server on 2 cores. The process is ending anyway: freezing what
    exists keeps those collections short. atexit handlers, buffered output and finalizers of objects freed
    by reference counting still run.
    """
    gc.freeze()
    sys.exit(code)


def console_main() -> NoReturn:
    """The `pollinate-engine` command: main(), then the quick exit."""
    exit_with(main())


if __name__ == "__main__":
    console_main()

"""`pollinate-engine`: the engine's command line (serve blocks, run a DHT peer, and the other commands)."""

from __future__ import annotations

import argparse
import sys


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


if __name__ == "__main__":
    sys.exit(main())
